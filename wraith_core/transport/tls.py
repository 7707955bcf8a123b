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
import logging
import os
import ssl
import tempfile

from ..errors import ConnectError, UsageError
from ..keys import KeyInput, read_key_input
from ..options import ConnectOptions, ServeOptions
from .base import ProtocolFactory
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
        # what a stock nginx `listen 443 ssl` answers to a browser's ALPN offer
        ctx.set_alpn_protocols(["http/1.1"])
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
    kind = "tls"

    def __init__(self, options: ServeOptions) -> None:
        super().__init__(options)
        self._options = options
        self._ctx = server_context(options)

    async def start(self, protocol_factory: ProtocolFactory) -> None:
        opts = self._options
        factory = protocol_factory
        handshake_timeout = opts.login_grace_time
        if opts.stealth:
            from .stealth import stealth_factory

            factory = stealth_factory(protocol_factory, opts.stealth_timeout)
            handshake_timeout = opts.stealth_timeout
        loop = asyncio.get_running_loop()
        host: str | None = None if self.host in ("", "*") else self.host
        try:
            self._server = await loop.create_server(
                factory, host, self.port, reuse_address=True, backlog=1024, ssl=self._ctx,
                ssl_handshake_timeout=max(1.0, handshake_timeout))
        except OSError as exc:
            raise ConnectError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
