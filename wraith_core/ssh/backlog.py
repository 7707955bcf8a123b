"""The SSH connection's own send buffer, as a limit on the sockets that feed it.

A peer's channel windows do not bound what waits in that buffer: a peer may grant
up to 4 GiB per channel and then stop reading its TCP socket, and even honest
windows add up over many channels. So the connection's transport reports its send
buffer against CONN_HIGH / CONN_LOW (``pause_writing`` / ``resume_writing`` on the
connection: asyncssh's own do nothing, these instance attributes take their place).
While it is over CONN_HIGH, each relay that sends into the connection pauses
reading its socket after that read, and registers to be told when the buffer is
back under CONN_LOW (``backlog_cleared()``).

Replies are another matter: asyncssh answers every request that wants a reply, so a
peer that sends requests and never reads would make that buffer grow with replies
alone. While the buffer is over CONN_HIGH, replies are counted; past REPLY_STOP of
them the peer is not read either, until the buffer is back under CONN_LOW (TCP then
holds the peer back, and a peer that reads nothing also answers no keepalive: it is
dropped). Only replies count: two peers moving data hard both ways fill each
other's buffers with data, and an end that stopped reading then would wait for a
peer doing the same, for good.
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
REPLY_STOP = 20_000  # replies queued while over CONN_HIGH (~1 MiB) past which the peer is not read


class Waiter(Protocol):
    def backlog_cleared(self) -> None: ...


class Backlog:
    """Per SSH connection: whether its send buffer is over CONN_HIGH, and who waits."""

    __slots__ = ("full", "waiting", "timer", "replies")

    def __init__(self) -> None:
        self.full = False
        self.waiting: list[Waiter] = []
        self.timer: asyncio.TimerHandle | None = None
        self.replies = 0  # replies sent since the buffer went over CONN_HIGH


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
        backlog.replies = 0
        if backlog.timer is None:
            backlog.timer = asyncio.get_running_loop().call_later(CHECK_EVERY, check)

    def resume_writing() -> None:
        backlog.full = False
        release_reading(conn, "replies")
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


def note_reply(conn: Any) -> None:
    """``conn`` sends a reply to one of its peer's requests (see the module docstring)."""
    backlog: Backlog | None = conn.__dict__.get("wraith_backlog")
    if backlog is None or not backlog.full:
        return
    backlog.replies += 1
    if backlog.replies == REPLY_STOP:
        log.info("SSH peer asks for replies and does not read them: not read until it does")
        hold_reading(conn, "replies")


def hold_reading(conn: Any, why: str) -> None:
    """Stop reading ``conn``'s transport until every ``why`` given here is released."""
    holds: set[str] | None = conn.__dict__.get("wraith_read_holds")
    if holds is None:
        holds = conn.wraith_read_holds = set()
    if why in holds:
        return
    if not holds:
        transport = conn._transport
        if transport is None or transport.is_closing():
            return
        transport.pause_reading()
    holds.add(why)


def release_reading(conn: Any, why: str) -> None:
    holds: set[str] | None = conn.__dict__.get("wraith_read_holds")
    if not holds or why not in holds:
        return
    holds.discard(why)
    transport = conn._transport
    if not holds and transport is not None and not transport.is_closing():
        transport.resume_reading()
