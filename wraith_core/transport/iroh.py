"""iroh transport: SSH over one bidirectional QUIC stream between iroh endpoints.

Server: binds an endpoint (UDP, at ``--listen``) with ALPN ``wraith-ssh``,
tells the user its endpoint id and a ticket (id + direct addresses + relay),
and runs SSH on the first bi-stream of each incoming connection. The
endpoint's secret key is derived from the SSH host key, so a restarted server
keeps its endpoint id and old tickets keep working.

Client: ``--peer`` is an endpoint id (found through discovery/relays) or a
ticket; one endpoint and one QUIC connection per SSH session.

``--iroh-relay``: unset = iroh's default relays and discovery; a URL = that
relay; ``none`` = no relays and no discovery, direct addresses only.

The QUIC stream's two halves become one ``asyncio.Transport`` so asyncssh runs
on it exactly as on a socket (flow control, half-close, close/abort).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import re
import socket
import time
from collections import deque
from typing import Any

from ..errors import ConnectError, UsageError
from ..options import ConnectOptions, ServeOptions
from .base import ProtocolFactory, TransportInfo, accepted_at

log = logging.getLogger("wraith.transport")

ALPN = b"wraith-ssh"
INSTALL_HINT = "the iroh transport needs the iroh package: pip install 'wraith[iroh]'"

READ_CHUNK = 1 << 20
WRITE_CHUNK = 1 << 20
HIGH_WATER = 2 << 20
LOW_WATER = 512 << 10
LINGER = 2.0  # how long a closing stream waits for the peer to take the last bytes


# streams not yet fully torn down (each has iroh calls in flight until then)
_live: set["IrohStreamTransport"] = set()


async def wait_idle(timeout: float = 5.0) -> None:
    """Close every iroh stream of this process and wait until they are torn down.

    Call before the event loop ends (the CLI does): an iroh call still pending
    when the loop is gone makes the bindings call back into a dead loop.
    """
    streams = list(_live)
    for t in streams:
        if not t.is_closing():
            t.abort()
    if streams:
        await asyncio.wait([t._done for t in streams], timeout=timeout)


def load_ffi() -> Any:
    """The iroh bindings, with the buffer-copy speed fix applied (see iroh_patch)."""
    try:
        from iroh import iroh_ffi
    except (ImportError, OSError):
        raise UsageError(INSTALL_HINT) from None
    from . import iroh_patch

    iroh_patch.apply(iroh_ffi)
    return iroh_ffi


def _one_line(exc: BaseException) -> str:
    text = ""
    message = getattr(exc, "message", None)  # IrohError carries its text in message()
    if callable(message):
        with contextlib.suppress(Exception):
            text = str(message())
    text = (text or str(exc)).strip() or type(exc).__name__
    text = _RUST_LOCATION.sub("", text)  # the build machine's source paths mean nothing to a user
    return " ".join(text.split())[:300]


# "(/…/.cargo/registry/src/…/key.rs:486:9)" in the Rust library's error texts
_RUST_LOCATION = re.compile(r"\s*\([^()]*\.rs:\d+:\d+\)")


def endpoint_options(ffi: Any, relay: str | None, *, alpns: list[bytes] | None = None,
                     bind_addr: str | None = None, secret_key: bytes | None = None) -> Any:
    kw: dict[str, Any] = {}
    if relay is not None and relay.strip().lower() == "none":
        kw["preset"] = ffi.preset_minimal()          # no discovery services
        kw["relay_mode"] = ffi.RelayMode.disabled()  # direct addresses only
    else:
        kw["preset"] = ffi.preset_n0()
        if relay:
            kw["relay_mode"] = ffi.RelayMode.custom_from_urls([relay])
    if alpns is not None:
        kw["alpns"] = alpns
    if bind_addr is not None:
        kw["bind_addr"] = bind_addr
    if secret_key is not None:
        kw["secret_key"] = secret_key
    return ffi.EndpointOptions(**kw)


def parse_peer(ffi: Any, peer: str) -> Any:
    """An ``EndpointAddr`` from a ticket (``endpoint…``) or a bare endpoint id."""
    text = peer.strip()
    try:
        if text.lower().startswith("endpoint"):
            return ffi.EndpointTicket.from_string(text).endpoint_addr()
        return ffi.EndpointAddr(ffi.EndpointId.from_string(text), None, [])
    except Exception as exc:
        raise UsageError(f"--peer: not an iroh endpoint id or ticket ({_one_line(exc)})") from None


class IrohStreamTransport(asyncio.Transport):
    """An asyncio transport over one QUIC bi-stream (send half + recv half)."""

    def __init__(self, conn: Any, send: Any, recv: Any, info: TransportInfo,
                 on_closed: Any = None, peername: tuple[str, int] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        # asyncssh matches authorized_keys from= patterns against peername's IP: give it the
        # UDP source of a direct path, or an address no sensible pattern allows (relayed)
        peer = peername or ("0.0.0.0", 0)
        super().__init__(extra={"wraith_transport_info": info, "peername": peer,
                                "iroh_connection": conn})
        self._conn = conn
        self._send = send
        self._recv = recv
        self._on_closed = on_closed
        self._protocol: asyncio.BaseProtocol | None = None
        self._buf: deque[bytes] = deque()
        self._buffered = 0
        self._high = HIGH_WATER
        self._low = LOW_WATER
        self._write_paused = False
        self._wake = asyncio.Event()
        self._read_ok = asyncio.Event()
        self._read_ok.set()
        self._closing = False
        self._eof_requested = False
        self._finished = False
        self._lost = False
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._teardown_task: asyncio.Task[None] | None = None
        self._done: asyncio.Future[None] = self._loop.create_future()
        _live.add(self)

    # -- lifecycle -------------------------------------------------------------------

    def start(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._writer = self._loop.create_task(self._write_loop())
        protocol.connection_made(self)
        if not self._closing:
            self._reader = self._loop.create_task(self._read_loop())

    def _connection_lost(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._teardown_task = self._loop.create_task(self._teardown(exc))

    async def _teardown(self, exc: BaseException | None) -> None:
        """Stop both pumps, close the connection (and the client's endpoint), then tell the protocol.

        connection_lost comes last so that whoever waits for it (asyncssh's
        wait_closed) knows no iroh call of this stream is still pending.
        """
        me = asyncio.current_task()
        tasks = [t for t in (self._reader, self._writer) if t is not None and t is not me and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            self._conn.close(0 if exc is None else 1, b"")
        if self._on_closed is not None:
            with contextlib.suppress(Exception):
                result = self._on_closed()
                if asyncio.iscoroutine(result):
                    await result
        _live.discard(self)
        if not self._done.done():
            self._done.set_result(None)
        protocol = self._protocol
        if protocol is not None:  # (asyncio's protocols take an Exception: a cancellation is a reset)
            protocol.connection_lost(exc if exc is None or isinstance(exc, Exception)
                                     else ConnectionResetError(f"iroh stream cancelled: {type(exc).__name__}"))

    def _fatal(self, exc: BaseException) -> None:
        if self._lost:
            return
        err = ConnectionResetError(f"iroh stream failed: {_one_line(exc)}")
        self._connection_lost(err)

    # -- reading -----------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                if not self._read_ok.is_set():
                    await self._read_ok.wait()
                data = await self._recv.read(READ_CHUNK)
                if not data:
                    break
                if not self._read_ok.is_set():  # paused while that read was in flight
                    await self._read_ok.wait()
                if self._closing:
                    return
                self._protocol.data_received(data)  # type: ignore[union-attr]
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self._closing:
                self._fatal(exc)
            return
        if self._closing:
            return
        keep_open = self._protocol.eof_received()  # type: ignore[union-attr]
        if not keep_open:
            self.close()

    def pause_reading(self) -> None:
        self._read_ok.clear()

    def resume_reading(self) -> None:
        self._read_ok.set()

    def is_reading(self) -> bool:
        return self._read_ok.is_set() and not self._closing

    # -- writing -----------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_requested:
            raise RuntimeError("cannot write after write_eof()")
        if self._closing or not data:
            return
        chunk = bytes(data)
        self._buf.append(chunk)
        self._buffered += len(chunk)
        self._wake.set()
        if not self._write_paused and self._buffered > self._high and self._protocol is not None:
            self._write_paused = True
            self._protocol.pause_writing()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def _take(self) -> bytes:
        first = self._buf.popleft()
        if len(first) >= WRITE_CHUNK or not self._buf:
            return first
        parts = [first]
        size = len(first)
        while self._buf and size + len(self._buf[0]) <= WRITE_CHUNK:
            item = self._buf.popleft()
            parts.append(item)
            size += len(item)
        return b"".join(parts)

    async def _write_loop(self) -> None:
        try:
            while True:
                if self._buf:
                    chunk = self._take()
                    await self._send.write_all(chunk)
                    self._buffered -= len(chunk)
                    if self._write_paused and self._buffered <= self._low and not self._lost:
                        self._write_paused = False
                        self._protocol.resume_writing()  # type: ignore[union-attr]
                    continue
                if self._eof_requested and not self._finished:
                    self._finished = True
                    await self._send.finish()
                if self._closing:
                    break
                self._wake.clear()
                await self._wake.wait()
            if not self._finished:
                self._finished = True
                await self._send.finish()
            # let the peer take the last bytes before the connection goes away
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._send.stopped(), LINGER)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fatal(exc)
            return
        self._connection_lost(None)

    def write_eof(self) -> None:
        if self._eof_requested or self._closing:
            return
        self._eof_requested = True
        self._wake.set()

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low, self._high)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not 0 <= low <= high:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low

    # -- closing -----------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Flush what is buffered, finish the stream, then close the connection."""
        if self._closing:
            return
        self._closing = True
        self._read_ok.set()
        if self._reader is not None:
            self._reader.cancel()
        self._wake.set()
        if self._writer is None or self._writer.done():
            self._connection_lost(None)

    def abort(self) -> None:
        if self._lost:
            return
        self._closing = True
        self._buf.clear()
        self._buffered = 0
        self._connection_lost(None)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol  # type: ignore[return-value]


class IrohConnector:
    kind = "iroh"

    def __init__(self, options: ConnectOptions) -> None:
        self._ffi = load_ffi()
        self._options = options
        if options.proxy:
            raise UsageError("--proxy works with --transport tcp or tls, not iroh (QUIC over UDP)")
        self.peer = (options.peer or "").strip()
        self._addr = parse_peer(self._ffi, self.peer)
        # the name known_hosts entries match: the endpoint id (hex), which a ticket's
        # addresses do not change
        self.host_name = str(self._addr.id())
        relay = (options.iroh_relay or "").strip().lower()
        if relay == "none" and not self._addr.direct_addresses():
            raise UsageError("--iroh-relay none needs a ticket with direct addresses as --peer "
                             "(a bare endpoint id can only be found through relays/discovery)")

    def describe(self) -> str:
        short = self.peer if len(self.peer) <= 24 else self.peer[:20] + "…"
        return f"iroh peer {short}"

    async def connect(self, protocol_factory: ProtocolFactory) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
        ffi = self._ffi
        opts = self._options
        try:
            endpoint = await ffi.Endpoint.bind(endpoint_options(ffi, opts.iroh_relay))
        except Exception as exc:
            raise ConnectError(f"cannot start an iroh endpoint: {_one_line(exc)}") from None

        async def shutdown() -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(endpoint.close(), 3)

        failure: ConnectError | None = None
        try:
            conn = await asyncio.wait_for(endpoint.connect(self._addr, ALPN), opts.connect_timeout)
            bi = await asyncio.wait_for(conn.open_bi(), opts.connect_timeout)
        except asyncio.TimeoutError:
            failure = ConnectError(f"timed out connecting to {self.describe()}", "ETIMEDOUT")
        except Exception as exc:
            failure = ConnectError(f"cannot connect to {self.describe()}: {_one_line(exc)}")
        except BaseException:  # cancelled: do not leave the endpoint behind
            await asyncio.shield(shutdown())
            raise
        if failure is not None:
            # Raised out here, with no traceback or exception chain holding this frame: the
            # endpoint's UDP sockets go when the object does, and a session keeps its last
            # error for the whole outage (one retry after another, each with new sockets).
            await shutdown()
            conn = bi = None
            del endpoint, shutdown
            raise failure
        info = TransportInfo("iroh", str(conn.remote_id()))
        transport = IrohStreamTransport(conn, bi.send(), bi.recv(), info, on_closed=shutdown)
        protocol = protocol_factory()
        transport.start(protocol)
        return transport, protocol


def _specific_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return None if ip.is_unspecified else ip


def _ip_of(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP of "ip", "ip:port" or "[ip]:port" (an IPv4-mapped IPv6 address as IPv4)."""
    text = address.strip()
    if text.startswith("["):
        text = text[1:text.find("]")]
    elif text.count(":") == 1:
        text = text.rsplit(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def endpoint_secret(host_key: Any) -> bytes:
    """A stable iroh secret key derived from the SSH host key (same host key, same endpoint id)."""
    der = host_key.export_private_key("pkcs8-der")
    return hashlib.sha256(b"wraith iroh endpoint key v1\0" + der).digest()


class IrohAcceptor:
    kind = "iroh"

    def __init__(self, options: ServeOptions) -> None:
        from .. import keys

        self._ffi = load_ffi()
        self._options = options
        host, port = options.listen_address()
        self._bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        # iroh binds the other address family too, on its wildcard address: with a specific
        # --listen address, what arrives on another one is refused, and tickets leave it out
        self._only_ip = _specific_ip(host)
        self._secret = endpoint_secret(keys.load_private_key(options.key, "host key"))  # type: ignore[arg-type]
        self._endpoint: Any = None
        self._accept_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._transports: set[IrohStreamTransport] = set()
        self._closer: asyncio.Task[None] | None = None

    async def _resolve_listen(self) -> None:
        """iroh binds socket addresses only: a --listen name is looked up (its first address)."""
        host, port = self._options.listen_address()
        try:
            ipaddress.ip_address(host.strip("[]"))
            return
        except ValueError:
            pass
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as exc:
            raise ConnectError(f"--listen: cannot resolve {host}: {getattr(exc, 'strerror', None) or exc}") from None
        ip = str(infos[0][4][0])
        self._bind = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        self._only_ip = _specific_ip(ip)

    async def start(self, protocol_factory: ProtocolFactory) -> None:
        ffi = self._ffi
        await self._resolve_listen()
        opts = endpoint_options(ffi, self._options.iroh_relay, alpns=[ALPN], bind_addr=self._bind,
                                secret_key=self._secret)
        try:
            self._endpoint = await ffi.Endpoint.bind(opts)
        except Exception as exc:
            raise ConnectError(f"cannot bind iroh endpoint on {self._bind}: {_one_line(exc)}") from None
        # direct addresses are known right after bind for a specific address; give
        # interface discovery a moment for a wildcard bind
        for _ in range(40):
            if self._endpoint.addr().direct_addresses():
                break
            await asyncio.sleep(0.05)
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop(protocol_factory))

    async def _accept_loop(self, protocol_factory: ProtocolFactory) -> None:
        while True:
            try:
                incoming = await self._endpoint.accept_next()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("iroh accept failed: %s", _one_line(exc))
                await asyncio.sleep(0.1)
                continue
            if incoming is None:  # endpoint closed
                return
            task = asyncio.get_running_loop().create_task(self._handle(incoming, protocol_factory))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, incoming: Any, protocol_factory: ProtocolFactory) -> None:
        accepted = time.monotonic()  # one login deadline from here, SSH's part included
        conn = None
        peername: tuple[str, int] | None = None
        try:
            async with asyncio.timeout(self._options.login_grace_time):
                with contextlib.suppress(Exception):
                    source = await incoming.remote_addr()
                    host, _, port = str(getattr(source, "addr", "")).rpartition(":")
                    if host and port.isascii() and port.isdigit():
                        peername = (host.strip("[]"), int(port))
                if self._only_ip is not None:
                    local = await incoming.local_addr()
                    if local.is_ip() and _ip_of(str(local.addr)) != self._only_ip:
                        await incoming.refuse()
                        return
                accepting = await incoming.accept()
                conn = await accepting.connect()
                if bytes(conn.alpn()) != ALPN:
                    conn.close(1, b"unknown alpn")
                    return
                # SSH needs one bidirectional stream and no other: no credit for unidirectional
                # ones, and those already granted are refused at once (each would be buffered up
                # to its receive window, ~100 MB per connection, before any login)
                with contextlib.suppress(Exception):
                    conn.set_max_concurrent_uni_streams(0)
                self._spawn(self._refuse_uni(conn))
                bi = await conn.accept_bi()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("iroh incoming connection failed: %s", _one_line(exc))
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close(1, b"")
            return
        info = TransportInfo("iroh", str(conn.remote_id()))
        transport = IrohStreamTransport(conn, bi.send(), bi.recv(), info, peername=peername)
        transport._on_closed = lambda: self._transports.discard(transport)
        self._transports.add(transport)
        transport.start(accepted_at(protocol_factory, accepted)())
        # One stream per connection is all SSH needs. QUIC already granted the peer credit for
        # ~100 more, and each would be buffered up to its receive window (~127 MB held per
        # connection, before any login): no new credit, and every further stream is refused.
        with contextlib.suppress(Exception):
            conn.set_max_concurrent_bi_streams(0)
        self._spawn(self._refuse_bi(conn))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _refuse_bi(conn: Any) -> None:
        with contextlib.suppress(Exception):  # ends when the connection does
            while True:
                extra = await conn.accept_bi()
                await extra.recv().stop(0)
                await extra.send().reset(0)

    @staticmethod
    async def _refuse_uni(conn: Any) -> None:
        with contextlib.suppress(Exception):
            while True:
                await (await conn.accept_uni()).stop(0)

    def addresses(self) -> list[str]:
        if self._endpoint is None:
            return []
        addr = self._endpoint.addr()
        lines = [f"udp {a}" for a in self._endpoint.bound_sockets() if self._listened(str(a))]
        lines.append(f"endpoint-id {addr.id()}")
        lines.append(f"ticket {self.ticket()}")
        return lines

    def endpoint_id(self) -> str:
        return str(self._endpoint.addr().id())

    def ticket(self) -> str:
        addr = self._endpoint.addr()
        if self._only_ip is not None:
            direct = [a for a in addr.direct_addresses() if self._listened(str(a))]
            addr = self._ffi.EndpointAddr(addr.id(), addr.relay_url(), direct)
        return str(self._ffi.EndpointTicket.from_addr(addr))

    def _listened(self, address: str) -> bool:
        """Whether ``address`` (ip:port) is on the --listen address (any, if that is a wildcard)."""
        return self._only_ip is None or _ip_of(address) == self._only_ip

    def close(self) -> None:
        """Stop accepting; the endpoint closes once live sessions are gone (bounded)."""
        if self._accept_task is not None:
            self._accept_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._closer is None and self._endpoint is not None:
            self._closer = asyncio.get_running_loop().create_task(self._close_endpoint())

    async def _close_endpoint(self) -> None:
        deadline = asyncio.get_running_loop().time() + self._options.drain_time + 1.0
        while self._transports and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for t in list(self._transports):
            t.abort()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._endpoint.close(), 3)

    async def wait_closed(self) -> None:
        if self._closer is not None:
            with contextlib.suppress(Exception):
                await self._closer
