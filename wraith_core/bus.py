"""The in-process event hub behind ``wraith-control:0`` (SPEC §7).

Every control stream joins one :class:`Hub`. Frames are the envelope framing of
:mod:`wraith_core.protocol.envelope`. Routing:

* ``__subscribe {"type": T}`` / ``__unsubscribe {"type": T}`` change what a
  stream receives; an event of type ``T`` goes to every stream subscribed to
  ``T``, the publisher included if it subscribed. Other ``__*`` control types
  are ignored (forward compatibility).
* The hub is itself a well-behaved peer: it tells every member which types
  anyone on the hub wants. When a type gains its first subscriber the hub
  sends ``__subscribe T`` to all members; when it loses its last one,
  ``__unsubscribe T``; a new member first receives ``__subscribe`` for every
  type currently wanted (made by its writer as it goes, so a hub with many
  types costs a newcomer neither memory nor its queue allowance). So an event-target adapter that only sends types its
  peer subscribed to (point-to-point semantics) works unchanged against the
  hub, and nobody publishes events that no one will receive.
* A frame over ``max_frame``, invalid UTF-8/JSON, a bad envelope or control
  payload, more than ``max_subscriptions`` types (or a new type when the hub
  already routes ``max_types``), or EOF in the middle of a
  frame closes THAT stream only, with one log line naming the peer address,
  user and reason — never payloads, types or destinations.

Slow subscribers: fan-out never waits for a subscriber. Each member has an
outbound queue bounded in bytes (``queue_limit``, default 64 MiB; fanned-out
frames are shared, not copied, and each queued frame also counts a fixed
overhead). A member whose queue would go over the bound is disconnected
(``reason=slow-consumer``) rather than dropping events silently or slowing
everyone down. The frames queued on the whole hub (each counted once, however
many members it waits for) are bounded too (``memory_limit``, default 256 MiB):
over it, the members with the longest queues are disconnected the same way.
Disconnecting one member can disconnect others (its last unsubscribes are
announced to everyone); that chain is worked off in a loop, not by recursion.
Reading from a member is paced by that member's own writer only through the
SSH window; the hub keeps the frames it routes, never their parsed payloads.

Frames over ``PARSE_ELSEWHERE`` bytes (1 MiB) are checked in a child process
(:mod:`.protocol.parse_worker`): 16 MiB of tiny JSON values take the parser
about half a second, and the hub shares its event loop with every tunnel of the
server. A member's frames are still routed in the order it sent them; a frame
the child cannot parse in time closes its member (``reason=too-complex``).

Changes of what the hub routes (a type's first subscriber, its last one gone)
are announced to every member, so each member may cause ``SUB_BURST`` of them
at once and ``SUB_RATE`` per second after that; past it, the hub reads that
member's next frames more slowly (nobody is dropped).

EOF from a member (on a frame boundary) ends its membership cleanly: it
leaves every subscription, the events already queued for it are flushed, and
the hub answers with EOF and closes the stream (within ``DRAIN_TIMEOUT``).
That is the close handshake the event-target adapters use.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
from typing import TYPE_CHECKING, Any, cast

from .duplex import DuplexStream
from .protocol.envelope import (
    DEFAULT_MAX_FRAME,
    RESERVED_PREFIX,
    SUBSCRIBE,
    UNSUBSCRIBE,
    EndOfStream,
    Envelope,
    EnvelopeDecoder,
    EnvelopeError,
    ProtocolError,
    RawFrame,
    make_frame,
    subscription_type,
)
from .protocol.parse_worker import ParseWorker

if TYPE_CHECKING:
    from .ssh.server import ConnectionInfo

log = logging.getLogger("wraith.bus")

READ_SIZE = 256 * 1024
DEFAULT_QUEUE_LIMIT = 64 * 1024 * 1024
FRAME_OVERHEAD = 128  # bytes charged per queued frame, so floods of tiny frames count too
DEFAULT_MAX_SUBSCRIPTIONS = 4096
DEFAULT_MAX_TYPES = 65536  # distinct types wanted on one hub
WRITE_BATCH = 256 * 1024
DRAIN_TIMEOUT = 30.0  # how long a member that sent EOF gets to read what was queued for it
DEFAULT_MEMORY_LIMIT = 256 * 1024 * 1024  # distinct frames queued on the whole hub
SUB_RATE = 200.0  # announced subscription changes per second per member, after a burst of
SUB_BURST = 1000.0
PARSE_ELSEWHERE = 1024 * 1024  # frames bigger than this are parsed in a child process


class _Member:
    __slots__ = ("stream", "info", "decoder", "subs", "queue", "queued", "wakeup", "dropped", "draining", "task",
                 "snapshot", "sub_tokens", "sub_time")

    def __init__(self, stream: DuplexStream, info: ConnectionInfo, max_frame: int) -> None:
        self.stream = stream
        self.info = info
        self.decoder = EnvelopeDecoder(max_frame, keep_payload=False, defer_over=PARSE_ELSEWHERE)
        self.subs: set[str] = set()
        self.queue: collections.deque[bytes] = collections.deque()
        self.queued = 0
        self.wakeup = asyncio.Event()
        self.dropped = False
        self.draining = False  # sent EOF: no new events, flush the queue, then close
        self.task: asyncio.Task[None] | None = None
        # types wanted when it joined: announced by its writer before anything queued
        self.snapshot: collections.deque[str] = collections.deque()
        self.sub_tokens = SUB_BURST  # subscription changes it may make now
        self.sub_time = 0.0  # when sub_tokens was last topped up (loop time)


class Hub:
    """One in-process pubsub hub; :meth:`add` a control stream to make it a member."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, queue_limit: int = DEFAULT_QUEUE_LIMIT,
                 max_subscriptions: int = DEFAULT_MAX_SUBSCRIPTIONS, max_types: int = DEFAULT_MAX_TYPES,
                 memory_limit: int = DEFAULT_MEMORY_LIMIT) -> None:
        if queue_limit < max_frame + FRAME_OVERHEAD:
            raise ValueError("queue_limit must hold at least one frame of max_frame bytes")
        if memory_limit < queue_limit:
            raise ValueError("memory_limit must be at least queue_limit")
        self.max_frame = max_frame
        self.queue_limit = queue_limit
        self.memory_limit = memory_limit
        self.max_subscriptions = max_subscriptions
        self.max_types = max_types
        self._members: set[_Member] = set()
        self._subs: dict[str, set[_Member]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        # every distinct frame queued for any member: id -> [frame, how many queues hold it]
        self._held: dict[int, list[Any]] = {}
        self._held_bytes = 0
        self._doomed: collections.deque[_Member] = collections.deque()  # cut, still in the routing
        self._draining: set[_Member] = set()  # sent EOF, out of the routing, queue still flushing
        self._parser = ParseWorker()

    # -- introspection ------------------------------------------------------------

    @property
    def member_count(self) -> int:
        return len(self._members)

    def subscriber_count(self, type: str) -> int:
        return len(self._subs.get(type, ()))

    def queued_bytes(self) -> int:
        """Bytes waiting in all members' outbound queues (shared frames counted per member)."""
        return sum(m.queued for m in self._members | self._draining)

    def held_bytes(self) -> int:
        """Bytes of the distinct frames waiting in any queue (what they take in memory)."""
        return self._held_bytes

    # -- membership ---------------------------------------------------------------

    def add(self, stream: DuplexStream, info: ConnectionInfo) -> None:
        """Make ``stream`` a member; it is served until it closes or breaks the protocol."""
        if self._closing:
            stream.abort()
            return
        m = _Member(stream, info, self.max_frame)
        self._members.add(m)
        m.snapshot.extend(self._subs)
        if m.snapshot:
            m.wakeup.set()
        task = asyncio.get_running_loop().create_task(self._serve(m))
        m.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Close every member stream and stop serving."""
        self._closing = True
        for m in list(self._members):
            self._drop(m, None)
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._parser.close()

    # -- per member ---------------------------------------------------------------

    async def _serve(self, m: _Member) -> None:
        writer = asyncio.get_running_loop().create_task(self._write_loop(m))
        reason: str | None = None
        try:
            reason = await self._read_loop(m)
            if reason is None and not m.dropped:
                # EOF: leave the routing, flush what is queued, then EOF + close (in _drop)
                self._leave(m)
                self._settle()
                m.draining = True
                self._draining.add(m)
                m.wakeup.set()
                closed = asyncio.ensure_future(m.stream.wait_closed())
                await asyncio.wait({writer, closed}, timeout=DRAIN_TIMEOUT,
                                   return_when=asyncio.FIRST_COMPLETED)
                closed.cancel()
        finally:
            self._drop(m, reason)
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    async def _read_loop(self, m: _Member) -> str | None:
        """Read and route frames; the protocol-error reason, or None at EOF / close."""
        dec = m.decoder
        while not m.dropped:
            try:
                data = await m.stream.read(READ_SIZE)
            except Exception:  # ConnectionError, OSError, asyncssh's ConnectionLost/DisconnectError
                return "truncated" if dec.buffered else None
            if m.dropped:  # cut while the read completed: what it read must not be routed
                return None
            if data:
                dec.receive_data(data)
            else:
                dec.receive_eof()
            data = b""
            events = collections.deque(dec.events())
            while events:
                ev = events.popleft()  # (what is routed is not kept while this member waits)
                if isinstance(ev, RawFrame):
                    ev = await self._parser.parse(ev.frame)
                    if m.dropped:
                        return None
                if isinstance(ev, Envelope):
                    try:
                        self._route(m, ev)
                    except EnvelopeError as exc:
                        return exc.reason
                    finally:
                        self._settle()
                elif isinstance(ev, ProtocolError):
                    return ev.reason
                elif isinstance(ev, EndOfStream):
                    return None
                del ev
                if m.dropped:
                    return None
                wait = _sub_wait(m)
                if wait:  # too many subscription changes: read it more slowly
                    await asyncio.sleep(wait)
                    if m.dropped:
                        return None
            await asyncio.sleep(0)  # let writers flush between chunks, even when more input is buffered
        return None

    async def _write_loop(self, m: _Member) -> None:
        stream = m.stream
        try:
            while not m.dropped:
                if m.snapshot:  # the join snapshot first: later changes are queued behind it
                    batch: list[bytes] = []
                    size = 0
                    while m.snapshot and size < WRITE_BATCH:
                        frame = make_frame(SUBSCRIBE, {"type": m.snapshot.popleft()})
                        size += len(frame)
                        batch.append(frame)
                    stream.write(b"".join(batch))
                    await stream.drain()
                    continue
                if not m.queue:
                    if m.draining:
                        return
                    m.wakeup.clear()
                    await m.wakeup.wait()
                    continue
                # many small frames go out as one write (one SSH packet, not one per event)
                batch = []
                size = 0
                while m.queue and size < WRITE_BATCH:
                    frame = m.queue.popleft()
                    m.queued -= len(frame) + FRAME_OVERHEAD
                    self._release(frame)
                    size += len(frame)
                    batch.append(frame)
                stream.write(batch[0] if len(batch) == 1 else b"".join(batch))
                await stream.drain()
        except Exception:  # the stream broke; _serve drops the member
            return

    # -- routing ------------------------------------------------------------------

    def _route(self, m: _Member, env: Envelope) -> None:
        if env.type == SUBSCRIBE:
            self._subscribe(m, subscription_type(env))
        elif env.type == UNSUBSCRIBE:
            self._unsubscribe(m, subscription_type(env))
        elif env.type.startswith(RESERVED_PREFIX):
            return
        else:
            targets = self._subs.get(env.type)
            if targets:
                self._fan_out(list(targets), env.frame)

    def _subscribe(self, m: _Member, t: str) -> None:
        if t in m.subs:
            return
        if len(m.subs) >= self.max_subscriptions:
            raise EnvelopeError("too-many-subscriptions", "subscription limit reached")
        if t not in self._subs and len(self._subs) >= self.max_types:
            raise EnvelopeError("too-many-types", "the hub's limit of distinct types is reached")
        m.subs.add(t)
        members = self._subs.setdefault(t, set())
        members.add(m)
        if len(members) == 1:
            self._announce(m, make_frame(SUBSCRIBE, {"type": t}))

    def _unsubscribe(self, m: _Member, t: str) -> None:
        if t not in m.subs:
            return
        m.subs.discard(t)
        members = self._subs.get(t)
        if members is None:
            return
        members.discard(m)
        if not members:
            del self._subs[t]
            self._announce(m, make_frame(UNSUBSCRIBE, {"type": t}))

    def _announce(self, m: _Member, frame: bytes) -> None:
        """Tell every member about ``m``'s change of what the hub routes (charged to ``m``)."""
        if not m.dropped:
            _sub_wait(m)  # (tops the allowance up)
            m.sub_tokens -= 1
        self._fan_out(list(self._members), frame)

    def _fan_out(self, members: list[_Member], frame: bytes) -> None:
        """Queue ``frame`` (a new one) for each of ``members`` that can take it."""
        queued = 0
        for m in members:
            if self._send(m, frame):
                queued += 1
        if queued:
            self._held[id(frame)] = [frame, queued]
            self._held_bytes += len(frame)
            if self._held_bytes > self.memory_limit:
                self._shed()

    def _send(self, m: _Member, frame: bytes) -> bool:
        if m.dropped:
            return False
        cost = len(frame) + FRAME_OVERHEAD
        if m.queued + cost > self.queue_limit:
            self._cut(m, "slow-consumer")
            return False
        m.queue.append(frame)
        m.queued += cost
        m.wakeup.set()
        return True

    def _release(self, frame: bytes) -> None:
        """One queue no longer holds ``frame``."""
        held = self._held[id(frame)]
        held[1] -= 1
        if not held[1]:
            del self._held[id(frame)]
            self._held_bytes -= len(frame)

    def _shed(self) -> None:
        """Over the hub's memory limit: cut the members with the longest queues until under it."""
        while self._held_bytes > self.memory_limit:
            # those that said goodbye first, then the longest queues
            live = [x for x in self._members | self._draining if not x.dropped and x.queued]
            if not live:
                return
            self._cut(max(live, key=lambda x: (x.draining, x.queued)), "slow-consumer")

    def _leave(self, m: _Member) -> None:
        """Take ``m`` out of the routing: no event reaches it any more. (Its last
        unsubscribes are announced to everyone; members that overflow on them are cut and
        left by ``_settle``, not from in here.)"""
        self._members.discard(m)
        m.snapshot.clear()
        for t in list(m.subs):
            try:
                self._unsubscribe(m, t)
            except EnvelopeError:  # pragma: no cover - types are checked when subscribed
                log.exception("control stream: could not announce an unsubscribe")

    def _cut(self, m: _Member, reason: str | None) -> None:
        """End ``m``'s stream and free its queue now; it leaves the routing in ``_settle``."""
        if m.dropped:
            return
        m.dropped = True
        self._draining.discard(m)
        for frame in m.queue:
            self._release(frame)
        m.queue.clear()
        m.queued = 0
        m.wakeup.set()
        self._doomed.append(m)
        if reason is not None:
            log.info("control stream closed remote_addr=%s user=%s reason=%s",
                     m.info.remote_address, _token(m.info.user), reason)
            m.stream.abort()
        else:
            try:
                m.stream.write_eof()  # a clean end at a frame boundary, not a reset
            except Exception:
                pass
            m.stream.close()

    def _settle(self) -> None:
        """Take every cut member out of the routing, one after another."""
        doomed = self._doomed
        while doomed:
            self._leave(doomed.popleft())

    def _drop(self, m: _Member, reason: str | None) -> None:
        self._cut(m, reason)
        self._settle()


def _sub_wait(m: _Member) -> float:
    """Top up ``m``'s allowance of announced subscription changes; how long to wait before
    reading it again (0: no wait)."""
    now = asyncio.get_running_loop().time()
    m.sub_tokens = min(SUB_BURST, m.sub_tokens + (now - m.sub_time) * SUB_RATE)
    m.sub_time = now
    return -m.sub_tokens / SUB_RATE if m.sub_tokens < 0 else 0.0


def _token(text: str) -> str:
    cleaned = "".join(c if c.isprintable() and not c.isspace() else "?" for c in text)
    return cleaned[:64] or "-"


# -- a hub on a plain TCP listener (SPEC §7: "any hub speaking this framing") -------


class _TCPMember(DuplexStream):
    def __init__(self, hub: Hub) -> None:
        super().__init__()
        self._hub = hub

    def connection_made(self, transport: Any) -> None:
        from .ssh.server import ConnectionInfo

        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        addr = str(peer[0]) if peer else "unknown"
        self._hub.add(self, ConnectionInfo(addr, "plain-tcp", "", ""))


async def listen_tcp(hub: Hub, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """Serve ``hub`` to plain TCP connections (no SSH): for port-forward setups and tests."""
    loop = asyncio.get_running_loop()
    # DuplexStream implements asyncio.Protocol's methods without subclassing it
    return await loop.create_server(lambda: cast(asyncio.Protocol, _TCPMember(hub)), host, port)


async def _main(host: str, port: int) -> None:
    import signal

    hub = Hub()
    server = await listen_tcp(hub, host, port)
    for sock in server.sockets:
        addr = sock.getsockname()
        print(f"wraith hub: listening {addr[0]}:{addr[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await hub.close()


def main(argv: list[str] | None = None) -> int:
    from .addr import parse_hostport
    from .logs import setup_logging

    p = argparse.ArgumentParser(prog="python -m wraith_core.bus",
                                description="a standalone event hub on a plain TCP port (loopback by default)")
    p.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    args = p.parse_args(argv)
    host, port = parse_hostport(args.listen, "--listen", default_host="127.0.0.1", allow_zero=True)
    setup_logging()
    asyncio.run(_main(host, port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
