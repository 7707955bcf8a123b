"""ConnectOptions / ServeOptions: the one place flags become values.

Field names are the CLI flags in snake_case. Key inputs accept a path or the
key bytes/text themselves. ``WRAITH_SERVER`` and ``WRAITH_IDENTITY`` provide
defaults for ``server`` and ``identity``.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlsplit

from .addr import ForwardSpec, ProxyURL, parse_forward, parse_hostport, parse_proxy
from .errors import UsageError
from .keys import KeyInput

TRANSPORTS = ("tcp", "tls", "iroh")
DEFAULT_PORT = 2222
# Measured: 256 KiB SSH packets (with malloc top-pad tuning, see tuning.py) bring
# asyncssh to OpenSSH's throughput; 32 KiB packets run at about half.
DEFAULT_PKTSIZE = 256 * 1024
DEFAULT_WINDOW = 4 * 1024 * 1024
DEFAULT_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
                   "aes128-ctr", "aes256-ctr")


UINT32_MAX = 0xFFFF_FFFF


def _at_least(opts: object, name: str, low: float, hint: str = "") -> None:
    value = getattr(opts, name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value or value < low:
        flag = "--" + name.replace("_", "-")
        raise UsageError(f"{flag} must be a number of at least {low}" + (f" ({hint})" if hint else ""))


def _positive(opts: object, name: str) -> None:
    value = getattr(opts, name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or value == float("inf"):
        raise UsageError(f"--{name.replace('_', '-')} must be a number above 0")


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _default_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "wraith"


@dataclass
class _Common:
    transport: str = "tcp"
    proxy: str | None = field(default=None, repr=False)  # may carry user:password
    iroh_relay: str | None = None
    max_pktsize: int = DEFAULT_PKTSIZE
    window: int = DEFAULT_WINDOW
    # asyncssh gives up after interval x (count_max + 1) without an answer: 15 s by default
    keepalive_interval: float = 5.0
    keepalive_count_max: int = 2
    # SSH cipher preference (first match wins). AES-GCM first: asyncssh's chacha20-poly1305
    # builds several cipher contexts per packet, which dominates per-connection cost.
    ciphers: list[str] = field(default_factory=lambda: list(DEFAULT_CIPHERS))
    # A relay with EOF in one direction only and no traffic for this long is closed (0: never).
    half_open_timeout: float = 300.0

    def _check_common(self) -> None:
        if self.transport not in TRANSPORTS:
            raise UsageError(f"unknown transport {self.transport!r} (choose tcp, tls or iroh)")
        if self.max_pktsize < 1024:
            raise UsageError("max_pktsize must be at least 1024")
        if self.window < self.max_pktsize:
            raise UsageError("window must be at least max_pktsize")
        if self.window > UINT32_MAX:
            raise UsageError(f"window must be at most {UINT32_MAX} (an SSH uint32)")
        _at_least(self, "keepalive_interval", 0, "0 turns keepalives off")
        _at_least(self, "keepalive_count_max", 1)
        _at_least(self, "half_open_timeout", 0, "0 means never")
        if self.proxy is not None:
            parse_proxy(self.proxy)
        relay = (self.iroh_relay or "").strip()
        if relay and self.transport != "iroh":
            raise UsageError("--iroh-relay is for the iroh transport: add --transport iroh")
        if relay and relay.lower() != "none":
            try:
                parts = urlsplit(relay)
                ok = parts.scheme in ("http", "https") and bool(parts.hostname)
            except ValueError:
                ok = False
            if not ok:
                raise UsageError(f"--iroh-relay: expected an http(s):// relay URL or none, got {relay!r}")

    def proxy_url(self) -> ProxyURL | None:
        return parse_proxy(self.proxy) if self.proxy else None

    def replace(self, **changes: Any) -> Any:
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass
class ConnectOptions(_Common):
    """Options of ``wraith connect`` and ``open_stream``."""

    server: str | None = field(default_factory=lambda: _env("WRAITH_SERVER"))
    peer: str | None = None
    identity: KeyInput | None = field(default_factory=lambda: _env("WRAITH_IDENTITY"), repr=False)
    certificate: KeyInput | None = None
    user: str = field(default_factory=_default_user)
    socks5: str | None = "127.0.0.1:1080"
    socks5_auth: str | None = field(default=None, repr=False)
    forward: list[str] = field(default_factory=list)
    remote_forward: list[str] = field(default_factory=list)
    tls_server_name: str | None = None
    tls_ca: KeyInput | None = None
    insecure: bool = False
    known_hosts: KeyInput | None = None
    host_key: KeyInput | None = None
    accept_any_host_key: bool = False
    connect_timeout: float = 15.0
    # How long a new channel waits for the session during an outage before failing.
    session_wait: float = 5.0

    def check(self) -> None:
        self._check_common()
        if self.transport == "iroh":
            if not self.peer:
                raise UsageError("--transport iroh needs --peer ENDPOINT_ID_OR_TICKET")
        elif self.peer:
            raise UsageError("--peer is for the iroh transport: add --transport iroh")
        elif not self.server:
            raise UsageError("--server HOST:PORT is required (or set WRAITH_SERVER)")
        if self.transport != "tls" and (self.tls_server_name or self.tls_ca or self.insecure):
            raise UsageError("--tls-server-name, --tls-ca and --insecure are for the tls transport: "
                             "add --transport tls")
        if self.identity is None:
            raise UsageError("--identity KEY is required (or set WRAITH_IDENTITY)")
        if not (self.known_hosts or self.host_key or self.accept_any_host_key):
            raise UsageError(
                "refusing to connect without host key verification: give --known-hosts FILE or "
                "--host-key KEY|SHA256:…, or --accept-any-host-key to skip it"
            )
        if self.socks5_auth is not None and ":" not in self.socks5_auth:
            raise UsageError("--socks5-auth expects USER:PASS")
        _positive(self, "connect_timeout")
        _at_least(self, "session_wait", 0)
        self.server_address()
        if self.socks5:
            self.socks5_address()
        self.forwards()
        self.remote_forwards()

    def server_address(self) -> tuple[str, int]:
        spec = self.server or ""
        if "@" in spec:
            spec = spec.rsplit("@", 1)[1]
        if self.transport == "iroh":
            return (self.peer or "", 0)
        return parse_hostport(spec, "--server", default_port=DEFAULT_PORT)

    def ssh_user(self) -> str:
        if self.server and "@" in self.server:
            return self.server.rsplit("@", 1)[0]
        return self.user

    def socks5_address(self) -> tuple[str, int]:
        return parse_hostport(self.socks5 or "", "--socks5", default_host="127.0.0.1",
                              default_port=1080, allow_zero=True)

    def socks5_credentials(self) -> tuple[bytes, bytes] | None:
        if not self.socks5_auth:
            return None
        user, pw = self.socks5_auth.split(":", 1)
        return user.encode(), pw.encode()

    def forwards(self) -> list[ForwardSpec]:
        return [parse_forward(s, "--forward", "127.0.0.1") for s in self.forward]

    def remote_forwards(self) -> list[ForwardSpec]:
        # OpenSSH binds -R listeners on the server's loopback unless told otherwise.
        return [parse_forward(s, "--remote-forward", "localhost") for s in self.remote_forward]


STEALTH_TIMEOUT = 60.0  # seconds, as nginx's client_header_timeout
DEFAULT_MAX_STARTUPS = "10:30:100"  # OpenSSH's default MaxStartups


@dataclass
class ServeOptions(_Common):
    """Options of ``wraith serve`` and ``serve()``."""

    key: KeyInput | None = field(default=None, repr=False)  # (private key inputs may be the key itself)
    authorized_keys: KeyInput | None = None
    cert_authority: KeyInput | None = None
    listen: str = f"0.0.0.0:{DEFAULT_PORT}"
    tls_cert: KeyInput | None = None
    tls_key: KeyInput | None = field(default=None, repr=False)
    stealth: bool = False
    stealth_timeout: float = STEALTH_TIMEOUT
    max_connections_per_ip: int = 0
    # OpenSSH's MaxStartups: connections not yet logged in (TLS handshakes included) are
    # dropped at accept with probability RATE % from START on, rising to 100 % at FULL
    max_startups: str | int = DEFAULT_MAX_STARTUPS
    max_auth_attempts: int = 10
    login_grace_time: float = 30.0
    # per SSH connection: each remote-forward listener and each channel's target socket is
    # a descriptor, and one login must not be able to take all of the server's (0: no limit)
    max_forwards_per_connection: int = 64
    max_channels_per_connection: int = 32768  # (idle channels cost ~2 KiB: one connection may carry many)
    connect_timeout: float = 10.0
    drain_time: float = 2.0

    def check(self) -> None:
        self._check_common()
        if self.key is None:
            raise UsageError("--key HOSTKEY is required (make one with `wraith keygen HOSTKEY`)")
        if self.authorized_keys is None and self.cert_authority is None:
            raise UsageError("give --authorized-keys FILE and/or --cert-authority FILE (public-key auth only)")
        if self.stealth and self.transport != "tls":
            raise UsageError("--stealth works only with --transport tls")
        if self.transport != "tls" and (self.tls_cert or self.tls_key):
            raise UsageError("--tls-cert and --tls-key are for the tls transport: add --transport tls")
        if self.stealth_timeout != STEALTH_TIMEOUT and not self.stealth:
            raise UsageError("--stealth-timeout is for --stealth")
        if self.transport == "tls" and not (self.tls_cert and self.tls_key):
            raise UsageError("--transport tls needs --tls-cert PEM and --tls-key PEM")
        if self.max_auth_attempts < 1:
            raise UsageError("--max-auth-attempts must be at least 1")
        for name in ("max_connections_per_ip", "max_forwards_per_connection", "max_channels_per_connection"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be 0 (unlimited) or more")
        self.startups()
        _positive(self, "stealth_timeout")
        _positive(self, "login_grace_time")
        _positive(self, "connect_timeout")
        _at_least(self, "drain_time", 0)
        if self.transport != "iroh":
            self.listen_address()

    def startups(self) -> tuple[int, int, int] | None:
        """``max_startups`` as (start, rate in %, full), or None for no limit ("0").
        A single number N is OpenSSH's N: N:100:N, every connection past N dropped."""
        text = str(self.max_startups).strip()
        parts = text.split(":")
        bad = UsageError(f"--max-startups: expected START:RATE:FULL (like 10:30:100), N or 0, got {text!r}")
        if len(parts) not in (1, 3) or not all(p.isascii() and p.isdigit() and len(p) <= 9 for p in parts):
            raise bad
        if len(parts) == 1:
            full = int(parts[0])
            return None if full == 0 else (full, 100, full)
        start, rate, full = (int(p) for p in parts)
        if not (0 < start <= full and 0 < rate <= 100):
            raise bad
        return start, rate, full

    def listen_address(self) -> tuple[str, int]:
        return parse_hostport(self.listen, "--listen", default_host="0.0.0.0",
                              default_port=DEFAULT_PORT, allow_zero=True)
