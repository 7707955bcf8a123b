"""One WebSocket per stream: the daemon's IPC server (docs/ipc.md).

Each WebSocket starts with an ``open`` message and then is one thing: a
stream (``connect`` / ``accept``), the control of a server (``serve``) or the
events feed (``events``). Bad input on one WebSocket closes only that one.

Backpressure, end to end:
* client -> SSH: the next WebSocket message is read only after the previous
  data was accepted by the channel (``await drain()``); websockets' receive
  queue is bounded (``max_queue``) and then stops reading the socket;
* SSH -> client: ``await ws.send()`` blocks while the WebSocket's write buffer
  is above ``write_limit``; meanwhile the channel is not read, its bounded
  receive buffer fills and pauses the SSH window.

What a client can make the daemon hold in messages (size limits, one budget for
large frames) is inflow.py's business.
"""

from __future__ import annotations

import asyncio
import secrets
import collections
import hmac
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve, unix_serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State
from websockets.http11 import Request, Response

from ..addr import parse_hostport
from ..duplex import DuplexStream, StreamClosedError
from ..errors import WraithError
from ..options import ConnectOptions, ServeOptions
from ..protocol import ipc
from ..protocol.frame_input import chunked_frame_input
from . import inflow
from .errors import map_error
from .events import EventBus, Feed
from .inflow import InputBudget, InputGate
from .paths import FileIdentity, WsEndpoint, bind_unix_socket, file_identity, remove_if_same
from .pool import SessionPool

log = logging.getLogger("wraith.daemon")

OPEN_TIMEOUT = 10.0
ACCEPT_TIMEOUT = 30.0
ABORT_CODE = 4000
SHUTDOWN_GRACE = 1.5
FLUSH_TIMEOUT = 30.0
PEER_CLOSE_GRACE = 30.0
CHANNEL_HIGH_WATER = 2 * 1024 * 1024
SOCKET_BUFFER = 1024 * 1024
STREAM_LIMIT = 2 * 1024 * 1024  # receive buffer per stream (pauses the SSH channel above it)
FEED_PIECE = ipc.DATA_CHUNK  # a large client message goes into the channel this much at a time
ACCEPT_BACKLOG = 4096
MAX_CONNECTIONS = 4096  # WebSockets at once (each costs a descriptor and its buffers); more: HTTP 503
MAX_PENDING_INCOMING = 1024  # per serve control: incoming streams waiting to be accepted
WS_SETTINGS: dict[str, Any] = {
    "compression": None,             # no permessage-deflate: bytes are opaque, CPU matters
    # the control limit until a stream is open (inflow.open_stream raises it to 16 MiB):
    # a client must not make us hold 16 MiB before it even said what it wants
    "max_size": ipc.MAX_CONTROL_MESSAGE,
    "max_queue": 1,                  # received messages held before we stop reading the socket
    "write_limit": 2 * 1024 * 1024,  # send() waits above this much unsent data
    "ping_interval": None,           # local socket; a stream under backpressure may sit for long
    "ping_timeout": None,
    "close_timeout": 5,
}


def _deepen_socket_buffers(ws: ServerConnection) -> None:
    """A Unix socket's default ~200 KiB buffer makes daemon and client hand over data in many
    small steps; with four busy processes on two cores every step costs a scheduling delay
    (measured: the daemon spent ~75% of a download waiting in drain). 1 MiB each way is
    enough; it only fills when the reader is slow, so it stays a fixed per-stream cost."""
    sock = ws.transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    except OSError:
        pass


def _peer_uid(connection: ServerConnection) -> int | None:
    sock = connection.transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return int(struct.unpack("3i", raw)[1])


class IPCServer:
    def __init__(self, endpoint: WsEndpoint, bus: EventBus, pool: SessionPool,
                 token: str | None = None) -> None:
        self.endpoint = endpoint
        self.bus = bus
        self.pool = pool
        self.token = token
        self.server: Server | None = None
        self.bound: WsEndpoint = endpoint
        self._n = 0
        self.incoming: dict[str, _Pending] = {}
        self.servers: set[Any] = set()
        self.connections: set[ServerConnection] = set()
        self.gates: dict[ServerConnection, InputGate | None] = {}
        self.budget = InputBudget()
        self.streams = 0
        self.closing = False
        self._socket_id: FileIdentity | None = None

    def _id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    # -- listening ---------------------------------------------------------------

    async def start(self) -> None:
        ep = self.endpoint
        # a deep accept queue: a burst of connects (a program opening 1000 streams at once)
        # would find the default (100) full, and a full Unix socket queue fails at once (EAGAIN)
        kw = dict(WS_SETTINGS, process_request=self._check_request, server_header=None, backlog=ACCEPT_BACKLOG)
        if ep.kind == "unix":
            # bound here, not by asyncio (which unlinks whatever is at the path first)
            sock = bind_unix_socket(ep.path)
            try:
                self._socket_id = file_identity(ep.path)
                self.server = await unix_serve(self._handle, sock=sock, **kw)
            except BaseException:
                sock.close()
                if self._socket_id is not None:
                    remove_if_same(ep.path, self._socket_id)
                raise
        else:
            self.server = await serve(self._handle, ep.host, ep.port, **kw)
            sock = next(iter(self.server.sockets))
            self.bound = WsEndpoint("tcp", host=ep.host, port=sock.getsockname()[1])

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if len(self.connections) >= MAX_CONNECTIONS:
            log.warning("ipc: %d WebSockets open; refused another", len(self.connections))
            return connection.respond(503, f"the daemon has {MAX_CONNECTIONS} connections open\n")
        if "Origin" in request.headers:
            log.warning("ipc: refused a request with an Origin header")
            return connection.respond(403, "Origin header not allowed: the wraith daemon is not for browsers\n")
        if self.endpoint.kind == "tcp":
            values = request.headers.get_all("Authorization")  # exactly one: .get() raises on two
            auth = values[0] if len(values) == 1 else ""
            want = f"Bearer {self.token}"
            if not self.token or not auth or not hmac.compare_digest(auth.encode(), want.encode()):
                log.warning("ipc: refused a request without the right bearer token")
                return connection.respond(401, "missing or wrong bearer token\n")
        else:
            uid = _peer_uid(connection)
            if uid is not None and uid not in (os.getuid(), 0):
                log.warning("ipc: refused a connection from uid %d", uid)
                return connection.respond(403, "wrong user\n")
        return None

    async def close(self) -> None:
        self.closing = True
        for p in list(self.incoming.values()):
            p.abort()
        self.incoming.clear()
        if self.server is not None:
            # every WebSocket first (close 1001: "shutting down"); the servers after, so that
            # an accepted stream hears 1001, not the ECONNRESET of its session ending under it
            self.server.close(close_connections=True)
            try:
                await asyncio.wait_for(asyncio.shield(self.server.wait_closed()), SHUTDOWN_GRACE)
            except asyncio.TimeoutError:
                # a client that does not answer the closing handshake: cut it off
                for ws in list(self.connections):
                    ws.transport.abort()
                try:
                    await asyncio.wait_for(self.server.wait_closed(), 3)
                except asyncio.TimeoutError:
                    pass
        for srv in list(self.servers):  # each serve control closes its own; what is left
            try:
                await srv.close()
            except Exception:
                pass
        if self.endpoint.kind == "unix" and self._socket_id is not None:
            # only the socket we bound: a daemon that replaced us there keeps its own
            remove_if_same(self.endpoint.path, self._socket_id)

    # -- one WebSocket -------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        _deepen_socket_buffers(ws)
        chunked_frame_input(ws)
        gate = inflow.install(ws, self.budget)
        self.gates[ws] = gate
        self.connections.add(ws)
        try:
            await self._handle_one(ws)
        finally:
            self.connections.discard(ws)
            self.gates.pop(ws, None)
            if gate is not None:
                gate.close()

    def _consumed(self, ws: ServerConnection) -> None:
        gate = self.gates.get(ws)
        if gate is not None:
            gate.consumed()

    def _open_stream(self, ws: ServerConnection) -> None:
        """Before ``opened`` of a connect/accept stream: data messages may come now."""
        inflow.open_stream(ws, self.gates.get(ws))

    async def _handle_one(self, ws: ServerConnection) -> None:
        try:
            raw = await asyncio.wait_for(ws.recv(), OPEN_TIMEOUT)
        except asyncio.TimeoutError:
            await _fail(ws, "EPROTO", f"no open message within {OPEN_TIMEOUT:.0f} s", 1002)
            return
        except ConnectionClosed:
            return
        self._consumed(ws)
        try:
            msg = ipc.decode_client(raw)
            if not isinstance(msg, ipc.Open):
                raise ipc.IPCError(f"the first message must be 'open', not {ipc.shown(msg.type)}")
        except ipc.IPCError as exc:
            log.info("ipc: protocol error: %s", exc)
            await _fail(ws, exc.code, str(exc), 1002 if exc.code == "EPROTO" else 1000)
            return
        handler: Callable[[ServerConnection, ipc.Open], Awaitable[None]] = {
            "connect": self._connect, "serve": self._serve,
            "accept": self._accept, "events": self._events,
        }[msg.kind]
        try:
            await handler(ws, msg)
        except ConnectionClosed:
            pass
        except ipc.IPCError as exc:
            await _fail(ws, exc.code, str(exc), 1002 if exc.code == "EPROTO" else 1000)
        except WraithError as exc:
            await _fail(ws, exc.code, str(exc), 1000)
        except Exception as exc:  # a bug must cost one WebSocket, not the daemon
            log.exception("ipc: internal error")
            await _fail(ws, "EDAEMON", f"internal error: {type(exc).__name__}", 1011)

    # -- connect -----------------------------------------------------------------

    async def _connect(self, ws: ServerConnection, msg: ipc.Open) -> None:
        fields, target = ipc.connect_fields(msg.options)
        for name in ("window", "max_pktsize"):
            value = fields.get(name)
            if isinstance(value, int) and value > ipc.MAX_DAEMON_WINDOW:
                raise ipc.IPCError(f"option {name!r} is at most {ipc.MAX_DAEMON_WINDOW} through the daemon",
                                   "EUSAGE")
        try:
            host, port = parse_hostport(target, "target", allow_zero=True)
            opts = ConnectOptions(socks5=None, **fields)
        except WraithError as exc:
            raise map_error(exc) from None
        except TypeError as exc:  # pragma: no cover - the option table matches the dataclass
            raise ipc.IPCError(str(exc), "EUSAGE") from None
        try:
            entry, pooled = await self.pool.acquire(opts)
        except WraithError as exc:
            raise map_error(exc) from None
        try:
            assert entry.manager is not None
            stream = ChannelStream(limit=STREAM_LIMIT, info={"target": (host, port)})
            try:
                await entry.manager.open_relay(stream, host, port)
            except WraithError as exc:
                raise map_error(exc, "ECHANNEL") from None
            sid = self._id("s")
            self._open_stream(ws)
            try:
                await ws.send(ipc.encode(ipc.Opened("connect", sid, {
                    "target": target, "session": entry.id, "pooled": pooled})))
            except BaseException:  # the client left while we were opening: nobody wants it
                stream.abort()
                raise
            await self._run_stream(ws, stream, sid, "connect", entry.id)
        finally:
            entry.release()

    async def _run_stream(self, ws: ServerConnection, stream: DuplexStream, sid: str, kind: str,
                          session: str | None) -> None:
        extra = {"session": session} if session else {}
        self.bus.publish("stream.opened", stream=sid, kind=kind, **extra)
        self.streams += 1
        pump = _Pump(ws, stream, server_side=(kind == "accept"), gate=self.gates.get(ws))
        try:
            clean = await pump.run()
        finally:
            self.streams -= 1
        self.bus.publish("stream.closed", stream=sid, clean=clean)

    # -- serve / accept ------------------------------------------------------------

    async def _serve(self, ws: ServerConnection, msg: ipc.Open) -> None:
        from ..server_api import WraithServer

        fields = ipc.serve_fields(msg.options)
        try:
            opts = ServeOptions(**fields)
            opts.drain_time = min(opts.drain_time, 0.5)
            server = WraithServer(opts, use_hub=False)
        except WraithError as exc:
            raise map_error(exc, "ESERVE") from None
        srv_id = self._id("srv")
        mine: set[str] = set()  # our incoming streams not yet accepted (nor expired)
        backlog: collections.deque[str] = collections.deque()  # ids not yet announced
        more = asyncio.Event()

        def on_connection(stream: DuplexStream, info: Any) -> None:
            if self.closing:
                stream.abort()
                return
            if len(mine) >= MAX_PENDING_INCOMING:
                # the control does not accept (or read) them: each one holds a window of bytes
                log.warning("ipc: server %s has %d incoming streams waiting; refused another",
                            srv_id, len(mine))
                stream.abort()
                return
            # The id is the capability to accept: unguessable, and told only to this serve
            # control. Events name the stream by a number that grants nothing.
            label = self._id("in")
            in_id = label + "-" + secrets.token_urlsafe(18)
            d = {"remoteAddress": info.remote_address, "transport": info.transport,
                 "user": info.user, "keyFingerprint": info.key_fingerprint}
            loop = asyncio.get_running_loop()
            timer = loop.call_later(ACCEPT_TIMEOUT, self._expire, in_id)
            self.incoming[in_id] = _Pending(stream, d, timer, mine)
            mine.add(in_id)
            self.bus.publish("server.incoming", server=srv_id, stream=label, info=d)
            if len(backlog) >= MAX_PENDING_INCOMING:
                # a control that stopped reading: forget the announcements of streams that
                # expired meanwhile (at most len(mine) < MAX_PENDING_INCOMING are left)
                live = [i for i in backlog if i in mine]
                backlog.clear()
                backlog.extend(live)
            backlog.append(in_id)
            more.set()

        server.on_connection(on_connection)
        try:
            await server.start()
        except WraithError as exc:
            await server.close()
            raise map_error(exc, "ESERVE") from None
        self.servers.add(server)
        addresses = server.addresses()
        log.info("ipc: server %s listening", srv_id)
        try:
            await ws.send(ipc.encode(ipc.Opened("serve", srv_id, {"addresses": addresses})))
            self.bus.publish("server.listening", server=srv_id, addresses=addresses)

            async def announce() -> None:
                while True:
                    while not backlog:
                        more.clear()
                        await more.wait()
                    in_id = backlog.popleft()
                    p = self.incoming.get(in_id)
                    if p is not None:  # not expired while it waited to be told
                        await ws.send(ipc.encode(ipc.Incoming(in_id, p.info)))

            sender = asyncio.get_running_loop().create_task(announce())
            try:
                async for raw in ws:
                    try:
                        m = ipc.decode_client(raw)
                    except ipc.IPCError as exc:
                        await _fail(ws, exc.code, str(exc), 1002)
                        break
                    await _fail(ws, "EPROTO", f"a serve control takes no {ipc.shown(m.type)} messages", 1002)
                    break
            finally:
                _stop(sender)
        finally:
            self.servers.discard(server)
            for in_id in list(mine):
                p = self.incoming.pop(in_id, None)
                if p is not None:
                    p.abort()
            mine.clear()
            await server.close()
            self.bus.publish("server.closed", server=srv_id)
            log.info("ipc: server %s closed", srv_id)

    def _expire(self, in_id: str) -> None:
        p = self.incoming.pop(in_id, None)
        if p is not None:
            log.info("ipc: incoming stream %s not accepted in time", in_id.split("-", 1)[0])
            p.abort()
            p.owner.discard(in_id)

    async def _accept(self, ws: ServerConnection, msg: ipc.Open) -> None:
        assert msg.id is not None
        p = self.incoming.pop(msg.id, None)
        if p is None:
            raise ipc.IPCError(f"no incoming stream {ipc.shown(msg.id)} waits to be accepted", "EUSAGE")
        p.timer.cancel()
        p.owner.discard(msg.id)
        if type(p.stream) is DuplexStream:
            ChannelStream.adopt(p.stream)  # same layout; flow control that holds (see above)
        self._open_stream(ws)
        try:
            await ws.send(ipc.encode(ipc.Opened("accept", msg.id, {"info": p.info})))
        except BaseException:
            p.stream.abort()
            raise
        await self._run_stream(ws, p.stream, msg.id, "accept", None)

    # -- events ----------------------------------------------------------------------

    async def _events(self, ws: ServerConnection, msg: ipc.Open) -> None:
        feed = Feed(msg.topics)
        self.bus.feeds.add(feed)
        try:
            await ws.send(ipc.encode(ipc.Opened("events", self._id("e"))))

            async def forward() -> None:
                while True:
                    ev = await feed.queue.get()
                    await ws.send(ipc.encode({"type": "event", **ev}))

            sender = asyncio.get_running_loop().create_task(forward())
            try:
                async for raw in ws:
                    await _fail(ws, "EPROTO", "the events feed takes no messages", 1002)
                    break
            finally:
                _stop(sender)
        finally:
            self.bus.feeds.discard(feed)


class _Chunks:
    """A receive buffer of whole chunks (no copying on the way in or out)."""

    __slots__ = ("chunks", "size")

    def __init__(self) -> None:
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return self.size > 0

    def __iadd__(self, data: bytes) -> _Chunks:
        if data:
            self.chunks.append(data if type(data) is bytes else bytes(data))
            self.size += len(data)
        return self

    def take(self, n: int) -> bytes:
        """Up to ``n`` bytes: the first chunk, or a part of it."""
        chunk = self.chunks[0]
        if len(chunk) <= n:
            self.chunks.popleft()
        else:
            self.chunks[0] = chunk[n:]
            chunk = chunk[:n]
        self.size -= len(chunk)
        return chunk

    def take_many(self, n: int) -> list[bytes]:
        """Whole chunks adding up to at most ``n`` bytes (at least one, maybe cut)."""
        out = [self.take(n)]
        left = n - len(out[0])
        chunks = self.chunks
        while chunks and len(chunks[0]) <= left:
            c = chunks.popleft()
            self.size -= len(c)
            left -= len(c)
            out.append(c)
        return out

    def clear(self) -> None:
        self.chunks.clear()
        self.size = 0


class ChannelStream(DuplexStream):
    """A DuplexStream whose flow control holds with asyncssh's window accounting.

    asyncssh sends a window adjust (back to the full window) whenever it
    delivers a buffered packet, however much is still buffered behind it. A
    protocol that pauses again after one packet of a resume-flush therefore
    lets the sender add up to a window per resume: memory grows without bound
    under a slow reader (measured: 700 MB for one stream). So: during the flush
    that ``resume_reading()`` runs, take everything asyncssh holds, and pause
    only afterwards. Bound: ``limit / 2`` + one SSH window per stream.

    The receive buffer keeps asyncssh's packets as they are (no bytearray
    copies); ``read(n)`` returns at most one packet.
    """

    _flushing = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._buf = _Chunks()  # type: ignore[assignment]

    @classmethod
    def adopt(cls, stream: DuplexStream) -> ChannelStream:
        """Turn a plain DuplexStream (e.g. an incoming one) into a ChannelStream, keeping its bytes."""
        old = bytes(stream._buf)
        stream.__class__ = cls
        buf = _Chunks()
        buf += old
        stream._buf = buf  # type: ignore[assignment]
        return stream  # type: ignore[return-value]

    def write(self, data: bytes | bytearray | memoryview) -> None:
        # asyncssh copies what it is given before write() returns: no bytes() copy first
        if self._transport is None or self._closed.done():
            raise StreamClosedError("stream is closed")
        self._transport.write(data)

    def data_received(self, data: bytes, datatype: Any = None) -> None:
        self._buf += data
        self._wake_reader()
        if (not self._read_paused and not self._flushing and len(self._buf) > self._limit
                and self._transport is not None):
            self._read_paused = True
            self._transport.pause_reading()

    def _maybe_resume(self) -> None:
        if self._read_paused and len(self._buf) <= self._limit // 2 and self._transport is not None:
            self._read_paused = False
            self._flushing = True
            try:
                self._transport.resume_reading()
            finally:
                self._flushing = False
            if len(self._buf) > self._limit and not self._read_paused:
                self._read_paused = True
                self._transport.pause_reading()

    async def read(self, n: int = -1) -> bytes:
        if n < 0:
            return await super().read(n)  # loops over read(limit)
        if n == 0:
            return b""
        await self._wait_data()
        if not self._buf:
            if self._exc is not None:
                raise self._exc
            return b""
        data = self._buf.take(n)  # type: ignore[attr-defined]
        self._maybe_resume()
        return data

    async def read_chunks(self, n: int) -> list[bytes]:
        """Whole received packets adding up to at most ``n`` bytes; ``[]`` at EOF."""
        await self._wait_data()
        if not self._buf:
            if self._exc is not None:
                raise self._exc
            return []
        chunks = self._buf.take_many(n)  # type: ignore[attr-defined]
        self._maybe_resume()
        return chunks


class _Pending:
    """An incoming stream waiting to be accepted; ``owner``: its serve control's set of such ids."""

    __slots__ = ("stream", "info", "timer", "owner")

    def __init__(self, stream: DuplexStream, info: dict[str, Any], timer: asyncio.TimerHandle,
                 owner: set[str]) -> None:
        self.stream = stream
        self.info = info
        self.timer = timer
        self.owner = owner

    def abort(self) -> None:
        self.timer.cancel()
        self.stream.abort()


class _Pump:
    """Bytes between one WebSocket and one channel stream, both ways, with half-close.

    Ending: EOF either way is passed on. Once EOF went both ways, a client-side
    stream (connect) does not close the channel itself: the server closes it
    after it has delivered everything (closing first and then dropping the
    pooled session would cut off what the server still buffers for a slow
    target). A server-side stream (accept) closes it, as a server does. When the
    channel is closed, the WebSocket is closed with 1000.
    """

    def __init__(self, ws: ServerConnection, stream: DuplexStream, server_side: bool = False,
                 gate: InputGate | None = None) -> None:
        self.ws = ws
        self.stream = stream
        self.server_side = server_side
        self.gate = gate
        transport = getattr(stream, "_transport", None)
        if transport is not None and hasattr(transport, "set_write_buffer_limits"):
            # let a couple of client messages queue in the channel while the window opens
            transport.set_write_buffer_limits(high=CHANNEL_HIGH_WATER)
        self.client_eof = False
        self.daemon_eof = False
        self.clean = False
        self._client_eof_evt = asyncio.Event()

    async def run(self) -> bool:
        loop = asyncio.get_running_loop()
        down = loop.create_task(self._down())
        up = loop.create_task(self._up())
        try:
            await self.ws.wait_closed()
        finally:
            both = self.client_eof and self.daemon_eof
            up.cancel()
            if self.clean:
                pass
            elif self.client_eof and self.ws.close_code != ABORT_CODE:
                # the client closed after its eof: a graceful close (like close() after
                # shutdown(SHUT_WR)); let the channel finish, dropping what still comes back
                down.cancel()
                await asyncio.gather(down, return_exceptions=True)
                await _finish_detached(self.stream)
            else:  # before its eof, or with code 4000: abort
                self.stream.abort()
            down.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
        return self.clean or (both and self.stream_ok())

    def stream_ok(self) -> bool:
        return getattr(self.stream, "_exc", None) is None

    async def _down(self) -> None:
        """channel -> WebSocket"""
        ws, stream = self.ws, self.stream
        try:
            if isinstance(stream, ChannelStream):
                while True:
                    chunks = await stream.read_chunks(ipc.DATA_CHUNK)
                    if not chunks:
                        break
                    await send_data(ws, chunks)
            else:  # pragma: no cover - every stream is adopted as a ChannelStream
                while True:
                    data = await stream.read(ipc.DATA_CHUNK)
                    if not data:
                        break
                    await send_data(ws, [data])
        except ConnectionClosed:
            return
        except Exception as exc:  # ConnectionResetError, asyncssh's ConnectionLost, …
            await _fail(ws, "ECONNRESET", f"the stream was reset by the far end ({type(exc).__name__})", 1011)
            return
        await ws.send(ipc.EOF_BYTES)
        self.daemon_eof = True
        await self._await_channel_end()
        if not self.stream_ok():
            await _fail(ws, "ECONNRESET", "the stream was reset by the far end", 1011)
            return
        self.clean = True
        await ws.close(1000)

    async def _await_channel_end(self) -> None:
        """Wait for the server to close the channel; after EOF both ways, at most PEER_CLOSE_GRACE."""
        closed = asyncio.ensure_future(self.stream.wait_closed())
        eof = asyncio.ensure_future(self._client_eof_evt.wait())
        try:
            await asyncio.wait({closed, eof}, return_when=asyncio.FIRST_COMPLETED)
            if not closed.done():
                if self.server_side:
                    # we are the server end (serve/accept): EOF went both ways, close as a
                    # server does, once our EOF has gone out
                    await close_after_flush(self.stream)
                    await closed
                    return
                done, _ = await asyncio.wait({closed}, timeout=PEER_CLOSE_GRACE)
                if not done:  # a server that never closes: we do (our side has nothing left)
                    await close_after_flush(self.stream)
                    await closed
        finally:
            eof.cancel()
            closed.cancel()

    async def _up(self) -> None:
        """WebSocket -> channel"""
        ws, stream = self.ws, self.stream
        dead = False
        async for raw in ws:
            payload: bytes | memoryview | None = None
            msg: ipc.Message | None = None
            try:
                payload = ipc.data_payload(raw)  # the common case, no copy
                msg = ipc.decode_client(raw) if payload is None else None
                if isinstance(msg, ipc.Data):
                    payload = msg.data
                if payload is not None:
                    if self.client_eof:
                        raise ipc.IPCError("data after eof")
                    if dead:
                        continue
                    try:
                        await _feed(stream, payload)
                    except Exception:
                        dead = True  # the channel is gone; _down reports how it ended
                elif isinstance(msg, ipc.Eof):
                    if self.client_eof:
                        raise ipc.IPCError("eof twice")
                    self.client_eof = True
                    self._client_eof_evt.set()
                    if not dead:
                        stream.write_eof()
                else:
                    assert msg is not None
                    raise ipc.IPCError(f"unexpected {ipc.shown(msg.type)} on an open stream")
            except ipc.IPCError as exc:
                log.info("ipc: protocol error on a stream: %s", exc)
                stream.abort()
                await _fail(ws, exc.code, str(exc), 1002)
                return
            finally:
                del raw, payload, msg  # in the channel now (or dropped): its room goes back
                if self.gate is not None:
                    self.gate.consumed()


async def _feed(stream: DuplexStream, payload: bytes | memoryview) -> None:
    """Write one client message into the channel, a piece at a time, each once the channel
    drained below its high-water mark: a 16 MiB message must not become 16 MiB more in the
    channel's send buffer (the message itself is already counted in the input budget)."""
    if len(payload) <= FEED_PIECE:
        stream.write(payload)
        await stream.drain()
        return
    view = memoryview(payload)
    for off in range(0, len(view), FEED_PIECE):
        stream.write(view[off:off + FEED_PIECE])
        await stream.drain()


async def _finish_detached(stream: DuplexStream) -> None:
    """The client is gone after its EOF: drain the far end's bytes until the server closes."""
    try:
        async with asyncio.timeout(PEER_CLOSE_GRACE):
            while await stream.read(ipc.DATA_CHUNK):
                pass
            await stream.wait_closed()
    except (Exception, asyncio.TimeoutError):
        pass
    if not stream._closed.done():
        await close_after_flush(stream, 1.0)


async def send_data(ws: ServerConnection, parts: list[bytes]) -> None:
    """Send one ``data`` message made of ``parts``, without copying them.

    websockets' ``send()`` copies a message three times on its way out
    (msgpack join, frame assembly, getvalue); a server's data frame is just a
    header and the bytes (unmasked, no extensions here), so write header and
    payload to the transport as two buffers and let websockets do the flow
    control (``drain``). Anything unusual falls back to ``send()``.
    """
    protocol = ws.protocol
    transport = ws.transport
    size = sum(map(len, parts))
    if protocol.state is not State.OPEN or protocol.extensions or transport.is_closing():
        await ws.send(ipc.encode_data(b"".join(parts)))
        return
    mp = ipc.data_header(size)
    length = len(mp) + size
    if length < 126:
        head = struct.pack("!BB", 0x82, length)
    elif length < 65536:
        head = struct.pack("!BBH", 0x82, 126, length)
    else:
        head = struct.pack("!BBQ", 0x82, 127, length)
    transport.writelines((head + mp, *parts))
    await ws.drain()


async def close_after_flush(stream: DuplexStream, timeout: float = FLUSH_TIMEOUT) -> None:
    """Close a channel only once what was written (and a pending EOF) has gone out.

    asyncssh's ``close()`` with data still waiting for window turns a pending
    EOF into a bare CHANNEL_CLOSE, which the far end cannot tell from an abort
    (wraith serve then resets the target). So wait for the send buffer to empty.
    """
    transport = getattr(stream, "_transport", None)
    if transport is not None and hasattr(transport, "get_write_buffer_size"):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (transport.get_write_buffer_size() > 0 and not stream._closed.done()
               and loop.time() < deadline):
            await asyncio.sleep(0.01)
    stream.close()


def _stop(task: asyncio.Task[None]) -> None:
    """Cancel a sender task; an error it ended with (the WebSocket closed under it) is
    already handled by its owner's loop, so it is retrieved here, not reported."""
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


async def _fail(ws: ServerConnection, code: str, message: str, close_code: int) -> None:
    try:
        await ws.send(ipc.error_bytes(code, message))
    except Exception:
        pass
    try:
        await ws.close(close_code, code)
    except Exception:
        pass
