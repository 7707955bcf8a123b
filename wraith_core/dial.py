"""Outbound connections to channel targets, with errors mapped to reasons.

The reason text travels in the SSH channel-open failure and is mapped back to
a SOCKS5 reply code by the client (``reply_for_reason``), the same way
OpenSSH's sshd reports ``strerror`` texts.
"""

from __future__ import annotations

import asyncio
import errno
import socket

from .addr import ProxyURL
from .protocol.socks5 import Reply

REFUSED = "Connection refused"
HOST_UNREACHABLE = "No route to host"
NET_UNREACHABLE = "Network is unreachable"
NAME_UNKNOWN = "Name or service not known"
TIMED_OUT = "Connection timed out"
PROXY_FAILED = "Proxy failure"
NOT_ALLOWED = "Connection not allowed by proxy"


class DialError(Exception):
    """``prohibited``: the open failure is "administratively prohibited" (SOCKS5 reply 2)."""

    def __init__(self, reason: str, prohibited: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.prohibited = prohibited


def reason_for_oserror(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return NAME_UNKNOWN
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return TIMED_OUT
    if isinstance(exc, ConnectionRefusedError):
        return REFUSED
    if isinstance(exc, OSError):
        if exc.errno == errno.ENETUNREACH:
            return NET_UNREACHABLE
        if exc.errno in (errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.EADDRNOTAVAIL):
            return HOST_UNREACHABLE
        if exc.errno == errno.ETIMEDOUT:
            return TIMED_OUT
        if exc.errno == errno.ECONNREFUSED:
            return REFUSED
        # a multi-address connect failure: asyncio joins the messages
        text = str(exc).lower()
        if "refused" in text:
            return REFUSED
        if "unreachable" in text:
            return NET_UNREACHABLE if "network" in text else HOST_UNREACHABLE
    return HOST_UNREACHABLE


def reply_for_reason(reason: str, prohibited: bool = False) -> Reply:
    """SOCKS5 reply code for an SSH channel-open failure."""
    if prohibited:
        return Reply.NOT_ALLOWED
    text = reason.lower()
    if "refused" in text:
        return Reply.CONNECTION_REFUSED
    if "network is unreachable" in text or "network unreachable" in text:
        return Reply.NETWORK_UNREACHABLE
    if any(s in text for s in ("no route", "unreachable", "not known", "resolve", "timed out",
                               "name", "host is down")):
        return Reply.HOST_UNREACHABLE
    return Reply.GENERAL_FAILURE


async def dial(protocol: asyncio.BaseProtocol, host: str, port: int, timeout: float,
               proxy: ProxyURL | None = None) -> asyncio.BaseTransport:
    """Connect to ``host:port`` (directly or via ``proxy``) and run ``protocol`` on it."""
    loop = asyncio.get_running_loop()
    if proxy is not None:
        from .transport.proxy import ProxyDialError, dial_via_proxy

        try:
            sock = await dial_via_proxy(proxy, host, port, timeout)
        except ProxyDialError as exc:
            if exc.reason == "prohibited":  # the proxy's own "not allowed" (SOCKS5 2, HTTP 403)
                raise DialError(NOT_ALLOWED, prohibited=True) from None
            raise DialError({"refused": REFUSED, "unreachable": HOST_UNREACHABLE,
                             "net-unreachable": NET_UNREACHABLE, "timeout": TIMED_OUT}.get(exc.reason, PROXY_FAILED)) from None
        transport, _ = await loop.create_connection(lambda: protocol, sock=sock)
        return transport
    try:
        async with asyncio.timeout(timeout):  # no extra task, unlike wait_for() on 3.11
            transport, _ = await loop.create_connection(lambda: protocol, host, port)
    except (OSError, asyncio.TimeoutError) as exc:
        raise DialError(reason_for_oserror(exc)) from None
    return transport
