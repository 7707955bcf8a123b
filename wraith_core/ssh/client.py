"""Client session lifecycle: connect, host-key check, keepalive, reconnect.

One ``Session`` owns at most one live SSH connection at a time. With
``reconnect=True`` (``wraith connect``) any loss — transport error, auth
error, keepalive timeout — leads to a full new transport + SSH session with
exponential backoff (1 s, 2 s, 4 s … capped at 30 s), forever. Each wait is
drawn between half and all of that step, so clients that lost the same server
do not all come back in the same instant.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh.public_key import get_public_key_algs

from .. import keys
from ..errors import AuthError, ChannelError, ConnectError, HostKeyError, UsageError, WraithError
from ..logs import peer_text, quiet_asyncssh
from ..options import ConnectOptions
from ..transport.base import Connector, make_connector
from . import conn_fixes
from .tunnel import ConnectorTunnel

log = logging.getLogger("wraith.client")

BACKOFF_START = 1.0
BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0  # a session up this long resets the backoff


def jittered(delay: float) -> float:
    """The wait before the next attempt: between half and all of the backoff step."""
    return delay * random.uniform(0.5, 1.0)

StateCallback = Callable[[str, dict[str, Any]], None]
UpHook = Callable[[asyncssh.SSHClientConnection], Awaitable[None]]


class _HostKeyPin:
    def __init__(self, value: Any) -> None:
        self.fingerprint: str | None = None
        self.key: asyncssh.SSHKey | None = None
        if isinstance(value, str) and value.strip().startswith("SHA256:"):
            self.fingerprint = value.strip()
        else:
            self.key = keys.load_public_key(value, "host key")

    def host_key_algs(self) -> list[str]:
        """Ask the server for its plain key, never a host certificate: asyncssh prefers
        certificates, and with no CA trusted (a pin trusts a key, not a CA) a server that
        has one would be refused even when its key is the pinned one."""
        if self.key is not None:
            return [a.decode() for a in self.key.sig_algorithms]
        return [a.decode() for a in get_public_key_algs()]

    def matches(self, key: asyncssh.SSHKey) -> bool:
        if self.fingerprint is not None:
            return keys.fingerprint(key) == self.fingerprint
        assert self.key is not None
        return key.public_data == self.key.public_data


class _Owner(asyncssh.SSHClient):
    """One per SSH connection: reports that connection's loss to its session."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self.conn: asyncssh.SSHClientConnection | None = None

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self.conn = conn
        conn_fixes.install(conn)

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        pin = self._session.pin
        ok = pin is not None and pin.matches(key)
        if not ok:
            self._session.host_key_mismatch = keys.fingerprint(key)
        return ok

    def connection_lost(self, exc: Exception | None) -> None:
        self._session._on_lost(self.conn, exc)


_USER_VARS = ("LOGNAME", "USER", "LNAME", "USERNAME")


def _keep_local_user() -> None:
    """asyncssh looks up the local user name (``getpass.getuser``) on every connect. With
    none of the variables it reads set, that is a passwd lookup, which fails when the
    process is out of descriptors: the reconnect then reports "Unknown local username".
    Looked up once here and kept in ``LOGNAME``, where ``getuser`` reads it first (the
    same name it would find)."""
    if any(os.environ.get(v) for v in _USER_VARS):
        return
    try:
        import getpass

        os.environ["LOGNAME"] = getpass.getuser()
    except (KeyError, OSError):
        pass  # no name to keep: asyncssh will say so itself


class Session:
    def __init__(self, options: ConnectOptions, *, reconnect: bool = True,
                 on_state: StateCallback | None = None) -> None:
        options.check()
        quiet_asyncssh()
        self.options = options
        self.reconnect = reconnect
        self.on_state = on_state
        self.connector: Connector = make_connector(options)
        self.client_key = keys.load_private_key(options.identity, "identity")  # type: ignore[arg-type]
        self.certificate = self._load_certificate()
        self.pin = _HostKeyPin(options.host_key) if options.host_key else None
        self.host_key_mismatch: str | None = None
        self.known_hosts = self._known_hosts()
        _keep_local_user()
        self.conn: asyncssh.SSHClientConnection | None = None
        self.up_hooks: list[UpHook] = []
        self._up = asyncio.Event()
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.last_error: WraithError | None = None
        self.connects = 0

    # -- setup -----------------------------------------------------------------

    def _load_certificate(self) -> asyncssh.SSHCertificate | None:
        opts = self.options
        if opts.certificate is not None:
            return keys.load_certificate(opts.certificate)
        ident = opts.identity
        if isinstance(ident, (str, os.PathLike)) and not str(ident).lstrip().startswith("-----"):
            beside = Path(str(ident) + "-cert.pub").expanduser()
            if beside.is_file():
                return keys.load_certificate(str(beside))
        return None

    def _known_hosts(self) -> Any:
        opts = self.options
        if self.pin is not None:
            return ([], [], [])  # nothing trusted up front: every key goes through the pin
        if opts.known_hosts is not None:
            data, label = keys.read_key_input(opts.known_hosts, "known hosts")
            try:
                return asyncssh.import_known_hosts(data.decode("utf-8", "replace"))
            except (ValueError, asyncssh.KeyImportError) as exc:
                raise UsageError(f"{label}: invalid known_hosts file ({exc})") from None
        if opts.accept_any_host_key:
            return None
        raise UsageError("no host key verification configured")

    def _state(self, state: str, **extra: Any) -> None:
        if self.on_state is not None:
            try:
                self.on_state(state, extra)
            except Exception:  # a listener must not break the session
                log.exception("state listener failed")

    # -- connecting --------------------------------------------------------------

    async def connect_once(self) -> asyncssh.SSHClientConnection:
        opts = self.options
        host, port = opts.server_address()
        host = getattr(self.connector, "host_name", host)  # (iroh: the endpoint id, not the ticket)
        client_keys: list[Any] = [(self.client_key, self.certificate) if self.certificate else self.client_key]
        self.host_key_mismatch = None
        try:
            # (asyncio.timeout, not wait_for: on 3.11 a wait_for cancelled as the connect fails
            # leaves that failure in a task nobody reads, reported as a traceback at shutdown)
            async with asyncio.timeout(opts.connect_timeout + 5):
                conn = await asyncssh.connect(
                    host, port,
                    tunnel=ConnectorTunnel(self.connector),
                    client_factory=lambda: _Owner(self),
                    username=opts.ssh_user(),
                    client_keys=client_keys,
                    known_hosts=self.known_hosts,
                    server_host_key_algs=self.pin.host_key_algs() if self.pin is not None else "default",
                    agent_path=None,
                    password=None,
                    kbdint_auth=False,
                    password_auth=False,
                    gss_host=None,
                    preferred_auth="publickey",
                    encryption_algs=opts.ciphers,
                    keepalive_interval=opts.keepalive_interval,
                    keepalive_count_max=opts.keepalive_count_max,
                    config=None,
                    x509_trusted_certs=None,
                )
        except asyncssh.PermissionDenied:
            raise AuthError("authentication failed: the server did not accept the identity key") from None
        except asyncssh.HostKeyNotVerifiable as exc:
            seen = f" (server presented {self.host_key_mismatch})" if self.host_key_mismatch else ""
            raise HostKeyError(f"host key verification failed{seen}: {exc.reason}") from None
        except WraithError:
            raise
        except asyncio.TimeoutError:
            raise ConnectError(f"timed out connecting to {self.connector.describe()}", "ETIMEDOUT") from None
        except (asyncssh.Error, OSError, ValueError) as exc:
            text = peer_text(getattr(exc, "reason", None) or str(exc) or type(exc).__name__)
            raise ConnectError(f"SSH connection to {self.connector.describe()} failed: {text}") from None
        except Exception as exc:  # anything else a transport raises: one failed attempt, not the end of retrying
            raise ConnectError(f"SSH connection to {self.connector.describe()} failed: "
                               f"{type(exc).__name__}: {peer_text(str(exc))}") from None
        return conn

    async def start(self) -> None:
        """Connect once (raising on failure unless ``reconnect``), then keep the session up."""
        if not self.reconnect:
            self._install(await self.connect_once())
            await self._run_up_hooks()
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _install(self, conn: asyncssh.SSHClientConnection) -> None:
        if conn.is_closed() or conn.get_owner() is None:  # dropped between auth and now
            raise ConnectError("the SSH connection was lost right after it was made", "ECONNRESET")
        self.conn = conn
        self.connects += 1
        self._lost.clear()
        self._up.set()

    async def _run_up_hooks(self) -> None:
        conn = self.conn
        for hook in self.up_hooks:
            if conn is None:
                return
            try:
                await hook(conn)
            except Exception as exc:  # a failed forward must not kill the session
                log.warning("session hook failed: %s", exc)

    async def _backoff(self, delay: float, **state: Any) -> None:
        wait = jittered(delay)
        log.info("session retry in %.1fs", wait)
        self._state("reconnecting", delay=wait, **state)
        await asyncio.sleep(wait)

    async def _run(self) -> None:
        delay = BACKOFF_START
        while not self._closing:
            self._state("connecting")
            log.info("session connecting transport=%s", self.options.transport)
            try:
                conn = await self.connect_once()
                self._install(conn)
            except WraithError as exc:
                self.last_error = exc
                if self._closing:
                    return
                log.warning("session failed: %s", exc)
                await self._backoff(delay, error=str(exc), code=exc.code)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            self.last_error = None
            up_since = asyncio.get_running_loop().time()
            log.info("session up transport=%s", self.options.transport)
            self._state("up")
            await self._run_up_hooks()
            await self._lost.wait()
            if self._closing:
                return
            if asyncio.get_running_loop().time() - up_since >= STABLE_AFTER:
                delay = BACKOFF_START  # it was up a good while: retry at once-ish
            # else: a server that drops every session right after login gets backoff too
            log.info("session lost")
            self._state("lost")
            await self._backoff(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    def _on_lost(self, conn: asyncssh.SSHClientConnection | None, exc: Exception | None) -> None:
        if conn is not None and self.conn is not None and conn is not self.conn:
            return  # not the current connection (one that never got installed)
        self.conn = None
        self._up.clear()
        self._lost.set()

    async def connection(self, timeout: float | None = None) -> asyncssh.SSHClientConnection:
        """The live connection, waiting up to ``timeout`` (default: session_wait) for one."""
        conn = self.conn
        if self._closing or (conn is None and not self.reconnect):
            raise ChannelError("the SSH session is closed", "ESESSION")
        if conn is not None:
            return conn
        wait = self.options.session_wait if timeout is None else timeout
        try:
            await asyncio.wait_for(self._up.wait(), wait)
        except asyncio.TimeoutError:
            err = self.last_error
            raise ChannelError("the SSH session is down" + (f": {err}" if err else ""), "ESESSION") from None
        conn = self.conn
        if conn is None or self._closing:
            raise ChannelError("the SSH session is " + ("closed" if self._closing else "down"), "ESESSION")
        return conn

    async def close(self) -> None:
        self._closing = True
        self._lost.set()
        self._up.set()  # whoever waits for the session learns now that it is closed
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        conn = self.conn
        if conn is not None:
            conn.close()
            try:
                await asyncio.wait_for(conn.wait_closed(), 3)
            except (asyncio.TimeoutError, Exception):
                conn.abort()
        self._state("closed")
