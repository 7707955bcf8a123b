"""Channel manager: direct-tcpip, streamlocal and tcpip-forward on the session.

Opening a direct-tcpip channel is the per-connection hot path (every SOCKS
request, every ``-L`` connection): ``start_socket_open`` sends the CHANNEL_OPEN at
once on a SocketChannel, whose answer is handled the moment it is read. In-process
streams (``open_relay``) keep asyncssh's channel object, opened the same way by
callback (``start_open``); if asyncssh's internals are not what this expects,
asyncssh's ``create_connection`` is used instead. Remote forwards' opens for our
own listeners are dialed straight into a SocketChannel (``_forwarded_open``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any, Protocol, cast

import asyncssh
from asyncssh.constants import MSG_CHANNEL_OPEN
from asyncssh.packet import String, UInt32

from ..addr import ForwardSpec
from ..dial import DialError, dial, reply_for_reason
from ..duplex import DuplexStream
from ..errors import ChannelError
from ..logs import peer_text
from ..protocol.socks5 import Reply
from ..relay import RelayEnd, spawn
from . import target_open
from .client import Session, jittered
from .internals import has_names, next_channel_number, release
from .socket_channel import SocketChannel


# local dials in flight for remote forwards, per SSH connection (the server sends the opens)
MAX_FORWARD_DIALS = 256
# a remote forward the server refused is asked for again after 1 s, 2 s, 4 s … 30 s (jittered)
REFORWARD_START = 1.0
REFORWARD_MAX = 30.0


class ChannelEnd(Protocol):
    """What runs on an asyncssh channel as its session: a relay end (``RelayEnd``), a
    stream (``DuplexStream``, the daemon's ``ChannelStream``) — asyncssh's session
    callbacks, plus ``abort`` to tear it down."""

    def connection_made(self, transport: Any) -> None: ...
    def session_started(self) -> None: ...
    def data_received(self, data: bytes, datatype: Any = None) -> None: ...
    def eof_received(self) -> bool: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...
    def connection_lost(self, exc: BaseException | None) -> None: ...
    def abort(self) -> None: ...

log = logging.getLogger("wraith.channels")

_REPLY_CODES = {
    Reply.CONNECTION_REFUSED: "ECONNREFUSED",
    Reply.HOST_UNREACHABLE: "EHOSTUNREACH",
    Reply.NETWORK_UNREACHABLE: "ENETUNREACH",
    Reply.NOT_ALLOWED: "EPROHIBITED",
    Reply.GENERAL_FAILURE: "ECHANNEL",
}


# A channel open waits for the server's answer this long past the connect timeout (the
# server's own dial to the target is bounded by its connect timeout).
OPEN_SLACK = 10.0


class ChannelOpenFailed(ChannelError):
    def __init__(self, message: str, reply: Reply, code: str | None = None) -> None:
        super().__init__(message, code or _REPLY_CODES.get(reply, "ECHANNEL"))
        self.reply = reply


def _failure(exc: asyncssh.ChannelOpenError) -> ChannelOpenFailed:
    prohibited = exc.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
    reply = reply_for_reason(exc.reason, prohibited)
    return ChannelOpenFailed(f"channel open failed: {peer_text(exc.reason)}", reply)


OpenDone = Callable[[ChannelOpenFailed | None], None]

# what a SocketChannel uses on asyncssh's connection
_SOCKET_NAMES = ("add_channel", "_update_recv_pktlen", "_channels", "_transport", "send_packet")


def open_answer(done: OpenDone, exc: BaseException | None) -> None:
    """A SocketChannel's open answer (None, or what went wrong) as ``done`` expects it."""
    if exc is None:
        done(None)
    elif isinstance(exc, asyncssh.ChannelOpenError):
        done(_failure(exc))
    elif isinstance(exc, (ConnectionError, asyncssh.Error)):  # the session went away
        done(ChannelOpenFailed(f"channel open failed: {exc}", Reply.GENERAL_FAILURE, "ESESSION"))
    else:
        done(ChannelOpenFailed(f"channel open failed: {exc}", Reply.GENERAL_FAILURE))

# what start_open relies on in asyncssh's channel objects
_CHANNEL_NAMES = ("_open_waiter", "_recv_chan", "_recv_window", "_recv_pktsize", "_recv_paused",
                  "_flush_recv_buf", "_session", "process_open_confirmation", "set_extra_info")


class _OpenWaiter:
    """Stands in for the future asyncssh resolves when the peer answers our
    CHANNEL_OPEN (``set_result`` / ``set_exception``): the answer is handled
    right away, not by waking a task on the next loop pass."""

    __slots__ = ("_callback",)

    def __init__(self, callback: Callable[[Any, BaseException | None], None]) -> None:
        self._callback: Callable[[Any, BaseException | None], None] | None = callback

    def cancelled(self) -> bool:
        return False

    def set_result(self, packet: Any) -> None:
        self._fire(packet, None)

    def set_exception(self, exc: BaseException) -> None:
        self._fire(None, exc)

    def _fire(self, packet: Any, exc: BaseException | None) -> None:
        callback, self._callback = self._callback, None
        if callback is not None:
            callback(packet, exc)


def _opened(chan: Any, end: ChannelEnd, done: OpenDone, packet: Any, exc: BaseException | None) -> None:
    """The peer answered our CHANNEL_OPEN (runs inside asyncssh's packet handling: never raise)."""
    failure: ChannelOpenFailed | None = None
    if isinstance(exc, asyncssh.ChannelOpenError):
        failure = _failure(exc)
    elif exc is not None:
        failure = ChannelOpenFailed(f"channel open failed: {exc}", Reply.GENERAL_FAILURE, "ESESSION")
    elif packet is None or packet.get_remaining_payload():
        # a forward channel's confirmation carries nothing more (asyncssh checks the same)
        failure = ChannelOpenFailed("channel open failed: malformed confirmation", Reply.GENERAL_FAILURE)
    try:
        if exc is None and failure is not None:
            chan.close()
        if failure is None:
            # what asyncssh does once a forward channel is open: attach the session,
            # start it, and start reading unless the session paused the channel
            chan._session = end
            end.connection_made(chan)
            end.session_started()
            if chan._recv_paused == "starting":
                chan._recv_paused = False
                chan._flush_recv_buf()
        done(failure)
    except Exception:
        log.exception("channel open handler failed")
        chan.abort()


# asyncssh numbers a new channel with the first free number from ``_next_recv_chan``
# (``add_channel``). Knowing it in advance lets the CHANNEL_OPEN go out before the
# channel object is built — that construction then overlaps the server's work. Every
# open checks the number it got; the first one builds first and checks before sending.
_PREDICT_NAMES = ("_next_recv_chan", "_channels", "_transport", "abort")
_prediction_checked = [False]


def _send_open(conn: Any, number: int, window: int, pktsize: int, host: str, port: int) -> None:
    conn.send_packet(MSG_CHANNEL_OPEN, String(b"direct-tcpip"), UInt32(number), UInt32(window),
                     UInt32(pktsize), String(host), UInt32(port), String(""), UInt32(0))


class ChannelManager:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.remote_forwards: list[ForwardSpec] = []
        session.up_hooks.append(self._request_remote_forwards)

    @property
    def _window(self) -> dict[str, Any]:
        o = self.session.options
        return {"window": o.window, "max_pktsize": o.max_pktsize}

    async def _conn(self) -> asyncssh.SSHClientConnection:
        try:
            return await self.session.connection()
        except ChannelError as exc:
            raise ChannelOpenFailed(str(exc), Reply.GENERAL_FAILURE, "ESESSION") from None

    async def wait_session(self) -> None:
        """Until the session is up (ChannelOpenFailed, ESESSION, if it does not come back)."""
        await self._conn()

    def start_open(self, end: ChannelEnd, host: str, port: int, done: OpenDone) -> bool:
        """Send a direct-tcpip CHANNEL_OPEN for ``host:port`` now; ``end`` runs on the
        channel once it is open and ``done(None)`` is called, or ``done(failure)``.
        False (nothing sent, ``done`` never called) when the session is down or
        asyncssh's internals are unexpected: use :meth:`open_relay` then."""
        conn = self.session.conn
        if conn is None or not has_names(conn, _PREDICT_NAMES) or not conn._transport:
            return False
        opts = self.session.options
        window, pktsize = opts.window, opts.max_pktsize
        number = next_channel_number(conn)
        early = _prediction_checked[0]
        if early:  # the packet first, the channel object while the server works on it
            _send_open(conn, number, window, pktsize, host, port)
        try:
            chan: Any = conn.create_tcp_channel(window=window, max_pktsize=pktsize)
        except asyncssh.ChannelOpenError:
            if early:  # cannot happen: the transport was checked above and nothing ran since
                conn.abort()
            return False  # the connection is closing; open_relay waits for the next one
        if (not has_names(chan, _CHANNEL_NAMES) or chan._recv_chan != number
                or (chan._recv_window, chan._recv_pktsize) != (window, pktsize)):
            release(chan)
            if early:  # an OPEN went out for a number that is not this channel's: never leave that
                log.error("channel number prediction failed: closing the session")
                conn.abort()
            return False
        chan.set_extra_info(peername=("", 0), local_peername=("", 0), remote_peername=(host, port))
        chan._open_waiter = _OpenWaiter(functools.partial(_opened, chan, end, done))
        if not early:  # the first open: the prediction held, so later opens send first
            _send_open(conn, number, window, pktsize, host, port)
            _prediction_checked[0] = True
        return True

    def start_socket_open(self, host: str, port: int, done: OpenDone) -> SocketChannel | None:
        """Send a direct-tcpip CHANNEL_OPEN for ``host:port`` on a :class:`SocketChannel`
        (the socket joins it once open); ``done(None)`` or ``done(failure)`` when the
        server answers. None (nothing sent, ``done`` never called) when the session is down
        or asyncssh's internals are unexpected."""
        conn = self.session.conn
        if conn is None or not has_names(conn, _SOCKET_NAMES) or not conn._transport:
            return None
        opts = self.session.options
        try:
            chan = SocketChannel(conn, opts.window, opts.max_pktsize, functools.partial(open_answer, done))
        except asyncssh.ChannelOpenError:  # the connection is closing
            return None
        _send_open(conn, chan.recv_chan, opts.window, opts.max_pktsize, host, port)
        return chan

    async def open_relay(self, end: ChannelEnd, host: str, port: int) -> None:
        """Open a direct-tcpip channel to ``host:port`` running ``end``."""
        conn = await self._conn()
        answer: asyncio.Future[ChannelOpenFailed | None] = asyncio.get_running_loop().create_future()

        def done(failure: ChannelOpenFailed | None) -> None:
            if not answer.done():
                answer.set_result(failure)
            elif failure is None:
                end.abort()  # the caller gave up meanwhile: do not leave the channel open

        if self.session.conn is conn and self.start_open(end, host, port, done):
            wait = self.session.options.connect_timeout + OPEN_SLACK
            try:
                failure = await asyncio.wait_for(answer, wait)
            except asyncio.TimeoutError:  # a late answer then finds `answer` done: its channel is closed
                raise ChannelOpenFailed(f"the server did not answer the channel open within {wait:g} s",
                                        Reply.GENERAL_FAILURE, "ETIMEDOUT") from None
            if failure is not None:
                raise failure
            return
        try:
            # (asyncssh types its session factories by its own classes; ``end`` has their methods)
            await conn.create_connection(cast(Any, lambda: end), host, port, **self._window)
        except asyncssh.ChannelOpenError as exc:
            raise _failure(exc) from None
        except (asyncssh.Error, OSError) as exc:
            raise ChannelOpenFailed(f"channel open failed: {exc}", Reply.GENERAL_FAILURE, "ESESSION") from None

    async def open_stream(self, host: str, port: int) -> DuplexStream:
        stream = DuplexStream(info={"target": (host, port)})
        await self.open_relay(stream, host, port)
        return stream

    async def open_unix_relay(self, end: ChannelEnd, path: str) -> None:
        """Open a streamlocal channel (a Unix socket on the server) running ``end``."""
        conn = await self._conn()
        try:
            await conn.create_unix_connection(cast(Any, lambda: end), path, **self._window)
        except asyncssh.ChannelOpenError as exc:
            raise _failure(exc) from None
        except (asyncssh.Error, OSError) as exc:
            raise ChannelOpenFailed(f"channel open failed: {exc}", Reply.GENERAL_FAILURE, "ESESSION") from None

    # -- remote forwards (-R) ------------------------------------------------------

    def add_remote_forward(self, spec: ForwardSpec) -> None:
        self.remote_forwards.append(spec)

    async def _request_remote_forwards(self, conn: asyncssh.SSHClientConnection) -> None:
        granted: dict[tuple[str, int], ForwardSpec] = {}  # (listen host, port) -> where it goes
        # the server decides how many forwarded connections arrive: bound the dials in flight
        budget = target_open.DialBudget(MAX_FORWARD_DIALS)
        if self.remote_forwards and has_names(conn, _SOCKET_NAMES):
            conn.wraith_open = functools.partial(self._forwarded_open, conn, granted, budget)  # type: ignore[attr-defined]
        refused = [spec for spec in self.remote_forwards
                   if not await self._request_remote_forward(conn, spec, granted, budget, first=True)]
        if refused:
            spawn(self._retry_remote_forwards(conn, refused, granted, budget))

    async def _request_remote_forward(self, conn: asyncssh.SSHClientConnection, spec: ForwardSpec,
                                      granted: dict[tuple[str, int], ForwardSpec],
                                      budget: target_open.DialBudget, first: bool) -> bool:
        try:
            listener = await conn.create_server(self._forward_factory(spec, budget), spec.bind_host,
                                                spec.bind_port, **self._window)
        except Exception as exc:  # asyncssh raises ChannelListenError, OSError, …
            log.log(logging.WARNING if first else logging.DEBUG,
                    "remote forward refused by server listen=%s:%d (%s)%s", spec.bind_host, spec.bind_port,
                    peer_text(str(getattr(exc, "reason", exc))), "; asking again while the session lasts"
                    if first else "")
            return False
        granted[(spec.bind_host, listener.get_port())] = spec
        log.info("remote forward up listen=%s:%d", spec.bind_host, spec.bind_port)
        return True

    async def _retry_remote_forwards(self, conn: asyncssh.SSHClientConnection, refused: list[ForwardSpec],
                                     granted: dict[tuple[str, int], ForwardSpec],
                                     budget: target_open.DialBudget) -> None:
        """Ask again for the forwards the server refused, with backoff, while this session
        lasts. The server gives no reason, and a common one is passing: after a reconnect the
        old session may still hold the port until the server notices it is gone."""
        delay = REFORWARD_START
        while refused:
            await asyncio.sleep(jittered(delay))
            if conn.is_closed() or self.session.conn is not conn:
                return
            refused = [spec for spec in refused
                       if not await self._request_remote_forward(conn, spec, granted, budget, first=False)]
            delay = min(delay * 2, REFORWARD_MAX)

    def _forwarded_open(self, conn: Any, granted: dict[tuple[str, int], ForwardSpec], budget: target_open.DialBudget,
                        plain: bytes, end: int) -> bool:
        """A ``forwarded-tcpip`` open for one of our remote forwards, from the decrypted packet
        (lean_recv calls this): the local target is dialed straight into a SocketChannel. False
        (anything else, or a listener we do not know): asyncssh's own path decides."""
        fields = target_open.parse_open(plain, end, b"forwarded-tcpip")
        if fields is None:
            return False
        send_chan, send_window, send_pktsize, host, port = fields
        spec = granted.get((host, port))
        if spec is None or not budget.take():
            return False  # (asyncssh's path: the factory refuses it when over budget)
        opts = self.session.options
        pending, _ = target_open.pending_dial(conn, spec.host, spec.port, opts.connect_timeout, opts.window,
                                              opts.max_pktsize, None, budget) or (None, None)
        if pending is None:
            budget.give()
            return False
        pending.process_open(send_chan, send_window, send_pktsize, None)
        return True

    def _forward_factory(self, spec: ForwardSpec, budget: target_open.DialBudget) -> Any:
        timeout = self.session.options.connect_timeout

        def factory(orig_host: str, orig_port: int) -> Any:
            return _dial_local(spec.host, spec.port, timeout, budget)

        return factory


async def _dial_local(host: str, port: int, timeout: float, budget: target_open.DialBudget) -> RelayEnd:
    if not budget.take():
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_RESOURCE_SHORTAGE, "Too many connects in progress")
    sock_end, chan_end = RelayEnd.pair()
    try:
        await dial(sock_end, host, port, timeout)
    except DialError as exc:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, exc.reason) from None
    except Exception:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Connection failed") from None
    finally:
        budget.give()
    return chan_end


