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
* an HTTP/0.9 request line (``GET /`` with no version): nginx's bare 404
  page at once, no header;
* an incomplete request (``G``, ``GET / HTTP/1.1\r\nHost: x\r\n``, and so
  also ``S`` or ``SSH``: nginx's method characters are ``A-Z _ -``): closed
  with nothing sent, at EOF or after ``timeout`` seconds, what nginx does
  (``client_header_timeout``) — a partial ``SSH-`` looks like any other
  partial request.

Connections end the way nginx ends them: close_notify (none after a client's
EOF or a partial request's timeout) and the TCP close at once — never waiting
for the client's close_notify.

Before TLS (``greet``, on the raw accepted socket) the server peeks at the
first bytes like nginx: a ClientHello whose ALPN list lacks ``http/1.1`` gets
alert 120 (no_application_protocol); a first byte that starts no TLS record is
served as plain HTTP: nginx's "400 The plain HTTP request was sent to HTTPS
port" (or its plain 400 for input that is no request), never SSH.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
from collections.abc import Callable
from email.utils import formatdate

from .base import ProtocolFactory, wait_readable

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

NGINX_400_BODY = (
    b"<html>\r\n"
    b"<head><title>400 Bad Request</title></head>\r\n"
    b"<body>\r\n"
    b"<center><h1>400 Bad Request</h1></center>\r\n"
    b"<hr><center>nginx</center>\r\n"
    b"</body>\r\n"
    b"</html>\r\n"
)

# nginx's answer to a plain HTTP request on an `ssl` port (NGX_HTTP_TO_HTTPS)
NGINX_PLAIN_HTTP_BODY = (
    b"<html>\r\n"
    b"<head><title>400 The plain HTTP request was sent to HTTPS port</title></head>\r\n"
    b"<body>\r\n"
    b"<center><h1>400 Bad Request</h1></center>\r\n"
    b"<center>The plain HTTP request was sent to HTTPS port</center>\r\n"
    b"<hr><center>nginx</center>\r\n"
    b"</body>\r\n"
    b"</html>\r\n"
)

# fatal alert no_application_protocol (120), the record OpenSSL sends for nginx (>= 1.21.4)
ALERT_NO_APPLICATION_PROTOCOL = b"\x15\x03\x03\x00\x02\x02\x78"

MAX_REQUEST_HEADER = 16 * 1024
_METHOD_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_-")


def could_be_request(data: bytes) -> bool:
    """Whether nginx would still wait for more of ``data``: leading empty lines are
    skipped, and a request line starts with a method of ``A-Z``, ``_`` and ``-``."""
    data = data.lstrip(b"\r\n")
    space = data.find(b" ")
    method = data if space < 0 else data[:space]
    return space != 0 and all(c in _METHOD_CHARS for c in method)


def request_line(data: bytes) -> list[bytes] | None:
    """The words of the first request line once it is complete (leading empty lines skipped)."""
    data = data.lstrip(b"\r\n")
    end = data.find(b"\n")
    return None if end < 0 else [w for w in data[:end].rstrip(b"\r").split(b" ") if w]


def nginx_page(status: bytes, body: bytes, head_only: bool = False, date: str | None = None) -> bytes:
    headers = (
        b"HTTP/1.1 " + status + b"\r\n"
        b"Server: nginx\r\n"
        b"Date: " + (date or formatdate(usegmt=True)).encode() + b"\r\n"
        b"Content-Type: text/html\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        b"Connection: close\r\n"
        b"\r\n"
    )
    return headers if head_only else headers + body


# -- before TLS ----------------------------------------------------------------------

MAX_PEEK = 5 + 16 * 1024 + 256  # a TLS record: header and the largest (compressed) fragment


async def greet(sock: socket.socket, timeout: float) -> bool | None:
    """Peek at what the client sends first on the raw socket, as nginx does: True for a TLS
    handshake, False for anything else (plain HTTP), None when the connection is to be closed
    now (nothing arrived within ``timeout`` seconds, or its ALPN offer was answered with
    alert 120). Nothing is consumed, except a refused ClientHello."""
    first = await _first_flight(sock, timeout)
    if not first:
        return None
    if not (first[0] == 0x16 or first[0] & 0x80):  # nginx: a TLS record or an SSLv2 hello
        return False
    names = offered_alpn(first)
    if names is None or b"http/1.1" in names:
        return True
    try:  # read the ClientHello (a close with unread input would be a reset), answer the alert
        sock.recv(len(first))
        sock.send(ALERT_NO_APPLICATION_PROTOCOL)
    except OSError:
        pass
    return None


async def _first_flight(sock: socket.socket, timeout: float) -> bytes:
    """The client's first bytes, peeked: all of a TLS record that it starts, if that arrives
    in time; b"" if nothing came (or EOF)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    data, delay = b"", 0.01
    while True:
        if data:  # a peeked socket stays readable: poll for the rest of the record
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.25)
        elif not await wait_readable(sock, deadline - loop.time()):
            return b""
        try:
            data = sock.recv(MAX_PEEK, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            return b""
        if not data or data[0] != 0x16 or loop.time() >= deadline:
            return data
        if len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[3:5], "big"):
            return data
        if _peer_closed(sock):  # part of a record, then EOF: nothing more will come (nginx closes)
            return b""


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the peer has shut its side down (seen without reading what is buffered)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)
    return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0))


def offered_alpn(record: bytes) -> list[bytes] | None:
    """The ALPN names a ClientHello in ``record`` (a TLS record) offers; None when it has no
    ALPN extension or is no whole ClientHello in this one record (then OpenSSL decides)."""
    try:
        end = min(len(record), 5 + int.from_bytes(record[3:5], "big"))
        if record[0] != 0x16 or record[5] != 1 or 9 + int.from_bytes(record[6:9], "big") > end:
            return None
        p = 9 + 2 + 32  # record and handshake headers, client_version, random
        p += 1 + record[p]  # session_id
        p += 2 + int.from_bytes(record[p : p + 2], "big")  # cipher_suites
        p += 1 + record[p]  # compression_methods
        stop = p + 2 + int.from_bytes(record[p : p + 2], "big")
        p += 2
        while p + 4 <= stop:
            kind, size = int.from_bytes(record[p : p + 2], "big"), int.from_bytes(record[p + 2 : p + 4], "big")
            p += 4
            if kind == 16:  # application_layer_protocol_negotiation: a 2-byte length, then len+name
                names, q = [], p + 2
                while q < min(p + size, stop):
                    names.append(record[q + 1 : q + 1 + record[q]])
                    q += 1 + record[q]
                return names or None
            p += size
    except IndexError:
        pass
    return None


class StealthPeek(asyncio.Protocol):
    """First protocol on an accepted stream in stealth mode: a TLS stream, or with
    ``tls=False`` a plain one (no TLS handshake came: never SSH, nginx's plain-HTTP 400)."""

    def __init__(self, inner_factory: ProtocolFactory, timeout: float,
                 on_done: Callable[[], None] | None = None, tls: bool = True) -> None:
        self._inner_factory = inner_factory
        self._timeout = timeout
        self._on_done = on_done  # called once the peek is over (handed to SSH, or lost)
        self._tls = tls
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._mode = "peek" if tls else "http"  # peek -> ssh | http -> done
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
        line = request_line(buf)
        if could_be_request(buf) and line is not None and len(line) == 2:  # "GET /": HTTP/0.9
            self._answer(http09=True)
            return
        head = buf.lstrip(b"\r\n")  # nginx skips empty lines before the request line
        if (b"\r\n\r\n" in head or b"\n\n" in head or len(buf) >= MAX_REQUEST_HEADER
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

    def _answer(self, http09: bool = False) -> None:
        if self._mode != "http":
            return
        self._mode = "done"
        self._disarm()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        request = bytes(self._buf).lstrip(b"\r\n")
        method = request.split(b" ", 1)[0]
        status, body = b"400 Bad Request", NGINX_400_BODY
        if self._tls:
            status, body = b"404 Not Found", NGINX_404_BODY
        elif could_be_request(request):
            body = NGINX_PLAIN_HTTP_BODY
        if http09:  # no status line, no header; nginx takes only GET in HTTP/0.9
            answer = body if method == b"GET" else NGINX_400_BODY
        else:
            answer = nginx_page(status, body, head_only=method == b"HEAD")
        log.info("stealth decoy remote_addr=%s", self._peer())
        transport.write(answer)
        self._close(notify=True)

    def _close(self, notify: bool) -> None:
        """Close like nginx: TLS close_notify if ``notify`` (after what was written) and the TCP
        close at once, not waiting for the client's close_notify (asyncio would, for 30 s)."""
        transport = self._transport
        if transport is None:
            return
        if notify or not self._tls:
            transport.close()  # TLS: the data and close_notify go to the socket right away
        if self._tls:
            transport.abort()

    def _idle(self) -> None:
        self._timer = None
        self._mode = "done"
        # nginx: close_notify if nothing came; a partial request's timeout closes quietly
        self._close(notify=not self._buf)

    def eof_received(self) -> bool | None:
        if self._mode in ("peek", "http"):  # an incomplete request: closed without an answer
            self._mode = "done"
            self._disarm()
            if self._tls:
                self._close(notify=False)  # nginx answers no close_notify to the client's close
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

