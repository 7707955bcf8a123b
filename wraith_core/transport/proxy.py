"""Dialing through a SOCKS5 or HTTP CONNECT proxy (python-socks).

Used for client transport chaining (``wraith connect --proxy``) and for the
server's outbound connections to channel targets (``wraith serve --proxy``).
A dead proxy is an error, never a silent direct connection.
"""

from __future__ import annotations

import socket

from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.asyncio import Proxy

from ..addr import ProxyURL
from ..errors import ConnectError

_TYPES = {"socks5": ProxyType.SOCKS5, "http": ProxyType.HTTP}


class ProxyDialError(ConnectError):
    """``reason`` is one of: refused, unreachable, timeout, proxy."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


async def dial_via_proxy(proxy: ProxyURL, host: str, port: int, timeout: float) -> socket.socket:
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
        reason = {5: "refused", 4: "unreachable", 3: "unreachable"}.get(code, "proxy") if isinstance(code, int) else "proxy"
        raise ProxyDialError(f"proxy refused the connection: {exc}", reason) from None
    except OSError as exc:
        raise ProxyDialError(f"proxy failure: {exc}", "proxy") from None
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    return sock
