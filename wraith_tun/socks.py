"""SOCKS5 CONNECT client (python-socks): one connected socket per TCP flow."""

from __future__ import annotations

import socket

from python_socks import ProxyType
from python_socks.async_.asyncio import Proxy


class SocksRefused(Exception):
    """The SOCKS5 server could not be reached or refused the CONNECT."""


async def socks5_connect(proxy_host: str, proxy_port: int, host: str, port: int, timeout: float = 30.0) -> socket.socket:
    """CONNECT through SOCKS5; names are sent unresolved (SOCKS5h)."""
    proxy = Proxy(ProxyType.SOCKS5, proxy_host, proxy_port, rdns=True)
    try:
        sock = await proxy.connect(host, port, timeout=timeout)
    except Exception as e:  # ProxyError, ProxyConnectionError, ProxyTimeoutError, OSError
        raise SocksRefused(str(e)) from e
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    return sock
