"""Plain TCP transport (optionally through a client-side --proxy)."""

from __future__ import annotations

import asyncio
import errno
import socket

from ..errors import ConnectError
from ..options import ConnectOptions, ServeOptions
from .base import ProtocolFactory


class TCPConnector:
    kind = "tcp"

    def __init__(self, options: ConnectOptions) -> None:
        self._options = options
        self.host, self.port = options.server_address()

    def describe(self) -> str:
        return f"{self.host}:{self.port}"

    async def connect(self, protocol_factory: ProtocolFactory) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
        loop = asyncio.get_running_loop()
        sock = await open_tcp_socket(self._options, self.host, self.port)
        try:
            return await loop.create_connection(protocol_factory, sock=sock)
        except OSError as exc:
            sock.close()
            raise ConnectError(f"cannot connect to {self.describe()}: {exc.strerror or exc}") from None


async def open_tcp_socket(options: ConnectOptions, host: str, port: int) -> socket.socket:
    """A connected TCP socket to the server, direct or through ``--proxy``."""
    proxy = options.proxy_url()
    timeout = options.connect_timeout
    if proxy is not None:
        from .proxy import dial_via_proxy

        return await dial_via_proxy(proxy, host, port, timeout)
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
    except (socket.gaierror, asyncio.TimeoutError) as exc:
        raise ConnectError(f"cannot resolve {host}: {getattr(exc, 'strerror', None) or 'timed out'}",
                           "EHOSTUNREACH") from None
    last: OSError | None = None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, addr), timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except (OSError, asyncio.TimeoutError) as exc:
            sock.close()
            last = exc if isinstance(exc, OSError) else TimeoutError("connect timed out")
    reason = (getattr(last, "strerror", None) or str(last)) if last else "no address"
    raise ConnectError(f"cannot connect to {host}:{port}: {reason}", _code_for(last))


def _code_for(exc: BaseException | None) -> str:
    """A stable error code for a failed connect, from the errno rather than the text."""
    if isinstance(exc, TimeoutError):
        return "ETIMEDOUT"
    code: int | None = getattr(exc, "errno", None)
    return {errno.ECONNREFUSED: "ECONNREFUSED", errno.ETIMEDOUT: "ETIMEDOUT",
            errno.EHOSTUNREACH: "EHOSTUNREACH", errno.ENETUNREACH: "ENETUNREACH"}.get(code or 0, "ECONNECT")


class TCPAcceptor:
    kind = "tcp"

    def __init__(self, options: ServeOptions) -> None:
        self.host, self.port = options.listen_address()
        self._server: asyncio.Server | None = None

    async def start(self, protocol_factory: ProtocolFactory) -> None:
        loop = asyncio.get_running_loop()
        host: str | None = None if self.host in ("", "*") else self.host
        try:
            self._server = await loop.create_server(
                protocol_factory, host, self.port, reuse_address=True, backlog=1024)
        except OSError as exc:
            raise ConnectError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None

    def bound(self) -> list[tuple[str, int]]:
        assert self._server is not None
        return [s.getsockname()[:2] for s in self._server.sockets]

    def addresses(self) -> list[str]:
        return [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.bound()]

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def wait_closed(self) -> None:
        if self._server is not None:
            # Server.wait_closed() waits for every connection in 3.12+; we only
            # need the listening sockets gone, which close() already did.
            await asyncio.sleep(0)
