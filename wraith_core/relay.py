"""The generic bidirectional pump: a socket joined to an asyncssh-managed channel.

It carries what the fused path cannot: a socket joined to a channel (SOCKS5, forwards,
the server's targets) is normally one ``ssh/socket_channel.SocketChannel``, which keeps
the same rules; this pump serves where that does not apply (asyncssh internals other
than expected, a forwarded-tcpip open for a listener we did not record). In-process
streams (``DuplexStream``) are a channel's session themselves. A relay here joins
two byte streams. Each side is a :class:`RelayEnd`, which is at
once an asyncio ``Protocol`` (for sockets) and an asyncssh ``SSHTCPSession``
(for channels): both kinds of transport offer ``write``, ``write_eof``,
``pause_reading``, ``resume_reading``, ``close`` and ``abort``, and call back
``data_received``, ``eof_received``, ``pause_writing``, ``resume_writing`` and
``connection_lost``. So bytes move by callbacks, without tasks or copies:

* backpressure: when one side's write buffer passes its high-water mark its
  protocol is told ``pause_writing`` and we stop reading the other side;
* half-close: EOF read on one side is written as EOF on the other; the relay
  closes both sides once EOF has passed in both directions;
* errors: a side lost with an error aborts the other (RST / channel close);
* early bytes: a side may receive data before the other side exists (a target
  that speaks first while the SSH channel is still opening); it is held, with
  reading paused, and flushed the moment the peer attaches — never lost.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import Any

from .ssh.backlog import Backlog, backlog_of

# Write buffer high-water mark for channel and socket transports in a relay.
HIGH_WATER = 512 * 1024


class RelayEnd(asyncio.Protocol):
    """One side of a relay. ``half_open_timeout``: a relay with EOF in one direction
    only and no bytes moving for that long is torn down (set per process from the
    ``half_open_timeout`` option; ``0`` disables it)."""

    half_open_timeout: float = 300.0

    __slots__ = (
        "transport", "peer", "_early", "_eof_in", "_eof_out", "_lost", "_clean",
        "_paused_by", "_last", "_timer", "_close_pending", "_resuming", "_backlog",
    )

    def __init__(self) -> None:
        self.transport: Any = None
        self.peer: RelayEnd | None = None
        self._early: list[bytes] | None = None
        self._eof_in = False      # EOF read from our transport
        self._eof_out = False     # EOF written to our transport
        self._lost = False
        self._clean = False       # lost after EOF both ways and without error
        self._paused_by = 0       # bit 1: waiting for peer, 2: peer's buffer full, 4: its connection's
        self._backlog: Backlog | None = None  # an SSH channel's end: its connection's send buffer
        self._last = 0.0          # last activity once half-open (0: not half-open)
        self._timer: asyncio.TimerHandle | None = None
        self._close_pending = False
        self._resuming = False

    @staticmethod
    def pair() -> tuple[RelayEnd, RelayEnd]:
        a, b = RelayEnd(), RelayEnd()
        a.peer, b.peer = b, a
        return a, b

    def _set_paused(self, bit: int, on: bool) -> None:
        before = self._paused_by
        self._paused_by = before | bit if on else before & ~bit
        t = self.transport
        if t is None or self._lost or self._resuming:
            return
        if before == 0 and self._paused_by:
            t.pause_reading()
        elif before and self._paused_by == 0:
            # An asyncssh channel delivers its whole queue inside resume_reading() and
            # re-grants the full window on the first packet. Pausing again in the middle
            # would leave the rest queued while the peer sends another window's worth —
            # unbounded growth. So take the whole flush, then pause if we were asked to.
            self._resuming = True
            try:
                t.resume_reading()
            finally:
                self._resuming = False
            if self._paused_by and not self._lost:
                t.pause_reading()

    # -- protocol callbacks (asyncio Protocol and asyncssh SSHTCPSession) ----

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if hasattr(transport, "set_write_buffer_limits"):
            transport.set_write_buffer_limits(high=HIGH_WATER)
        conn = getattr(transport, "_conn", None)  # an asyncssh channel: its SSH connection
        if conn is not None and hasattr(conn, "__dict__") and getattr(conn, "_transport", None) is not None:
            self._backlog = backlog_of(conn)
        peer = self.peer
        if peer is None or peer.transport is None:
            # The other side does not exist yet. Reading stays on (pausing and resuming
            # a socket costs two system calls on every connection); bytes that arrive
            # meanwhile are held by data_received, which pauses reading then.
            return
        # The other side was waiting for us: deliver what it held.
        early, peer._early = peer._early, None
        for chunk in early or ():
            transport.write(chunk)
        if peer._eof_in:
            self._send_eof()
        if peer._lost:
            if peer._clean:
                self._close()
            else:
                self._abort()
            return
        peer._set_paused(1, False)

    def session_started(self) -> None:  # asyncssh SSHSession interface
        pass

    def data_received(self, data: bytes, datatype: Any = None) -> None:
        peer = self.peer
        if self._last:
            self._last = time.monotonic()
        if peer is not None and peer.transport is not None and not peer._lost:
            peer.transport.write(data)
            backlog = peer._backlog
            if backlog is not None and backlog.full and not self._paused_by & 4:
                backlog.waiting.append(self)  # the SSH connection's send buffer is full
                self._set_paused(4, True)
        elif peer is not None and peer.transport is None:
            if self._early is None:
                self._early = []
            self._early.append(bytes(data))
            self._set_paused(1, True)
        # else: the peer is gone; the bytes have nowhere to go

    def eof_received(self) -> bool:
        self._eof_in = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer._lost:
            # EOF, then CLOSE if both directions are done: one write on an SSH connection
            batch = getattr(peer.transport, "wraith_batch", None)
            if batch is not None:
                batch[0]()
            try:
                peer._send_eof()
                self._maybe_done()
            finally:
                if batch is not None:
                    batch[1]()
            if not peer._eof_in and self.half_open_timeout > 0 and not self._lost:
                self._start_half_open_timer()
        return True  # keep our write side open: half-close

    def _start_half_open_timer(self) -> None:
        peer = self.peer
        assert peer is not None
        self._last = peer._last = time.monotonic()
        self._timer = asyncio.get_running_loop().call_later(self.half_open_timeout, self._half_open_check)

    def _half_open_check(self) -> None:
        self._timer = None
        peer = self.peer
        if self._lost or peer is None or peer._lost:
            return
        idle = time.monotonic() - max(self._last, peer._last)
        if idle >= self.half_open_timeout:
            self.abort()
        else:
            self._timer = asyncio.get_running_loop().call_later(self.half_open_timeout - idle,
                                                                self._half_open_check)

    def backlog_cleared(self) -> None:
        """The SSH connection we send into has drained its send buffer (ssh/backlog.py)."""
        self._set_paused(4, False)

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer._set_paused(2, True)

    def resume_writing(self) -> None:
        if self._last:  # our transport took what was written: bytes are moving
            self._last = time.monotonic()
        if self._close_pending:
            # drained; asyncssh sends a pending EOF right after this callback returns
            asyncio.get_running_loop().call_soon(self._deferred_close)
            return
        if self.peer is not None:
            self.peer._set_paused(2, False)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        # Clean only if both directions had finished: a side that goes away while we
        # could still have sent it data cut the stream, and the other side must see that.
        self._clean = exc is None and self._eof_in and self._eof_out
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer._lost:
            if self._clean:
                peer._close()   # flushes what is still buffered, then closes
            else:
                peer._abort()   # visible failure: RST / channel close, never silent truncation
        if peer is not None and peer._lost:
            self.peer = peer.peer = None  # both sides gone: break the cycle

    # -- actions ------------------------------------------------------------

    def _send_eof(self) -> None:
        if self._eof_out or self._lost:
            return
        self._eof_out = True
        t = self.transport
        try:
            if t.can_write_eof():
                t.write_eof()
            else:  # e.g. TLS cannot half-close: close after flushing
                t.close()
        except (OSError, RuntimeError):
            t.abort()

    def _maybe_done(self) -> None:
        peer = self.peer
        if peer is not None and self._eof_in and peer._eof_in and self._eof_out and peer._eof_out:
            self._close()
            peer._close()

    def _close(self) -> None:
        t = self.transport
        if t is None or self._lost or self._close_pending:
            return
        if self._eof_out and t.get_write_buffer_size() > 0:
            # Data (and so our EOF) still queued, e.g. waiting for SSH window: asyncssh's
            # close() would drop that EOF, so close only once the buffer has drained.
            self._close_pending = True
            t.set_write_buffer_limits(high=0, low=0)  # pause now, resume_writing() when drained
            return
        t.close()

    def _deferred_close(self) -> None:
        if self.transport is not None and not self._lost:
            self.transport.close()

    def _abort(self) -> None:
        t = self.transport
        if t is not None and not self._lost:
            linger_zero(t)
            t.abort()

    def abort(self) -> None:
        """Tear down both sides (used on shutdown and idle timeout)."""
        peer = self.peer
        self._abort()
        if peer is not None:
            peer._abort()


LINGER_ZERO = struct.pack("ii", 1, 0)


def linger_zero(transport: Any) -> None:
    """Make a socket's close send RST, so the application sees a reset, not a clean end."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
        except (OSError, AttributeError):
            pass


_tasks: set[asyncio.Task[None]] = set()


def spawn(coro: Any) -> asyncio.Task[None]:
    """Run a background task and keep a reference until it ends."""
    task = asyncio.get_running_loop().create_task(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return task
