"""Dialing through a SOCKS5 or HTTP CONNECT proxy.

Used for client transport chaining (``wraith connect --proxy``) and for the
server's outbound connections to channel targets (``wraith serve --proxy``).
A dead proxy is an error, never a silent direct connection.

SOCKS5 uses python-socks. HTTP CONNECT does not: python-socks reads the
proxy's reply with one 64 KiB ``recv`` and drops whatever follows the header
in that read — the first bytes of a target that speaks first (an SSH server's
banner, SMTP, MySQL), so the stream silently loses them. Here the reply header
is read exactly up to its blank line and nothing after it.
"""

from __future__ import annotations

import asyncio
import base64
import re
import socket

from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.asyncio import Proxy

from ..addr import ProxyURL
from ..errors import ConnectError
from ..logs import peer_text
from .base import wait_readable

_TYPES = {"socks5": ProxyType.SOCKS5, "http": ProxyType.HTTP}


class ProxyDialError(ConnectError):
    """``reason`` is one of: refused, unreachable, net-unreachable, prohibited, timeout, proxy."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


async def dial_via_proxy(proxy: ProxyURL, host: str, port: int, timeout: float) -> socket.socket:
    if proxy.scheme == "http":
        try:
            sock = await asyncio.wait_for(_http_connect(proxy, host, port), timeout)
        except asyncio.TimeoutError:
            raise ProxyDialError("proxy connection timed out", "timeout") from None
        _nodelay(sock)
        return sock
    p = Proxy(_TYPES[proxy.scheme], proxy.host, proxy.port,
              username=proxy.username, password=proxy.password, rdns=True)
    try:
        sock = await p.connect(host, port, timeout=timeout)
    except ProxyTimeoutError:
        raise ProxyDialError("proxy connection timed out", "timeout") from None
    except ProxyConnectionError as exc:
        raise ProxyDialError(f"cannot reach proxy {proxy.host}:{proxy.port}: {exc}", "proxy") from None
    except ProxyError as exc:
        code = getattr(exc, "error_code", None)
        # SOCKS5 reply codes (RFC 1928) reported by the proxy for the target
        reason = _SOCKS_REASONS.get(code, "proxy") if isinstance(code, int) else "proxy"
        raise ProxyDialError(f"proxy refused the connection: {exc}", reason) from None
    except OSError as exc:
        raise ProxyDialError(f"proxy failure: {exc}", "proxy") from None
    except ValueError as exc:  # python-socks decoding what the proxy sent (UnicodeDecodeError, …)
        raise ProxyDialError(f"proxy failure: {peer_text(str(exc), 120)}", "proxy") from None
    _nodelay(sock)
    return sock


# 2: not allowed by ruleset, 3: network, 4: host unreachable, 5: refused, 6: TTL expired
_SOCKS_REASONS = {2: "prohibited", 3: "net-unreachable", 4: "unreachable", 5: "refused", 6: "unreachable"}
_HTTP_REASONS = {403: "prohibited", 502: "unreachable", 503: "unreachable", 504: "timeout"}


def _nodelay(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


MAX_REPLY_HEADER = 16 * 1024


async def _http_connect(proxy: ProxyURL, host: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    try:
        sock = await _tcp_connect(proxy.host, proxy.port)
    except OSError as exc:
        raise ProxyDialError(f"cannot reach proxy {proxy.host}:{proxy.port}: {exc.strerror or exc}",
                             "proxy") from None
    try:
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        request = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
        if proxy.username is not None:
            token = base64.b64encode(f"{proxy.username}:{proxy.password or ''}".encode()).decode()
            request += f"Proxy-Authorization: Basic {token}\r\n"
        await loop.sock_sendall(sock, (request + "\r\n").encode())
        head = await _read_reply_header(sock)
        status = head.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")
        parts = status.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not re.fullmatch("[0-9]{3}", parts[1]):
            raise ProxyDialError(f"proxy sent an invalid CONNECT reply: {status[:80]!r}", "proxy")
        code = int(parts[1])
        if not 200 <= code < 300:
            what = "authentication failed" if code == 407 else "refused the connection"
            raise ProxyDialError(f"proxy {what}: HTTP {peer_text(status.split(' ', 1)[-1], 80)}",
                                 _HTTP_REASONS.get(code, "proxy"))
        return sock
    except BaseException:
        sock.close()
        raise


async def _tcp_connect(host: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    last: OSError = OSError("no address")
    for family, type_, proto, _, addr in await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, addr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise last


# the blank line after the header; HTTP/1.1 allows bare LF line ends (RFC 9112 §2.2)
_HEADER_END = re.compile(rb"\r?\n\r?\n")


async def _read_reply_header(sock: socket.socket) -> bytes:
    """Bytes up to and including the blank line that ends the reply header, and not one more."""
    buf = b""
    while True:
        await wait_readable(sock)
        try:
            peek = sock.recv(MAX_REPLY_HEADER, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            continue
        if not peek:
            raise ProxyDialError("proxy closed the connection during CONNECT", "proxy")
        m = _HEADER_END.search(buf + peek, max(0, len(buf) - 3))
        take = len(peek) if m is None else m.end() - len(buf)
        buf += _recv_exactly(sock, take)  # already queued: no waiting
        if m is not None:
            return buf
        if len(buf) >= MAX_REPLY_HEADER:
            raise ProxyDialError("proxy sent an oversized CONNECT reply", "proxy")


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ProxyDialError("proxy closed the connection during CONNECT", "proxy")
        out += chunk
    return out

