"""Stealth mode: after the TLS handshake, look like a stock nginx until the client says ``SSH-``.

The server sends nothing first. The peek protocol reads the client's first
bytes:

* ``SSH-`` → the real protocol (SSH) takes over the transport; it is
  created only now, so the server's SSH banner goes out only now, and it is
  fed the bytes read so far;
* anything else → once the request header is complete (the blank line), or
  as soon as the input cannot be the start of a request (nginx rejects a bad
  method character at once), the exact response nginx gives for a missing
  page — status line, ``Server: nginx``, ``Date``, ``Content-Type:
  text/html``, ``Content-Length``, ``Connection: close`` and nginx's 404 HTML
  body — then close;
* an incomplete request (``G``, ``GET / HTTP/1.1\r\nHost: x\r\n``, and so
  also ``S`` or ``SSH``: nginx's method characters are ``A-Z _ -``): closed
  with nothing sent, at EOF or after ``timeout`` seconds, what nginx does
  (``client_header_timeout``) — a partial ``SSH-`` looks like any other
  partial request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from email.utils import formatdate

from .base import ProtocolFactory

log = logging.getLogger("wraith.server")

SSH_PREFIX = b"SSH-"

# nginx's built-in 404 page (src/http/ngx_http_special_response.c) with server_tokens off
NGINX_404_BODY = (
    b"<html>\r\n"
    b"<head><title>404 Not Found</title></head>\r\n"
    b"<body>\r\n"
    b"<center><h1>404 Not Found</h1></center>\r\n"
    b"<hr><center>nginx</center>\r\n"
    b"</body>\r\n"
    b"</html>\r\n"
)

MAX_REQUEST_HEADER = 16 * 1024
_METHOD_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_-")


def could_be_request(data: bytes) -> bool:
    """Whether nginx would still wait for more of ``data``: leading empty lines are
    skipped, and a request line starts with a method of ``A-Z``, ``_`` and ``-``."""
    data = data.lstrip(b"\r\n")
    space = data.find(b" ")
    method = data if space < 0 else data[:space]
    return space != 0 and all(c in _METHOD_CHARS for c in method)


def nginx_404(head_only: bool = False, date: str | None = None) -> bytes:
    headers = (
        b"HTTP/1.1 404 Not Found\r\n"
        b"Server: nginx\r\n"
        b"Date: " + (date or formatdate(usegmt=True)).encode() + b"\r\n"
        b"Content-Type: text/html\r\n"
        b"Content-Length: " + str(len(NGINX_404_BODY)).encode() + b"\r\n"
        b"Connection: close\r\n"
        b"\r\n"
    )
    return headers if head_only else headers + NGINX_404_BODY


class StealthPeek(asyncio.Protocol):
    """First protocol on an accepted TLS stream in stealth mode."""

    def __init__(self, inner_factory: ProtocolFactory, timeout: float,
                 on_done: Callable[[], None] | None = None) -> None:
        self._inner_factory = inner_factory
        self._timeout = timeout
        self._on_done = on_done  # called once the peek is over (handed to SSH, or lost)
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._mode = "peek"  # peek -> ssh | http -> done
        self._timer: asyncio.TimerHandle | None = None

    # -- helpers -------------------------------------------------------------------

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _peer(self) -> str:
        peer = self._transport.get_extra_info("peername") if self._transport else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"

    # -- protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._arm(self._timeout, self._idle)

    def data_received(self, data: bytes) -> None:
        if self._mode == "peek":
            self._buf += data
            head = bytes(self._buf[: len(SSH_PREFIX)])
            if len(head) == len(SSH_PREFIX) and head == SSH_PREFIX:
                self._handover()
                return
            if SSH_PREFIX.startswith(head):
                return  # a prefix of "SSH-": wait for more
            self._mode = "http"
        elif self._mode == "http":
            if len(self._buf) < MAX_REQUEST_HEADER:
                self._buf += data[: MAX_REQUEST_HEADER - len(self._buf)]
        else:
            return  # "done": anything sent after the answer is ignored until the close completes
        buf = bytes(self._buf)
        if (b"\r\n\r\n" in buf or b"\n\n" in buf or len(buf) >= MAX_REQUEST_HEADER
                or not could_be_request(buf)):
            self._answer()
        # else: wait for the rest until the timeout set at connection_made

    def _handover(self) -> None:
        self._disarm()
        self._mode = "ssh"
        transport = self._transport
        assert transport is not None
        inner = self._inner_factory()
        transport.set_protocol(inner)
        inner.connection_made(transport)
        self._done()
        if transport.is_closing():
            return
        # the inner protocol may itself have handed over (the server's admission gate does)
        current = transport.get_protocol()
        data, self._buf = bytes(self._buf), bytearray()
        current.data_received(data)  # type: ignore[attr-defined]

    def _answer(self) -> None:
        if self._mode != "http":
            return
        self._mode = "done"
        self._disarm()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        head_only = bytes(self._buf[:5]) == b"HEAD "
        log.info("stealth decoy remote_addr=%s", self._peer())
        transport.write(nginx_404(head_only))
        transport.close()

    def _idle(self) -> None:
        self._timer = None
        self._mode = "done"
        if self._transport is not None:
            self._transport.close()

    def eof_received(self) -> bool | None:
        if self._mode in ("peek", "http"):  # an incomplete request: closed without an answer
            self._mode = "done"
            self._disarm()
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._mode = "done"
        self._transport = None
        self._done()

    def _done(self) -> None:
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done()

