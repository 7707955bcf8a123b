"""An EventTarget-style pubsub adapter over any duplex stream (SPEC §7).

::

    target = wraith_core.create_event_target(stream)      # or (reader, writer)
    target.add_event_listener("chat", lambda ev: print(ev.detail))  # sends __subscribe
    await target.wait_subscribed("chat")                  # the peer wants "chat"
    target.dispatch_event(Event("chat", {"text": "hi"}))  # True if sent
    await target.drain()                                  # backpressure
    async with target.events("news") as news:             # subscribe + iterate
        async for ev in news: ...
    target.close(); await target.wait_closed()

Semantics (the same on both ends of any control stream, hub or not):

* the first listener of a type sends ``__subscribe {"type": T}``, removing the
  last one sends ``__unsubscribe``;
* the peer's ``__subscribe``/``__unsubscribe`` are honoured: ``dispatch_event``
  sends an event only while the peer is subscribed to its type and returns
  whether it did. The hub in ``wraith serve`` subscribes, toward every member,
  to each type any member wants, so this works through the hub as well;
* received events of types nobody here listens to are dropped; the rest go to
  the listeners in registration order (async listeners are awaited before the
  next event is read, which is the backpressure), then to iterators;
* iterators hold at most ``queue_size`` events each; a full iterator pauses
  reading (and so the peer, through the stream's flow control) — it never
  grows memory without bound;
* a malformed frame (or one over ``max_frame``) from the peer closes the
  stream; iterators then raise :class:`EventStreamError`;
* closing: ``close()`` flushes, sends EOF and closes; EOF from the peer ends
  this side the same way (the hub answers a member's EOF likewise).

Nothing here imports SSH: the adapter works over a ``DuplexStream``, an
asyncio ``(StreamReader, StreamWriter)`` pair, or anything with ``read``,
``write``, ``drain``, ``write_eof``, ``close`` and ``wait_closed``.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import WraithError
from .protocol.envelope import (
    DEFAULT_MAX_FRAME,
    RESERVED_PREFIX,
    SUBSCRIBE,
    UNSUBSCRIBE,
    Envelope,
    EnvelopeDecoder,
    EnvelopeError,
    ProtocolError,
    check_type,
    encode,
    make_frame,
    new_id,
    subscription_type,
)

READ_SIZE = 256 * 1024
# Types a peer may subscribe to (a hub announces every wanted type; wraith's hub caps
# them at 65536): past this the peer is broken or hostile, and the stream closes.
MAX_PEER_TYPES = 65536
DEFAULT_QUEUE_SIZE = 1024


class Stream(Protocol):
    async def read(self, n: int = -1) -> bytes: ...
    def write(self, data: bytes) -> Any: ...
    async def drain(self) -> None: ...
    def write_eof(self) -> None: ...
    def close(self) -> None: ...
    async def wait_closed(self) -> None: ...


class ReaderWriterStream:
    """An asyncio ``(StreamReader, StreamWriter)`` pair as one duplex stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self, n: int = -1) -> bytes:
        return await self.reader.read(n)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def write_eof(self) -> None:
        self.writer.write_eof()

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        self.writer.transport.abort()

    async def wait_closed(self) -> None:
        await self.writer.wait_closed()


class EventStreamError(WraithError):
    """The control stream broke: a protocol error by the peer, or a reset."""

    code = "EPROTO"


class EventTargetClosed(WraithError):
    code = "ECLOSED"


@dataclass
class Event:
    """A received or dispatched event; ``detail`` is the envelope's ``payload``."""

    type: str
    detail: Any = None
    id: str = field(default_factory=new_id)

    @property
    def payload(self) -> Any:
        return self.detail


CustomEvent = Event
Listener = Callable[[Event], Awaitable[None] | None]


class _Inbox:
    """A bounded single-consumer queue; ``put`` waits while full."""

    def __init__(self, capacity: int) -> None:
        self._items: collections.deque[Event] = collections.deque()
        self._capacity = capacity
        self._ended = False
        self._error: BaseException | None = None
        self._getter: asyncio.Future[None] | None = None
        self._putter: asyncio.Future[None] | None = None

    @staticmethod
    def _wake(fut: asyncio.Future[None] | None) -> None:
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def put(self, event: Event) -> None:
        while len(self._items) >= self._capacity and not self._ended:
            self._putter = asyncio.get_running_loop().create_future()
            await self._putter
        if not self._ended:
            self._items.append(event)
            self._wake(self._getter)

    def end(self, error: BaseException | None = None) -> None:
        if not self._ended:
            self._ended, self._error = True, error
        self._wake(self._getter)
        self._wake(self._putter)

    async def get(self) -> Event | None:
        while not self._items:
            if self._ended:
                if self._error is not None:
                    raise self._error
                return None
            self._getter = asyncio.get_running_loop().create_future()
            await self._getter
        self._wake(self._putter)
        return self._items.popleft()


class EventStream:
    """Async iterator over received events (of ``types``, or of every delivered type).

    Use it as ``async with target.events("a") as evs: async for ev in evs``;
    leaving the block (or dropping the object) removes its subscriptions.
    """

    def __init__(self, target: EventTarget, types: tuple[str, ...], capacity: int) -> None:
        self._inbox = _Inbox(capacity)
        self._listener: Listener = self._inbox.put
        self._finalizer = weakref.finalize(self, target._detach, self._inbox, self._listener, types)

    def close(self) -> None:
        self._finalizer()
        self._inbox.end()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        ev = await self._inbox.get()
        if ev is None:
            raise StopAsyncIteration
        return ev

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class EventTarget:
    def __init__(self, stream: Stream, max_frame: int = DEFAULT_MAX_FRAME,
                 queue_size: int = DEFAULT_QUEUE_SIZE, point_to_point: bool = True) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self.queue_size = queue_size
        # False: send every dispatched event, for a hub that announces no subscriptions
        self.point_to_point = point_to_point
        self.error: BaseException | None = None
        self._listeners: dict[str, list[Listener]] = {}
        self._catch_all: list[_Inbox] = []
        self._peer: set[str] = set()
        self._peer_waiters: list[tuple[str, asyncio.Future[None]]] = []
        self._closing = False
        self._out: list[bytes] = []  # frames written at the end of this loop iteration, as one write
        self._flush_handle: asyncio.Handle | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    # -- subscriptions ------------------------------------------------------------

    def add_event_listener(self, type: str, listener: Listener) -> None:
        check_type(type)
        fns = self._listeners.setdefault(type, [])
        if listener in fns:
            return
        fns.append(listener)
        if len(fns) == 1:
            self._control(SUBSCRIBE, type)

    def remove_event_listener(self, type: str, listener: Listener) -> None:
        fns = self._listeners.get(type)
        if not fns or listener not in fns:
            return
        fns.remove(listener)
        if not fns:
            del self._listeners[type]
            self._control(UNSUBSCRIBE, type)

    addEventListener = add_event_listener
    removeEventListener = remove_event_listener

    @property
    def subscriptions(self) -> frozenset[str]:
        """Types this side listens to."""
        return frozenset(self._listeners)

    @property
    def peer_subscriptions(self) -> frozenset[str]:
        """Types the peer asked for (only these are sent)."""
        return frozenset(self._peer)

    async def wait_subscribed(self, type: str) -> None:
        """Wait until the peer subscribes to ``type`` (at once if it already has)."""
        while type not in self._peer:
            if self._reader.done():
                raise EventTargetClosed("event stream is closed")
            fut = asyncio.get_running_loop().create_future()
            self._peer_waiters.append((type, fut))
            await fut

    def events(self, *types: str) -> EventStream:
        """An iterator over events of ``types`` (subscribing to them now), or of all delivered types."""
        for t in types:
            check_type(t)
        es = EventStream(self, types, self.queue_size)
        if types:
            for t in types:
                self.add_event_listener(t, es._listener)
        else:
            self._catch_all.append(es._inbox)
        if self._reader.done():
            es._inbox.end(self.error)
        return es

    def __aiter__(self) -> EventStream:
        return self.events()

    def _detach(self, inbox: _Inbox, listener: Listener, types: tuple[str, ...]) -> None:
        for t in types:
            self.remove_event_listener(t, listener)
        if inbox in self._catch_all:
            self._catch_all.remove(inbox)

    # -- sending ------------------------------------------------------------------

    def dispatch_event(self, event: Event | str, detail: Any = None) -> bool:
        """Send ``event`` (or ``type``, ``detail``) if the peer subscribed to its type; True if sent.
        ``detail`` must be JSON; bytes in it go as base64 strings (as in the Node adapter)."""
        if isinstance(event, str):
            event = Event(event, detail)
        check_type(event.type)
        if self._closing:
            raise EventTargetClosed("event target is closed")
        if self.point_to_point and event.type not in self._peer:
            return False
        if self._reader.done():
            raise EventTargetClosed("event stream is closed")
        self._send(encode(Envelope(event.type, event.id, event.detail), self.max_frame))
        return True

    dispatchEvent = dispatch_event

    async def publish(self, type: str, detail: Any = None) -> bool:
        """``dispatch_event`` then ``drain``."""
        sent = self.dispatch_event(type, detail)
        await self.drain()
        return sent

    async def drain(self) -> None:
        """Wait until the stream can take more (backpressure); raises if it broke."""
        self._flush()
        await self.stream.drain()

    def _control(self, kind: str, type: str) -> None:
        if not self._closing and not self._reader.done():
            self._send(make_frame(kind, {"type": type}, max_frame=self.max_frame))

    def _send(self, frame: bytes) -> None:
        self._out.append(frame)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._out:
            return
        out, self._out = self._out, []
        try:
            self.stream.write(out[0] if len(out) == 1 else b"".join(out))
        except Exception:  # closed under us: the reader sees it and ends everything
            pass

    # -- receiving ----------------------------------------------------------------

    async def _read_loop(self) -> None:
        dec = EnvelopeDecoder(self.max_frame)
        error: BaseException | None = None
        try:
            while not dec.done:
                try:
                    data = await self.stream.read(READ_SIZE)
                except Exception as exc:  # ConnectionError, OSError, asyncssh.ConnectionLost, ...
                    error = EventStreamError(f"event stream broken: {exc.__class__.__name__}", "ECONNRESET")
                    break
                if data:
                    dec.receive_data(data)
                else:
                    dec.receive_eof()
                data = b""
                events = collections.deque(dec.events())
                while events and error is None:
                    ev = events.popleft()  # (not kept once delivered: a payload can be large)
                    if isinstance(ev, Envelope):
                        try:
                            await self._receive(ev)
                        except EnvelopeError as exc:
                            error = EventStreamError(f"peer broke the protocol: {exc}")
                    elif isinstance(ev, ProtocolError):
                        error = EventStreamError(f"peer broke the protocol: {ev.message}")
                    del ev
                if error is not None:
                    self._abort()
                    break
            if error is None and not self._closing:
                # The peer ended its side (EOF): nothing more will arrive, so end ours too
                # (what is already written is flushed first). This is the close handshake.
                self._closing = True
                self._flush()
                _close_gracefully(self.stream)
        finally:
            self.error = error
            self._finish(error)

    async def _receive(self, env: Envelope) -> None:
        if env.type == SUBSCRIBE:
            t = subscription_type(env)
            if t not in self._peer and len(self._peer) >= MAX_PEER_TYPES:
                raise EnvelopeError("too-many-subscriptions", f"peer subscribed to more than {MAX_PEER_TYPES} types")
            self._peer.add(t)
            self._wake_peer_waiters(t)
        elif env.type == UNSUBSCRIBE:
            self._peer.discard(subscription_type(env))
        elif env.type.startswith(RESERVED_PREFIX):
            return
        elif env.type in self._listeners:
            event = Event(env.type, env.payload, env.id)
            for fn in list(self._listeners.get(env.type, ())):
                await self._call(fn, event)
            for inbox in list(self._catch_all):
                await inbox.put(event)

    async def _call(self, fn: Listener, event: Event) -> None:
        try:
            result = fn(event)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:  # a listener's bug must not kill the stream
            asyncio.get_running_loop().call_exception_handler(
                {"message": "event listener raised", "exception": exc})

    def _wake_peer_waiters(self, type: str | None) -> None:
        keep = []
        for t, fut in self._peer_waiters:
            if (type is None or t == type) and not fut.done():
                fut.set_result(None)
            elif not fut.done():
                keep.append((t, fut))
        self._peer_waiters = keep

    def _finish(self, error: BaseException | None) -> None:
        self._peer.clear()
        self._wake_peer_waiters(None)
        inboxes = list(self._catch_all)
        for fns in self._listeners.values():
            for fn in fns:
                owner = getattr(fn, "__self__", None)
                if isinstance(owner, _Inbox):
                    inboxes.append(owner)
        for inbox in inboxes:
            inbox.end(error)

    def _abort(self) -> None:
        abort = getattr(self.stream, "abort", None)
        if callable(abort):
            abort()
        else:
            self.stream.close()

    # -- closing ------------------------------------------------------------------

    def close(self) -> None:
        """End the stream: flush what was dispatched, send EOF, close; iterators end."""
        if self._closing:
            return
        self._closing = True
        self._flush()
        _close_gracefully(self.stream)
        self._finish(None)

    async def wait_closed(self) -> None:
        await asyncio.gather(self._reader, return_exceptions=True)
        try:
            await self.stream.wait_closed()
        except (ConnectionError, OSError):
            pass

    @property
    def closed(self) -> bool:
        return self._reader.done()

    async def __aenter__(self) -> EventTarget:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


def _close_gracefully(stream: Stream) -> None:
    """EOF first (the peer sees a clean end, not a reset), then close; buffered frames are flushed."""
    try:
        stream.write_eof()
    except Exception:  # already closed or cannot half-close: closing is what matters
        pass
    stream.close()


def create_event_target(stream: Stream | tuple[asyncio.StreamReader, asyncio.StreamWriter], *,
                        max_frame: int = DEFAULT_MAX_FRAME, queue_size: int = DEFAULT_QUEUE_SIZE,
                        point_to_point: bool = True) -> EventTarget:
    """Wrap a duplex stream (or an asyncio reader/writer pair) as an :class:`EventTarget`.

    ``point_to_point=False`` sends every dispatched event whether or not the peer
    subscribed to its type (for a hub that does not announce subscriptions).
    """
    if isinstance(stream, tuple):
        stream = ReaderWriterStream(*stream)
    return EventTarget(stream, max_frame, queue_size, point_to_point)
