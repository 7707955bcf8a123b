"""TLS transport: SSH inside TLS over TCP (stdlib ``ssl``).

Client: verifies the server certificate against the system CAs or
``--tls-ca``; SNI from ``--tls-server-name`` (default: the server's host);
``--insecure`` accepts any certificate and says so once. The TCP connection
under TLS dials through ``--proxy`` like the tcp transport.

Server: ``--tls-cert``/``--tls-key`` (PEM, path or bytes). With ``--stealth``
each accepted stream first runs the peek protocol from ``stealth.py``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import ssl
import struct
import tempfile
import time
from collections.abc import Callable
from typing import Any

from ..errors import ConnectError, UsageError
from ..keys import KeyInput, read_key_input
from ..options import ConnectOptions, ServeOptions
from .base import ProtocolFactory, accepted_at
from .tcp import TCPAcceptor, open_tcp_socket

log = logging.getLogger("wraith.transport")

_insecure_warned = False


class TLSError(ConnectError):
    """The TLS handshake failed; certificate problems say so (code ``ETLS``)."""

    code = "ETLS"


def _warn_insecure() -> None:
    global _insecure_warned
    if not _insecure_warned:
        _insecure_warned = True
        log.warning("--insecure: the server's TLS certificate is NOT verified (any certificate is accepted)")


def _read_pem(value: KeyInput, what: str) -> bytes:
    data, _ = read_key_input(value, what)
    return data


def client_context(options: ConnectOptions) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if options.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif options.tls_ca is not None:
        data = _read_pem(options.tls_ca, "TLS CA")
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=_pem_text(data, "--tls-ca"))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # offer what an HTTPS client offers (a stealth server answers like nginx: http/1.1)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _pem_text(data: bytes, what: str) -> str:
    text = data.decode("ascii", "replace")
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise UsageError(f"{what}: not a PEM certificate file")
    return text


def server_context(options: ServeOptions) -> ssl.SSLContext:
    assert options.tls_cert is not None and options.tls_key is not None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if options.stealth:
        # what a stock nginx `listen 443 ssl` answers to a browser's ALPN offer, and its
        # default ssl_ciphers (TLS 1.2) without a server preference (ssl_prefer_server_ciphers off)
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.set_ciphers("HIGH:!aNULL:!MD5")
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    cert = _read_pem(options.tls_cert, "TLS certificate")
    key = _read_pem(options.tls_key, "TLS key")
    # load_cert_chain only takes paths: inline PEM goes through a private temp file
    with tempfile.TemporaryDirectory(prefix="wraith-tls-") as d:
        cpath, kpath = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        for path, data in ((cpath, cert), (kpath, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        try:
            ctx.load_cert_chain(cpath, kpath)
        except ssl.SSLError as exc:
            raise UsageError("cannot load --tls-cert/--tls-key: expected a PEM certificate (chain) and its "
                             f"matching PEM private key ({exc.reason or exc})") from None
    return ctx


def _tls_failure(exc: BaseException, where: str) -> TLSError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or exc.reason or "verification failed"
        return TLSError(f"TLS certificate verification failed for {where}: {why}")
    if isinstance(exc, ssl.SSLError):
        return TLSError(f"TLS handshake with {where} failed: {exc.reason or exc}")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return TLSError(f"TLS handshake with {where} timed out")
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return TLSError(f"TLS connection to {where} failed: {text}")


class TLSConnector:
    kind = "tls"

    def __init__(self, options: ConnectOptions) -> None:
        self._options = options
        self.host, self.port = options.server_address()
        self.server_name = options.tls_server_name or self.host
        self._ctx = client_context(options)

    def describe(self) -> str:
        return f"{self.host}:{self.port} (tls)"

    async def connect(self, protocol_factory: ProtocolFactory) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
        if self._options.insecure:
            _warn_insecure()
        loop = asyncio.get_running_loop()
        sock = await open_tcp_socket(self._options, self.host, self.port)
        try:
            return await loop.create_connection(
                protocol_factory, sock=sock, ssl=self._ctx, server_hostname=self.server_name,
                ssl_handshake_timeout=self._options.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            sock.close()
            raise _tls_failure(exc, f"{self.host}:{self.port}") from None


class TLSAcceptor(TCPAcceptor):
    """Accepts TCP itself, so a connection is admitted (``admit``, the server's per-IP
    limit and max-startups) before its TLS handshake: handshakes, and in stealth mode
    the silent wait for the client's first bytes, hold a place in those limits too.
    Otherwise a single address could keep any number of connections open in those
    phases.

    The login grace time counts from the accept: the handshake gets what is left of
    it, and the protocol that takes over once it is done (the server's gate) is told
    the accept time (``accepted_at``) so SSH gets only the rest, not a new grace time.
    In stealth mode the waits before SSH are nginx's (``--stealth-timeout``), but a
    stream that turns out to be SSH still has to log in by accept + grace time."""

    kind = "tls"

    def __init__(self, options: ServeOptions) -> None:
        super().__init__(options)
        self._options = options
        self._ctx = server_context(options)
        # per accepted address: a release callback for its place, or None (refused)
        self.admit: Callable[[str], Callable[[], None] | None] | None = None
        self._listeners: list[socket.socket] = []
        self._factory: ProtocolFactory | None = None
        self._handshakes: set[asyncio.Task[None]] = set()

    async def start(self, protocol_factory: ProtocolFactory) -> None:
        self._factory = protocol_factory
        host: str | None = None if self.host in ("", "*") else self.host
        try:
            self._listeners = await listen_sockets(host, self.port)
        except OSError as exc:
            raise ConnectError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self._serve()

    def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        for lsock in self._listeners:
            loop.add_reader(lsock.fileno(), self._accept, lsock)

    def _accept(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # out of descriptors or memory: stop accepting for a moment (as asyncio does)
                    log.warning("cannot accept connections: %s; pausing for 1 s", exc.strerror or exc)
                    for ls in self._listeners:
                        loop.remove_reader(ls.fileno())
                    loop.call_later(1.0, self._resume)
                    return
                continue  # e.g. ECONNABORTED: that one connection is gone
            accepted = time.monotonic()
            release = self.admit(str(addr[0])) if self.admit is not None else _nothing
            if release is None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
                sock.close()
                continue
            task = loop.create_task(self._handshake(sock, release, accepted))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    def _resume(self) -> None:
        if self._listeners:
            self._serve()

    async def _handshake(self, sock: socket.socket, release: Callable[[], None], accepted: float) -> None:
        opts = self._options
        assert self._factory is not None
        inner = accepted_at(self._factory, accepted)
        factory: ProtocolFactory = inner
        ctx: ssl.SSLContext | None = self._ctx
        timeout = opts.login_grace_time - (time.monotonic() - accepted)
        once = _Once(release)
        loop = asyncio.get_running_loop()
        try:
            sock.setblocking(False)
        except OSError:
            sock.close()
            once()
            return
        if opts.stealth:  # the place is held until the peek is over: handed to SSH, or closed
            from .stealth import StealthPeek, greet

            startup_over_in = getattr(release, "startup_over_in", None)  # (max_startups: not past the grace time)
            if startup_over_in is not None:
                startup_over_in(timeout)  # (the grace time left)
            timeout, started = opts.stealth_timeout, loop.time()
            try:
                greeted = await greet(sock, timeout)  # before TLS, on the raw socket
            except Exception:  # (none expected) that connection only
                greeted = None
            except asyncio.CancelledError:
                sock.close()
                once()
                raise
            if greeted is None:
                sock.close()
                once()
                return
            tls: bool = greeted
            left = max(0.0, timeout - (loop.time() - started))  # for the handshake, as in nginx
            peek = timeout if tls else left  # plain HTTP: answered within the same time, like nginx
            ctx, timeout = (ctx if tls else None), left
            factory = lambda: StealthPeek(inner, peek, on_done=once, tls=tls)  # noqa: E731
        # From here the loop owns the socket, and closes it on failure: closing it here
        # too could close a descriptor number that a new connection has taken meanwhile.
        try:
            await loop.connect_accepted_socket(
                factory, sock, ssl=ctx, ssl_handshake_timeout=None if ctx is None else max(0.1, timeout))
        except asyncio.CancelledError:
            once()
            raise
        except Exception as exc:  # a failed or timed-out handshake: that connection only
            log.debug("tls handshake failed: %s", type(exc).__name__)
            once()
        else:
            if not opts.stealth:  # the server's gate has counted the connection by now
                once()

    def bound(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for s in self._listeners]

    def close(self) -> None:
        if self._listeners:
            loop = asyncio.get_running_loop()
            for lsock in self._listeners:
                loop.remove_reader(lsock.fileno())
                lsock.close()
            self._listeners = []
        for task in list(self._handshakes):
            task.cancel()

    async def wait_closed(self) -> None:
        await asyncio.sleep(0)


ACCEPT_BATCH = 128  # connections taken per wake-up of a listening socket
LINGER_ZERO = struct.pack("ii", 1, 0)  # close = RST: a refused connection ends at once


def _nothing() -> None:
    pass


class _Once:
    """Call ``fn`` the first time only."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn: Callable[[], None] | None = fn

    def __call__(self) -> None:
        fn, self.fn = self.fn, None
        if fn is not None:
            fn()


async def listen_sockets(host: str | None, port: int, backlog: int = 1024) -> list[socket.socket]:
    """Listening, non-blocking sockets for ``host`` (None: every interface, IPv4 and
    IPv6), bound the way ``loop.create_server`` binds them."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, type_, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            s = socket.socket(family, type_, proto)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(addr)
            s.listen(backlog)
            s.setblocking(False)
    except OSError:
        for s in socks:
            s.close()
        raise
    return socks
