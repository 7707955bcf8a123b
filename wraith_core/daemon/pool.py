"""Shared SSH sessions: streams with equal options (all but the target) share one session.

A second stream to the same server with the same identity costs a channel
open, not an SSH handshake. Sessions are reference-counted; one with no
streams left is closed after a short linger. A session that dies is dropped
from the pool; the next stream makes a new one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import stat
from typing import Any

from ..errors import KeyError_, WraithError
from ..keys import MAX_FILE
from ..options import ConnectOptions
from ..ssh.channels import ChannelManager
from ..ssh.client import Session
from .errors import map_error
from .events import EventBus

log = logging.getLogger("wraith.daemon")

DEFAULT_LINGER = 5.0
# key inputs (compared by their contents) and what keys.py calls them in its errors
_KEY_FIELDS = {"identity": "identity", "certificate": "certificate", "host_key": "host key",
               "known_hosts": "known hosts", "tls_ca": "TLS CA"}


def _file_digest(path: str, what: str) -> str | None:
    """sha256 of a regular file's contents, read at most ``keys.MAX_FILE`` bytes: this runs on
    the event loop, so a huge file is refused from its size, unread (as keys.py would refuse
    it after reading 16 MiB). None if ``path`` is no regular file we can open."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO: no waiting
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        if st.st_size > MAX_FILE:
            raise KeyError_(f"{what} file is larger than {MAX_FILE >> 20} MiB: {path}")
        try:
            data = f.read(MAX_FILE + 1)
        except OSError:
            return None
    if len(data) > MAX_FILE:  # it grew since the fstat
        raise KeyError_(f"{what} file is larger than {MAX_FILE >> 20} MiB: {path}")
    return "file:" + hashlib.sha256(data).hexdigest()


def _fingerprint_value(value: Any, what: str) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return "bytes:" + hashlib.sha256(value).hexdigest()
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if "\n" not in text:
            digest = _file_digest(os.path.expanduser(text), what)
            if digest is not None:
                return digest
        return "text:" + hashlib.sha256(text.encode()).hexdigest()
    return value


def pool_key(opts: ConnectOptions) -> str:
    """Everything that makes a session what it is; key inputs by their contents."""
    items = []
    for f in dataclasses.fields(opts):
        v = getattr(opts, f.name)
        if f.name in _KEY_FIELDS:
            v = _fingerprint_value(v, _KEY_FIELDS[f.name])
        items.append((f.name, repr(v)))
    return hashlib.sha256(repr(sorted(items)).encode()).hexdigest()


class PooledSession:
    def __init__(self, pool: SessionPool, key: str, ident: str, options: ConnectOptions) -> None:
        self.pool = pool
        self.key = key
        self.id = ident
        self.options = options
        self.session: Session | None = None
        self.manager: ChannelManager | None = None
        self.refs = 0
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.dead = False
        self._linger: asyncio.TimerHandle | None = None
        self._watch: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def label(self) -> str:
        o = self.options
        return (o.peer or "") if o.transport == "iroh" else (o.server or "")

    async def connect(self) -> None:
        bus = self.pool.bus
        bus.publish("session.connecting", session=self.id, server=self.label)
        try:
            session = Session(self.options, reconnect=False)
            await session.start()
        except BaseException as exc:
            self.dead = True
            err = map_error(exc) if isinstance(exc, Exception) else None
            bus.publish("session.closed", session=self.id, server=self.label,
                        **({"error": err.code} if err is not None else {}))
            if not self.ready.done():
                if err is not None:
                    self.ready.set_exception(err)
                    self.ready.exception()  # retrieved here; waiters re-raise it
                else:
                    self.ready.cancel()
            raise
        self.session = session
        self.manager = ChannelManager(session)
        log.info("session up id=%s transport=%s", self.id, self.options.transport)
        bus.publish("session.up", session=self.id, server=self.label)
        self._watch = asyncio.get_running_loop().create_task(self._watch_conn())
        self.ready.set_result(None)

    async def _watch_conn(self) -> None:
        session = self.session
        assert session is not None
        conn = session.conn
        if conn is not None:
            try:
                await conn.wait_closed()
            except Exception:
                pass
        self.dead = True
        self.pool._forget(self)
        if not self._closing:
            log.info("session lost id=%s", self.id)
            self.pool.bus.publish("session.lost", session=self.id, server=self.label)
            self._closing = True
            await session.close()  # publishes nothing (reconnect=False): we do
            self.pool.bus.publish("session.closed", session=self.id, server=self.label)

    def acquire(self) -> None:
        self.refs += 1
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None

    def release(self) -> None:
        self.refs -= 1
        if self.refs <= 0 and self.dead:
            self.pool.all.discard(self)
        if self.refs <= 0 and not self.dead and not self._closing:
            loop = asyncio.get_running_loop()
            self._linger = loop.call_later(self.pool.linger, lambda: loop.create_task(self.close()))

    async def close(self) -> None:
        if self._closing or self.refs > 0 and not self.pool.closing:
            return
        self._closing = True
        self.dead = True
        self.pool._forget(self)
        if self._linger is not None:
            self._linger.cancel()
        if self.session is not None:
            await self.session.close()
            log.info("session closed id=%s", self.id)
            self.pool.bus.publish("session.closed", session=self.id, server=self.label)
        if self._watch is not None:
            self._watch.cancel()


class SessionPool:
    def __init__(self, bus: EventBus, linger: float = DEFAULT_LINGER) -> None:
        self.bus = bus
        self.linger = linger
        self.entries: dict[str, PooledSession] = {}
        self.all: set[PooledSession] = set()
        self.closing = False
        self._n = 0

    async def acquire(self, options: ConnectOptions) -> tuple[PooledSession, bool]:
        """A live session for ``options`` (shared if one exists) -> (entry, pooled)."""
        if self.closing:
            raise WraithError("the daemon is shutting down", "EDAEMON")
        options.check()
        key = pool_key(options)
        entry = self.entries.get(key)
        if entry is not None and not entry.dead:
            entry.acquire()
            try:
                await asyncio.shield(entry.ready)
            except BaseException:
                entry.release()
                raise
            if entry.dead or entry.session is None or entry.session.conn is None:
                # lost before its watcher ran: take it out of the pool now, or this retry
                # would find it again (and again: nothing here waits) until the recursion limit
                if not entry.dead:
                    entry.dead = True
                    self._forget(entry)
                entry.release()
                return await self.acquire(options)
            return entry, True
        self._n += 1
        entry = PooledSession(self, key, f"p{self._n}", options)
        self.entries[key] = entry
        self.all.add(entry)
        entry.acquire()
        try:
            await entry.connect()
        except BaseException as exc:
            entry.refs -= 1
            self._forget(entry)
            if isinstance(exc, Exception):
                raise map_error(exc) from None
            raise
        return entry, False

    def _forget(self, entry: PooledSession) -> None:
        if self.entries.get(entry.key) is entry:
            del self.entries[entry.key]
        if entry.dead and entry.refs <= 0:
            self.all.discard(entry)

    def sessions(self) -> int:
        return sum(1 for e in self.entries.values() if not e.dead)

    async def close(self) -> None:
        self.closing = True
        entries = list(self.all) + [e for e in self.entries.values() if e not in self.all]
        await asyncio.gather(*(e.close() for e in entries), return_exceptions=True)
        self.entries.clear()
        self.all.clear()
