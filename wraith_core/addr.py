"""Parsing of HOST:PORT, OpenSSH -L/-R forward specs and proxy URLs."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from .errors import UsageError


def _port(text: str, what: str, allow_zero: bool = False) -> int:
    try:
        port = int(text)
    except ValueError:
        raise UsageError(f"{what}: invalid port {text!r}") from None
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise UsageError(f"{what}: port out of range: {port}")
    return port


def _split_fields(spec: str) -> list[str]:
    """Split on ':' while keeping bracketed IPv6 literals whole (brackets removed)."""
    fields: list[str] = []
    i = 0
    cur = ""
    while i < len(spec):
        ch = spec[i]
        if ch == "[" and not cur:
            end = spec.find("]", i)
            if end < 0:
                raise UsageError(f"unterminated '[' in {spec!r}")
            cur = spec[i + 1 : end]
            i = end + 1
            if i < len(spec) and spec[i] != ":":
                raise UsageError(f"expected ':' after ']' in {spec!r}")
            continue
        if ch == ":":
            fields.append(cur)
            cur = ""
        else:
            cur += ch
        i += 1
    fields.append(cur)
    return fields


def parse_hostport(spec: str, what: str, default_host: str | None = None,
                   default_port: int | None = None, allow_zero: bool = False) -> tuple[str, int]:
    """Parse ``host:port``, ``[v6]:port``, ``host`` (with default port) or ``:port``."""
    spec = spec.strip()
    if not spec:
        raise UsageError(f"{what}: empty address")
    if spec.startswith("["):
        fields = _split_fields(spec)
    elif spec.count(":") > 1:  # bare IPv6 without a port
        if default_port is None:
            raise UsageError(f"{what}: IPv6 addresses need brackets and a port: [ADDR]:PORT")
        return spec, default_port
    else:
        fields = spec.split(":")
    if len(fields) == 1:
        if fields[0].isascii() and fields[0].isdigit() and default_host is not None:
            return default_host, _port(fields[0], what, allow_zero)
        if default_port is None:
            raise UsageError(f"{what}: expected HOST:PORT, got {spec!r}")
        return fields[0], default_port
    if len(fields) != 2:
        raise UsageError(f"{what}: expected HOST:PORT, got {spec!r}")
    host, port = fields
    if not host:
        if default_host is None:
            raise UsageError(f"{what}: missing host in {spec!r}")
        host = default_host
    return host, _port(port, what, allow_zero)


@dataclass(frozen=True)
class ForwardSpec:
    """An OpenSSH ``[bind_address:]port:host:hostport`` forward."""

    bind_host: str
    bind_port: int
    host: str
    port: int

    def __str__(self) -> str:  # never logged with the destination; used for display to the user only
        return f"{self.bind_host}:{self.bind_port}"


def parse_forward(spec: str, what: str, default_bind: str) -> ForwardSpec:
    fields = _split_fields(spec.strip())
    if len(fields) == 3:
        bind, (port, host, hostport) = default_bind, fields
    elif len(fields) == 4:
        bind, port, host, hostport = fields
        if bind in ("", "*"):
            bind = "0.0.0.0" if bind == "*" else default_bind
        elif bind == "localhost":
            bind = "127.0.0.1"
    else:
        raise UsageError(f"{what}: expected [bind_address:]port:host:hostport, got {spec!r}")
    if not host:
        raise UsageError(f"{what}: missing target host in {spec!r}")
    return ForwardSpec(bind, _port(port, what, allow_zero=True), host, _port(hostport, what))


@dataclass(frozen=True)
class ProxyURL:
    scheme: str  # "socks5" | "http"
    host: str
    port: int
    username: str | None
    password: str | None = field(repr=False)


def redact_url(url: str) -> str:
    """``url`` with the password of its userinfo shown as ``***`` (for messages)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hostpart}"


def parse_proxy(url: str) -> ProxyURL:
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. "http://[::1" (unterminated IPv6 literal)
        raise UsageError(f"--proxy: invalid URL {shown!r} ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme in ("socks5h",):
        scheme = "socks5"
    if scheme not in ("socks5", "http"):
        raise UsageError(f"--proxy: unsupported scheme {parts.scheme!r} (use socks5:// or http://)")
    if not parts.hostname:
        raise UsageError(f"--proxy: missing host in {shown!r}")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:  # out of range, not a number, or an explicit :0
        raise UsageError(f"--proxy: invalid port in {shown!r}")
    user = unquote(parts.username) if parts.username else None
    pw = unquote(parts.password) if parts.password else None
    if scheme == "socks5" and any(v is not None and (not v.isascii() or len(v) > 255) for v in (user, pw)):
        raise UsageError("--proxy: SOCKS5 user name and password must be ASCII, at most 255 characters each")
    return ProxyURL(scheme, parts.hostname, port or (1080 if scheme == "socks5" else 8080), user, pw)
