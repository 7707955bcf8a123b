"""The SSH connection's own send buffer, as a limit on the sockets that feed it.

A peer's channel windows do not bound what waits in that buffer: a peer may grant
up to 4 GiB per channel and then stop reading its TCP socket, and even honest
windows add up over many channels. So the connection's transport reports its send
buffer against CONN_HIGH / CONN_LOW (``pause_writing`` / ``resume_writing`` on the
connection: asyncssh's own do nothing, these instance attributes take their place).
While it is over CONN_HIGH, each relay that sends into the connection pauses
reading its socket after that read, and registers to be told when the buffer is
back under CONN_LOW (``backlog_cleared()``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

log = logging.getLogger("wraith.ssh")

CONN_HIGH = 4 * 1024 * 1024  # eight relays' worth of HIGH_WATER
CONN_LOW = CONN_HIGH // 4
# Past this, the peer is taken to have stopped reading for good and the connection is
# dropped (a client reconnects). Relays stop feeding the buffer at CONN_HIGH, but the
# connection keeps reading the peer's packets and answering those that want a reply: a
# peer that sends requests and never reads would otherwise grow it without bound.
CONN_ABORT = 64 * CONN_HIGH
CHECK_EVERY = 1.0  # seconds, while the buffer is over CONN_HIGH


class Waiter(Protocol):
    def backlog_cleared(self) -> None: ...


class Backlog:
    """Per SSH connection: whether its send buffer is over CONN_HIGH, and who waits."""

    __slots__ = ("full", "waiting", "timer")

    def __init__(self) -> None:
        self.full = False
        self.waiting: list[Waiter] = []
        self.timer: asyncio.TimerHandle | None = None


def backlog_of(conn: Any) -> Backlog:
    """``conn``'s Backlog, watching its transport from the first call on."""
    backlog: Backlog | None = conn.__dict__.get("wraith_backlog")
    if backlog is not None:
        return backlog
    backlog = Backlog()
    conn.wraith_backlog = backlog

    def check() -> None:
        backlog.timer = None
        transport = getattr(conn, "_transport", None)
        if not backlog.full or transport is None:
            return
        if transport.get_write_buffer_size() > CONN_ABORT:
            log.warning("SSH peer stopped reading: connection dropped")
            conn.abort()
            return
        backlog.timer = asyncio.get_running_loop().call_later(CHECK_EVERY, check)

    def pause_writing() -> None:
        backlog.full = True
        if backlog.timer is None:
            backlog.timer = asyncio.get_running_loop().call_later(CHECK_EVERY, check)

    def resume_writing() -> None:
        backlog.full = False
        if backlog.timer is not None:
            backlog.timer.cancel()
            backlog.timer = None
        waiting, backlog.waiting = backlog.waiting, []
        for waiter in waiting:
            waiter.backlog_cleared()

    conn.pause_writing = pause_writing
    conn.resume_writing = resume_writing
    transport = getattr(conn, "_transport", None)
    if transport is not None:
        try:
            transport.set_write_buffer_limits(high=CONN_HIGH, low=CONN_LOW)
        except (AttributeError, NotImplementedError):  # a transport without flow control
            pass
    return backlog
