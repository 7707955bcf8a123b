"""The SSH server: public-key auth policy, limits, channel routing.

* admission: ``max_connections_per_ip``, and OpenSSH's MaxStartups
  (``max_startups``) over connections not yet logged in; one login deadline
  (``login_grace_time``) from the accept, whatever the transport does first;
* auth: public keys (and OpenSSH user certificates) only; every attempt is
  one log line ``auth attempt remote_addr=… user=… key_fingerprint=… result=…``
  (requests for other methods, e.g. passwords, and any "none" request but the
  first, are rejects with ``key_fingerprint=none method=…``);
  ``max_auth_attempts`` failures of any method end the connection;
* ``direct-tcpip``: ``wraith-*`` destinations are reserved and never dialed
  (``wraith-control:0`` goes to the control handler); other targets are
  dialed first and the channel is confirmed only once the target is
  connected, so a failure is a proper channel-open failure;
* ``tcpip-forward``: our own listener, each socket on a SocketChannel;
* per connection at most ``max_forwards_per_connection`` listeners and
  ``max_channels_per_connection`` channels; past them, and when descriptors
  run low (``target_open.in_fd_reserve``), forwards and opens are refused;
* logs never contain destinations, DNS names or byte counts.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import ipaddress
import logging
import re
import secrets
import time
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import asyncssh
from asyncssh.constants import MSG_CHANNEL_OPEN
from asyncssh.packet import String, UInt32
from asyncssh.public_key import decode_ssh_certificate, decode_ssh_public_key

from .. import keys
from ..dial import DialError, dial
from ..duplex import DuplexStream
from ..opening import HoldingOpening
from ..options import ServeOptions
from ..protocol.socks5 import Reply
from ..logs import quiet_asyncssh
from ..relay import RelayEnd
from ..transport.base import Acceptor, TransportInfo, make_acceptor, transport_info
from . import conn_fixes, target_open
from .channels import OPEN_SLACK, ChannelOpenFailed, open_answer
from .internals import has_names
from .socket_channel import SocketChannel
from .tunnel import AcceptorTunnel

log = logging.getLogger("wraith.server")

CONTROL_HOST = "wraith-control"
# target connects in flight per SSH connection (target_open.DialBudget); opens past it are
# refused with "resource shortage" until some of them have an outcome
MAX_DIALS_PER_CONNECTION = 256
RESERVED_PREFIX = "wraith-"
DROP_LOG_EVERY = 10.0  # seconds: connections dropped by max_startups are logged as one line per period
# asyncssh's names we hook to see requests for auth methods other than public keys
_USERAUTH_NAMES = ("_finish_userauth", "_auth_complete")
_OTHER_METHODS = {m.encode(): m for m in ("password", "keyboard-interactive", "hostbased",
                                          "gssapi-with-mic", "gssapi-keyex")}


# A destination host: an IP literal, or a name of letters, digits, "-", "_" and "." (and
# non-ASCII letters, for IDN). Nothing else reaches a resolver or a proxy: "\119raith-x" or
# "wraith\-x" would be unescaped into a reserved name by the resolver; CR/LF, spaces, "@",
# "[" and "]" would be read differently by an HTTP or SOCKS proxy than by this check.
_NAME = re.compile(r"[0-9A-Za-z_.\-\u0080-\U0010FFFF]+")


def _safe_target(host: str) -> bool:
    if not 0 < len(host) <= 255:
        return False
    if _NAME.fullmatch(host) is not None:
        return host.isprintable()  # (no non-ASCII control or format characters either)
    try:
        ipaddress.ip_address(host)  # IPv6 literals ("::1", "fe80::1%eth0")
    except ValueError:
        return False
    return True


def is_reserved(host: str) -> bool:
    """Whether ``host`` names a reserved ``wraith-*`` destination — in any spelling the
    resolver would turn into one: the resolver is handed the IDNA form, which maps
    fullwidth letters to ASCII and drops zero-width characters (``ｗｒａｉｔｈ-control``
    and ``w\u200braith-control`` both look up ``wraith-control``). A proxy may
    normalise with other rules, so the NFKC case fold without format characters is
    checked too."""
    if host.lower().startswith(RESERVED_PREFIX):
        return True
    if host.isascii():
        return False
    try:
        if host.encode("idna").decode("ascii").lower().startswith(RESERVED_PREFIX):
            return True
    except UnicodeError:
        pass  # not resolvable by us; the fold below still decides
    folded = "".join(c for c in unicodedata.normalize("NFKC", host) if unicodedata.category(c) != "Cf")
    return unicodedata.normalize("NFKC", folded.casefold()).startswith(RESERVED_PREFIX)


@dataclass(frozen=True)
class ConnectionInfo:
    """Who is on the other end of an incoming stream."""

    remote_address: str
    transport: str
    user: str
    key_fingerprint: str


ControlHandler = Callable[[DuplexStream, ConnectionInfo], None]


def _key_fingerprint(key_data: bytes) -> str:
    try:
        return keys.fingerprint(decode_ssh_public_key(key_data))
    except asyncssh.KeyImportError:
        pass
    try:
        cert = decode_ssh_certificate(key_data)
        return keys.fingerprint(cert.key)
    except (asyncssh.KeyImportError, AttributeError):
        return "unknown"


class _Gate(asyncio.Protocol):
    """First protocol on an accepted stream: admission control, then SSH takes over."""

    def __init__(self, runner: SSHServerRunner, make_conn: Callable[[], asyncio.BaseProtocol]) -> None:
        self._runner = runner
        self._make_conn = make_conn
        # When the stream was accepted: the login deadline counts from then. Made at the
        # accept (tcp, iroh), or set by an acceptor with a phase before SSH (tls, stealth)
        # to its own accept time, so that phase is inside the login grace time, not added.
        self.accepted_at = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        runner = self._runner
        info = transport_info(transport, runner.kind)
        stream = cast(asyncio.Transport, transport)
        if runner.closing:
            stream.abort()
            return
        limit = runner.options.max_connections_per_ip
        if limit and runner.per_ip[info.remote_addr] >= limit:
            log.info("connection refused remote_addr=%s reason=max-connections-per-ip", info.remote_addr)
            stream.abort()
            return
        # (a stream admitted before its TLS handshake holds a place already: never dropped here)
        if not runner.take_startup(force=runner.admits_early):
            stream.abort()
            return
        runner.per_ip[info.remote_addr] += 1
        conn = self._make_conn()
        conn.set_extra_info(wraith_info=info, wraith_accepted_at=self.accepted_at)  # type: ignore[attr-defined]
        transport.set_protocol(conn)
        conn.connection_made(transport)


class _Admission:
    """The places a connection admitted before its TLS handshake holds: one in the per-IP
    count, one among the connections not yet logged in (``max_startups``). Called once,
    when the stream reaches SSH (the gate counts it from then on) or ends."""

    __slots__ = ("_runner", "_ip", "_startup", "_timer")

    def __init__(self, runner: SSHServerRunner, ip: str) -> None:
        self._runner = runner
        self._ip = ip
        self._startup = True
        self._timer: asyncio.TimerHandle | None = None

    def startup_over_in(self, delay: float) -> None:
        """Give the ``max_startups`` place back after ``delay`` (the login grace time left),
        even if the stream is still held then: a stealth peek holds a silent client for
        nginx's timeouts, longer than the login grace time, and such a stream can no longer
        log in (the gate would end it at once), so its place must not keep others out."""
        self._timer = asyncio.get_running_loop().call_later(max(0.0, delay), self._startup_over)

    def _startup_over(self) -> None:
        self._timer = None
        if self._startup:
            self._startup = False
            self._runner.give_startup()  # (the gate has taken its own place by now, if it got that far)

    def __call__(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        handshaking = self._runner.handshaking
        handshaking[self._ip] -= 1
        if handshaking[self._ip] <= 0:
            del handshaking[self._ip]
        self._startup_over()


class _ServerConn(asyncssh.SSHServer):
    """One instance per SSH connection."""

    def __init__(self, runner: SSHServerRunner) -> None:
        self._runner = runner
        self._conn: asyncssh.SSHServerConnection | None = None
        self._info = TransportInfo(runner.kind, "unknown")
        self._started = time.monotonic()
        self._failures = 0
        self._user = ""
        self._fingerprint = ""
        self._counted = False
        self._startup = False  # holds a place among the runner's connections not yet logged in
        self._login_timer: asyncio.TimerHandle | None = None
        self._auth_requests = 0
        self._lost = False
        self._listeners: set[RemoteForwardListener] = set()
        self._binding = 0  # forward listeners being bound (not yet in _listeners)
        self._dials = target_open.DialBudget(MAX_DIALS_PER_CONNECTION)
        self._limit_logged: set[str] = set()  # per-connection limits already logged once

    # -- lifecycle -------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        info = conn.get_extra_info("wraith_info")
        if isinstance(info, TransportInfo):
            self._info = info
            self._counted = True
            self._startup = True  # the gate took the place
        self._runner.conns.add(self)
        # One deadline from the accept. asyncssh's own login_timeout (the same length, from
        # here) stays as a backstop; it never fires first.
        accepted = conn.get_extra_info("wraith_accepted_at")
        now = time.monotonic()
        left = self._runner.options.login_grace_time - (now - accepted if isinstance(accepted, float) else 0.0)
        self._login_timer = asyncio.get_running_loop().call_later(max(0.0, left), self._login_expired)
        conn_fixes.install(conn)
        log.info("connection opened remote_addr=%s transport=%s", self._info.remote_addr, self._info.kind)
        original = conn.validate_public_key

        async def validate_public_key(username: str, key_data: bytes, msg: bytes, signature: bytes) -> bool:
            ok = await original(username, key_data, msg, signature) and self._policy_allows(conn, key_data)
            if ok and not msg:
                return True  # a query; the signed attempt that follows is logged
            fp = _key_fingerprint(key_data)
            log.info("auth attempt remote_addr=%s user=%s key_fingerprint=%s result=%s",
                     self._info.remote_addr, _safe(username), fp, "accept" if ok else "reject")
            if ok:
                self._fingerprint = fp
            else:
                self._auth_failed()
            return ok

        conn.validate_public_key = validate_public_key  # type: ignore[method-assign]
        if has_names(conn, _USERAUTH_NAMES):
            self._count_other_methods(conn)
        else:  # pragma: no cover - only if asyncssh renames these
            log.warning("password/keyboard-interactive attempts are not counted (asyncssh internals changed)")

    def _policy_allows(self, conn: asyncssh.SSHServerConnection, key_data: bytes) -> bool:
        """What asyncssh does not check of a key it accepted: the key's ``expiry-time``
        (OpenSSH's), and that a certificate signed by a ``--cert-authority`` CA names
        principals at all (asyncssh takes an empty list as valid for every user;
        OpenSSH's TrustedUserCAKeys refuses it: "Certificate lacks principal list")."""
        now = time.time()
        for spec in cast(list[str], conn.get_key_option("expiry-time") or []):
            if now >= keys.parse_expiry(str(spec)):
                return False
        if self._runner.server_cas:
            try:
                cert: Any = decode_ssh_certificate(key_data)  # (asyncssh's OpenSSH certificate type)
            except (asyncssh.KeyImportError, ValueError):
                return True  # a plain key
            if bytes(cert.signing_key.public_data) in self._runner.server_cas and not cert.principals:
                return False
        return True

    def _count_other_methods(self, conn: asyncssh.SSHServerConnection) -> None:
        """Requests for any method but ``publickey`` (password, keyboard-interactive,
        none, …) are refused by asyncssh without asking us: a client that ignores the
        offered method list would get unlimited, unlogged tries (and a flood of "none"
        requests a reply each, buffered for a client that does not read). Each one is
        logged as a reject and counts toward ``max_auth_attempts`` — except a "none"
        that is the connection's first request: clients ask for the method list with
        it (OpenSSH's sshd does not count that one either)."""
        original = conn._finish_userauth

        async def finish_userauth(begin_auth: bool, method: bytes, packet: Any) -> None:
            # (asyncssh handles one auth request at a time, in order: this count is exact)
            self._auth_requests += 1
            first = self._auth_requests == 1
            await original(begin_auth, method, packet)
            if method == b"publickey" or conn._auth_complete or (method == b"none" and first):
                return
            name = "none" if method == b"none" else _OTHER_METHODS.get(method, "other")
            log.info("auth attempt remote_addr=%s user=%s key_fingerprint=none method=%s result=reject",
                     self._info.remote_addr, _safe(self._user), name)
            self._auth_failed()

        conn._finish_userauth = finish_userauth  # type: ignore[method-assign]

    def _login_expired(self) -> None:
        self._login_timer = None  # (cancelled at login: this one never logged in)
        if self._conn is not None:
            self._conn.abort()  # as asyncssh's login timeout and OpenSSH's LoginGraceTime: no message

    def _logged_in(self) -> None:
        """Not a connection "not yet logged in" any more (logged in, or gone)."""
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None
        if self._startup:
            self._startup = False
            self._runner.give_startup()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._logged_in()
        for listener in list(self._listeners):  # remote forwards end with their session
            listener.close()
        self._listeners.clear()
        runner = self._runner
        runner.conns.discard(self)
        if self._counted:
            ip = self._info.remote_addr
            runner.per_ip[ip] -= 1
            if runner.per_ip[ip] <= 0:
                del runner.per_ip[ip]
        log.info("connection closed remote_addr=%s duration=%.1fs",
                 self._info.remote_addr, time.monotonic() - self._started)

    def _auth_failed(self) -> None:
        self._failures += 1
        if self._failures >= self._runner.options.max_auth_attempts and self._conn is not None:
            log.info("auth limit reached remote_addr=%s attempts=%d", self._info.remote_addr, self._failures)
            self._conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                                  "Too many authentication failures")

    # -- auth --------------------------------------------------------------------

    def begin_auth(self, username: str) -> bool:
        self._user = username
        assert self._conn is not None
        self._conn.set_authorized_keys(self._runner.authorized_keys)
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return False  # only keys listed in authorized_keys (or signed by the CA) get in

    def auth_completed(self) -> None:
        log.info("auth success remote_addr=%s user=%s", self._info.remote_addr, _safe(self._user))
        self._logged_in()
        conn = self._conn
        if conn is not None and self._runner.proxy is None and self._plain_forwarding(conn):
            conn.wraith_open = self._fast_open  # type: ignore[attr-defined]  # read by lean_recv

    def _plain_forwarding(self, conn: asyncssh.SSHServerConnection) -> bool:
        """Forwarding allowed with nothing to check per open: no key or certificate option
        restricts it (asyncssh's own open path checks those, and compression's quirks)."""
        return (conn.check_key_permission("port-forwarding") and conn.check_certificate_permission("port-forwarding")
                and not conn.get_key_option("permitopen") and self._forwarding_allowed()
                and getattr(conn, "_compressor", None) is None)

    def _fast_open(self, plain: bytes, end: int) -> bool:
        """A direct-tcpip open of an IP address straight from the decrypted packet, without
        asyncssh's generic open path (lean_recv calls this; False: asyncssh's path instead)."""
        fields = target_open.parse_direct_open(plain, end)
        if fields is None:
            return False
        send_chan, send_window, send_pktsize, host, port = fields
        address = target_open.numeric_address(host, port)  # an IP address is never a wraith-* name
        if address is None or self._conn is None:
            return False
        if self._channels_full() or not self._dials.take():
            return False  # asyncssh's path refuses it, in connection_requested
        opts = self._runner.options
        pending = target_open.pending_channel(self._conn, address, opts.connect_timeout, opts.window,
                                              opts.max_pktsize, self._dials)
        if pending is None:
            self._dials.give()
            return False
        pending[0].process_open(send_chan, send_window, send_pktsize, None)
        return True

    def connection_info(self) -> ConnectionInfo:
        return ConnectionInfo(self._info.remote_addr, self._info.kind, self._user, self._fingerprint)

    # -- channels ------------------------------------------------------------------

    def _channels_full(self) -> bool:
        """Whether this connection has ``max_channels_per_connection`` channels open or being
        opened (target connects in flight count too: each holds a descriptor already)."""
        limit = self._runner.options.max_channels_per_connection
        if not limit or self._conn is None:
            return False
        dials = self._dials  # (those with a channel in the table already are counted there)
        if len(getattr(self._conn, "_channels", ())) + dials.used - dials.with_channel < limit:
            return False
        self._limit_once("channel limit reached remote_addr=%s limit=%d", limit)
        return True

    def _limit_once(self, message: str, limit: int) -> None:
        """Log reaching a per-connection limit once per connection (a client that keeps
        asking must not turn into a line per request)."""
        if message not in self._limit_logged:
            self._limit_logged.add(message)
            log.info(message, self._info.remote_addr, limit)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        runner = self._runner
        assert self._conn is not None
        if self._channels_full():
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_RESOURCE_SHORTAGE, "Too many channels")
        if is_reserved(dest_host):
            if dest_host.lower() == CONTROL_HOST and dest_port == 0 and runner.on_control is not None:
                return self._control_channel()
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            "Reserved destination")
        if not self._forwarding_allowed():
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "Port forwarding not permitted")
        if not _safe_target(dest_host) or not 0 < dest_port <= 65535:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "Invalid destination")
        opts = runner.options
        address = target_open.numeric_address(dest_host, dest_port) if runner.proxy is None else None
        if address is None and target_open.fds_running_out():  # (an IP target's socket is checked when made)
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_RESOURCE_SHORTAGE, target_open.NO_DESCRIPTORS)
        if not self._dials.take():
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_RESOURCE_SHORTAGE, "Too many connects in progress")
        if address is not None:  # connects, confirms, then builds the channel: by callback
            pending = target_open.pending_channel(self._conn, address, opts.connect_timeout, opts.window,
                                                  opts.max_pktsize, self._dials)
        else:  # resolves (or goes through --proxy) and connects in a task
            pending = target_open.pending_dial(self._conn, dest_host, dest_port, opts.connect_timeout,
                                               opts.window, opts.max_pktsize, runner.proxy, self._dials)
        if pending is not None:
            return pending
        if address is not None and target_open.fds_running_out():
            self._dials.give()
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_RESOURCE_SHORTAGE, target_open.NO_DESCRIPTORS)
        chan = self._conn.create_tcp_channel(window=opts.window, max_pktsize=opts.max_pktsize)
        return chan, self._open_target(dest_host, dest_port)

    def _control_channel(self) -> tuple[Any, DuplexStream]:
        runner = self._runner
        assert self._conn is not None and runner.on_control is not None
        chan = self._conn.create_tcp_channel(window=runner.options.window,
                                             max_pktsize=runner.options.max_pktsize)
        info = self.connection_info()
        handler = runner.on_control
        stream = _ControlStream(handler, info)
        return chan, stream

    async def _open_target(self, host: str, port: int) -> RelayEnd:
        runner = self._runner
        target, chan_end = RelayEnd.pair()
        try:
            await dial(target, host, port, runner.options.connect_timeout, runner.proxy)
        except DialError as exc:
            code = asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED if exc.prohibited else asyncssh.OPEN_CONNECT_FAILED
            raise asyncssh.ChannelOpenError(code, exc.reason) from None
        except Exception:  # never let an unexpected error escape into asyncssh's open task
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Connection failed") from None
        finally:
            self._dials.give()
        return chan_end

    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        return self._listen(listen_host, listen_port)

    async def _listen(self, listen_host: str, listen_port: int) -> Any:
        assert self._conn is not None
        if not self._forwarding_allowed() or not self._listen_permitted(listen_host, listen_port):
            log.info("remote forward refused remote_addr=%s reason=key-options", self._info.remote_addr)
            return False
        if 0 < listen_port < 1024:  # as OpenSSH for any login but root: a key is not root
            log.info("remote forward refused remote_addr=%s reason=privileged-port", self._info.remote_addr)
            return False
        limit = self._runner.options.max_forwards_per_connection
        if limit and len(self._listeners) + self._binding >= limit:
            self._limit_once("remote forward refused remote_addr=%s reason=max-forwards-per-connection "
                             "limit=%d", limit)
            return False
        listener = RemoteForwardListener(self._runner, self._conn, listen_host, self._channels_full)
        self._binding += 1
        try:
            await listener.start(listen_port)
        except (OSError, OverflowError, ValueError):
            log.info("remote forward refused remote_addr=%s reason=listen-failed", self._info.remote_addr)
            return False
        finally:
            self._binding -= 1
        if self._lost:  # the session ended while we were binding: nobody will ever close it
            listener.close()
            return False
        if listener.in_fd_reserve():  # (logged by target_open, once per burst)
            listener.close()
            return False
        self._listeners.add(listener)
        listener.on_close = self._listeners.discard
        return listener

    # -- key options asyncssh does not enforce (it knows only the no-* flags and permitopen)

    def _forwarding_allowed(self) -> bool:
        """OpenSSH's ``restrict`` turns port forwarding off unless ``port-forwarding`` is given."""
        conn = self._conn
        return conn is None or not conn.get_key_option("restrict") or bool(conn.get_key_option("port-forwarding"))

    def _listen_permitted(self, host: str, port: int) -> bool:
        """OpenSSH's ``permitlisten="[host:]port"`` (repeatable; ``*`` for any port or host)."""
        assert self._conn is not None
        allowed = self._conn.get_key_option("permitlisten")
        if allowed is None:
            return True
        for entry in allowed if isinstance(allowed, list) else [allowed]:
            want_host, _, want_port = str(entry).rpartition(":")
            want_host = want_host[1:-1] if want_host.startswith("[") and want_host.endswith("]") else want_host
            if want_port != "*" and (not (want_port.isascii() and want_port.isdigit()) or int(want_port) != port):
                continue
            if not want_host:  # no host: the default listen address (loopback) only
                if host in ("", "localhost", "127.0.0.1", "::1"):
                    return True
            elif fnmatch.fnmatchcase(host.lower(), want_host.lower()):
                return True
        return False


class _ControlStream(DuplexStream):
    def __init__(self, handler: ControlHandler, info: ConnectionInfo) -> None:
        super().__init__(info={"connection_info": info})
        self._handler = handler
        self.connection_info = info

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        try:
            self._handler(self, self.connection_info)
        except Exception:
            log.exception("control handler failed")
            self.abort()


class _ForwardedConn(HoldingOpening):
    """A socket accepted by a remote forward: its channel to the client opens at once."""

    __slots__ = ("_listener",)

    def __init__(self, listener: RemoteForwardListener) -> None:
        super().__init__()
        self._listener = listener

    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        wait = self._listener._runner.options.connect_timeout + OPEN_SLACK
        self._timer = asyncio.get_running_loop().call_later(wait, self._expire)
        self._chan = self._listener.open_channel(self, transport)
        if self._chan is None:
            self._answered(ChannelOpenFailed("refused", Reply.GENERAL_FAILURE, "ESESSION"))

    def answer(self, failure: ChannelOpenFailed | None) -> None:
        self._socket_opened(failure)


class RemoteForwardListener:
    """A server-side ``tcpip-forward`` listener; each accepted socket becomes a
    ``forwarded-tcpip`` channel back to the client, on a SocketChannel."""

    def __init__(self, runner: SSHServerRunner, conn: asyncssh.SSHServerConnection, listen_host: str,
                 channels_full: Callable[[], bool] = lambda: False) -> None:
        self._runner = runner
        self._conn = conn
        self._listen_host = listen_host
        self._channels_full = channels_full  # the session's channel limit
        self._server: asyncio.Server | None = None
        self._port = 0
        self.on_close: Callable[[RemoteForwardListener], None] | None = None

    async def start(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        host = self._listen_host
        # Like OpenSSH's default (GatewayPorts no): remote forwards listen on loopback only.
        if host not in ("127.0.0.1", "::1"):
            host = "localhost"
        self._server = await loop.create_server(self._accept, host, port, reuse_address=True)
        self._port = self._server.sockets[0].getsockname()[1]

    def _accept(self) -> _ForwardedConn:
        return _ForwardedConn(self)

    def in_fd_reserve(self) -> bool:
        """Whether a listening socket took a descriptor kept in reserve."""
        sockets = self._server.sockets if self._server is not None else ()
        return any(target_open.in_fd_reserve(s.fileno()) for s in sockets)

    def open_channel(self, conn: _ForwardedConn, transport: Any) -> SocketChannel | None:
        """Send the ``forwarded-tcpip`` open for an accepted socket (None: refused — the
        session is gone, at its channel limit, or the socket took a reserved descriptor)."""
        ssh = self._conn
        if not ssh._transport or self._channels_full():
            return None
        sock = transport.get_extra_info("socket")
        if sock is not None and target_open.in_fd_reserve(sock.fileno()):
            return None
        peer = transport.get_extra_info("peername")
        orig_host, orig_port = (str(peer[0]), int(peer[1])) if peer else ("", 0)
        opts = self._runner.options
        chan = SocketChannel(ssh, opts.window, opts.max_pktsize, functools.partial(open_answer, conn.answer))
        ssh.send_packet(MSG_CHANNEL_OPEN, String(b"forwarded-tcpip"), UInt32(chan.recv_chan), UInt32(opts.window),
                        UInt32(opts.max_pktsize), String(self._listen_host), UInt32(self._port),
                        String(orig_host), UInt32(orig_port))
        return chan

    def get_port(self) -> int:
        return self._port

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self.on_close is not None:
            self.on_close(self)
            self.on_close = None

    async def wait_closed(self) -> None:
        await asyncio.sleep(0)


class SSHServerRunner:
    """A running ``wraith serve``: transport acceptor + asyncssh + policy."""

    def __init__(self, options: ServeOptions, on_control: ControlHandler | None = None) -> None:
        options.check()
        quiet_asyncssh()
        self.options = options
        self.on_control = on_control
        self.kind = options.transport
        RelayEnd.half_open_timeout = options.half_open_timeout
        self.proxy = options.proxy_url()
        self.host_key = keys.load_private_key(options.key, "host key")  # type: ignore[arg-type]
        text = ""
        if options.authorized_keys is not None:
            text += keys.authorized_keys_text(options.authorized_keys)
        self.server_cas: set[bytes] = set()
        if options.cert_authority is not None:
            text += "\n" + keys.cert_authority_lines(options.cert_authority)
            self.server_cas = keys.ca_public_keys(options.cert_authority)
        self.authorized_keys = asyncssh.import_authorized_keys(text)
        self.per_ip: Counter[str] = Counter()
        self.handshaking: Counter[str] = Counter()  # TLS handshakes / stealth peeks not yet SSH
        self.startups = 0  # connections not yet logged in, from admission on (max_startups)
        self._startup_limits = options.startups()
        self._drops = 0  # dropped by max_startups since the last log line
        self._drop_timer: asyncio.TimerHandle | None = None
        self.conns: set[_ServerConn] = set()
        self.closing = False
        self.acceptor: Acceptor = make_acceptor(options)
        self.admits_early = hasattr(self.acceptor, "admit")  # an acceptor with a phase before SSH (TLS)
        if self.admits_early:
            self.acceptor.admit = self._admit  # type: ignore[attr-defined]
        self._ssh: asyncssh.SSHAcceptor | None = None
        self._closed = asyncio.Event()

    def _admit(self, ip: str) -> _Admission | None:
        """A TCP connection accepted before its TLS handshake: a place in the per-IP limit
        until it reaches SSH (the gate counts it from then on) or ends; None if refused."""
        if self.closing:
            return None
        limit = self.options.max_connections_per_ip
        if limit and self.per_ip[ip] + self.handshaking[ip] >= limit:
            log.info("connection refused remote_addr=%s reason=max-connections-per-ip", ip)
            return None
        if not self.take_startup():
            return None
        self.handshaking[ip] += 1
        return _Admission(self, ip)

    def take_startup(self, force: bool = False) -> bool:
        """A place among the connections not yet logged in, or False: drop this one.
        OpenSSH's MaxStartups START:RATE:FULL — below START every connection is taken; from
        there each is dropped with a probability rising from RATE % to 100 % at FULL (random
        early drop: a flood cannot predict which ones get through, and some logins still do).
        ``force``: take it regardless (the stream was admitted earlier)."""
        limits = self._startup_limits
        if limits is not None and not force:
            start, rate, full = limits
            n = self.startups
            if n >= start:  # (OpenSSH's should_drop_connection, to the same integer arithmetic)
                percent = 100 if n >= full else rate + (100 - rate) * (n - start) // (full - start)
                if percent >= 100 or secrets.randbelow(100) < percent:
                    self._dropped()
                    return False
        self.startups += 1
        return True

    def give_startup(self) -> None:
        self.startups -= 1

    def _dropped(self) -> None:
        """Count a connection dropped by max_startups; log the count at most once per
        DROP_LOG_EVERY (a flood must not become a flood of log lines). No address: the
        drop is no judgement on that client, so nothing for fail2ban to ban."""
        self._drops += 1
        if self._drop_timer is None:
            self._log_drops()

    def _log_drops(self) -> None:
        if not self._drops or self.closing:
            self._drop_timer = None
            return
        log.warning("connections dropped reason=max-startups count=%d unauthenticated=%d", self._drops, self.startups)
        self._drops = 0
        self._drop_timer = asyncio.get_running_loop().call_later(DROP_LOG_EVERY, self._log_drops)

    async def start(self) -> None:
        opts = self.options
        tunnel = AcceptorTunnel(self.acceptor, lambda make_conn: _Gate(self, make_conn))
        self._ssh = await asyncssh.listen(
            "", 0,
            tunnel=tunnel,
            server_factory=lambda: _ServerConn(self),
            server_host_keys=[self.host_key],
            login_timeout=opts.login_grace_time,  # (a backstop: _ServerConn counts from the accept)
            encryption_algs=opts.ciphers,
            keepalive_interval=opts.keepalive_interval,
            keepalive_count_max=opts.keepalive_count_max,
            allow_scp=False,
            agent_forwarding=False,
            x11_forwarding=False,
            config=None,
        )

    def addresses(self) -> list[str]:
        return self.acceptor.addresses()

    async def close(self) -> None:
        """Graceful shutdown: stop accepting, disconnect everyone, drain, exit."""
        if self.closing:
            await self._closed.wait()
            return
        self.closing = True
        if self._drop_timer is not None:
            self._drop_timer.cancel()
            self._drop_timer = None
        if self._ssh is not None:
            self._ssh.close()
        for c in list(self.conns):
            if c._conn is not None:
                c._conn.disconnect(asyncssh.DISC_BY_APPLICATION, "Server shutting down")
        deadline = time.monotonic() + self.options.drain_time
        while self.conns and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for c in list(self.conns):
            if c._conn is not None:
                c._conn.abort()
        await asyncio.sleep(0)
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()


def _safe(text: str) -> str:
    """A user name as a single log token (no spaces or control characters)."""
    cleaned = "".join(c if c.isprintable() and not c.isspace() else "?" for c in text)
    return cleaned[:64] or "-"
