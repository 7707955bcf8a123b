"""A channel fused with the TCP socket it relays: the per-connection hot path.

A SOCKS5, ``-L`` or ``-R`` connection (client), or a connection to a target or from a
remote-forward listener (server), is one socket joined to one channel. With asyncssh's channel objects that join takes a channel,
a session object and two relay ends, and every message crosses several layers of each.
Here one object is both the socket's asyncio protocol and the channel in the
connection's channel table: socket bytes become CHANNEL_DATA in one step, channel data
is written to the socket in one step, and the channel's state machine is the few flags
a byte relay needs. It keeps the relay's guarantees (``relay.py``):

- flow control both ways: socket bytes wait for the peer's window (reading pauses past
  ``HIGH_WATER``), and window is granted back only while the socket's write buffer is
  below its high-water mark;
- half-close both ways: socket EOF becomes channel EOF after the queued bytes, channel
  EOF becomes ``write_eof`` on the socket; the channel is closed once both directions
  have ended;
- failures stay visible: a channel closed before both EOFs, or a lost SSH connection,
  resets the socket (RST), and a socket that resets closes the channel at once;
- a relay with EOF one way only and no bytes moving for ``half_open_timeout`` is torn
  down.

Protocol errors are asyncssh's (``ProtocolError`` ends the connection, as asyncssh's
own channels do). Received packets come through ``lean_recv`` (``lean_data`` for data)
or asyncssh's own loop (``process_packet``); packets go out through ``speedups``' lean
send when it applies, else asyncssh's ``send_packet``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import asyncssh
from asyncssh.constants import (MSG_CHANNEL_CLOSE, MSG_CHANNEL_DATA, MSG_CHANNEL_EOF, MSG_CHANNEL_EXTENDED_DATA,
                                MSG_CHANNEL_FAILURE, MSG_CHANNEL_REQUEST, MSG_CHANNEL_SUCCESS,
                                MSG_CHANNEL_WINDOW_ADJUST)
from asyncssh.misc import ProtocolError
from asyncssh.packet import SSHPacket

from ..relay import HIGH_WATER, RelayEnd, linger_zero
from .backlog import backlog_of
from .speedups import send_lean

log = logging.getLogger("wraith.channels")

# Socket bytes queued for the peer's window past this pause reading; below LOW_WATER it resumes.
LOW_WATER = HIGH_WATER // 4
_MAX_WINDOW = 0xFFFF_FFFF  # RFC 4254 §5.2: a window never exceeds 2^32 - 1

_NO_FIELDS = SSHPacket(b"")  # a confirmation's remaining payload, when there is none

OpenCallback = Callable[[BaseException | None], None]


class SocketChannel(asyncio.Protocol):
    """See the module docstring. Built and registered on ``conn`` (``add_channel``), then
    ``opened(...)`` once both channel numbers are known (server: before confirming;
    client: by the peer's confirmation). The socket's transport arrives with
    ``connection_made`` (server: after the confirmation; client: after the SOCKS reply)."""

    __slots__ = ("conn", "recv_chan", "window", "recv_window", "send_hdr", "send_window",
                 "send_pktsize", "transport", "held", "queue", "queued", "on_open", "is_open", "eof_in",
                 "eof_out", "eof_sent", "close_in", "close_out", "sock_lost", "reading_paused",
                 "writing_paused", "backlog", "backlog_wait", "last", "timer")

    def __init__(self, conn: Any, window: int, pktsize: int, on_open: OpenCallback | None = None) -> None:
        self.conn = conn
        self.window = window            # the receive window we grant
        self.recv_window = window
        self.send_hdr = b""             # the peer's channel number, encoded
        self.send_window = 0
        self.send_pktsize = 0
        self.transport: Any = None
        self.held: list[bytes] | None = None  # channel data that arrived before the socket's transport
        self.queue: list[memoryview] = []      # socket bytes waiting for the peer's window
        self.queued = 0
        self.on_open = on_open          # client: called with None or the failure when the peer answers
        self.is_open = False
        self.eof_in = False             # channel EOF received (and passed to the socket)
        self.eof_out = False            # socket EOF read: channel EOF sent or queued behind data
        self.eof_sent = False
        self.close_in = False
        self.close_out = False
        self.sock_lost = False
        self.reading_paused = False     # socket reading paused: the peer's window is full
        self.writing_paused = False     # socket write buffer above high water: no window granted
        self.backlog = backlog_of(conn)  # the connection's own send buffer (backlog.py)
        self.backlog_wait = False       # socket reading paused: that buffer is full
        self.last = 0.0                 # last activity while half-open (0: not half-open)
        self.timer: asyncio.TimerHandle | None = None
        self.recv_chan: int = conn.add_channel(self)
        conn._update_recv_pktlen(pktsize)

    # -- opening -------------------------------------------------------------

    def opened(self, send_chan: int, send_window: int, send_pktsize: int) -> None:
        self.send_hdr = send_chan.to_bytes(4, "big")
        self.send_window = send_window
        self.send_pktsize = send_pktsize
        self.is_open = True
        if self.queue or self.eof_out:  # the socket spoke (or ended) before the channel was open
            self._flush()

    def discard(self) -> None:
        """Leave the connection's table without a word: a channel that was never opened."""
        self.close_in = self.close_out = True
        self.queue.clear()
        self._stop_timer()
        self._reset_socket()
        self._cleanup()

    def process_open_confirmation(self, send_chan: int, send_window: int, send_pktsize: int, packet: Any) -> None:
        """The peer confirmed our CHANNEL_OPEN (asyncssh's connection calls this)."""
        callback, self.on_open = self.on_open, None
        if callback is None or self.is_open:
            raise ProtocolError("Channel not being opened")
        self.opened(send_chan, send_window, send_pktsize)
        failure = None
        if packet.get_remaining_payload():  # a direct-tcpip confirmation carries nothing more
            self.abort()
            failure = ValueError("malformed confirmation")
        try:
            callback(failure)
        except Exception:  # inside asyncssh's packet handling: never raise
            log.exception("channel open handler failed")
            self.abort()

    def lean_confirm(self, plain: bytes) -> bool:
        """OPEN_CONFIRMATION from lean_recv (``plain[2:18]``: our number, the peer's, its window
        and packet size). False: asyncssh's path (its checks and quirks) decides."""
        send_pktsize = int.from_bytes(plain[14:18], "big")
        if not send_pktsize or getattr(self.conn, "_compressor", None) is not None:
            return False
        self.process_open_confirmation(int.from_bytes(plain[6:10], "big"), int.from_bytes(plain[10:14], "big"),
                                       send_pktsize, _NO_FIELDS)
        return True

    def process_open_failure(self, code: int, reason: str, lang: str) -> None:
        callback, self.on_open = self.on_open, None
        if callback is None or self.is_open:
            raise ProtocolError("Channel not being opened")
        self.close_in = self.close_out = True
        self._cleanup()
        callback(asyncssh.ChannelOpenError(code, reason, lang))

    # -- the socket (asyncio protocol) -----------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)
        if self.close_out:  # the channel ended before the socket was ready (it never sent EOF: a cut)
            # not from inside connection_made: the loop is still setting the transport up
            asyncio.get_running_loop().call_soon(self._reset_socket)
            return
        held, self.held = self.held, None
        if held:
            transport.writelines(held)
            if not self.writing_paused:  # (writelines may have just paused it)
                self._grant()
        if self.eof_in:
            transport.write_eof()
            self._half_open()

    def data_received(self, data: bytes) -> None:
        if self.last:
            self.last = time.monotonic()
        if self.close_out:
            return
        n = len(data)
        if not self.queue and n <= self.send_window and n <= self.send_pktsize:
            self.send_window -= n
            self._send(MSG_CHANNEL_DATA, self.send_hdr + n.to_bytes(4, "big"), data)
        else:
            self.queue.append(memoryview(data))
            self.queued += n
            self._flush()
            if self.queued > HIGH_WATER and not self.reading_paused and not self.sock_lost:
                self.reading_paused = True
                if not self.backlog_wait:
                    self.transport.pause_reading()
        if self.backlog.full and not self.backlog_wait and not self.sock_lost:
            self.backlog_wait = True  # until the connection's send buffer drains
            self.backlog.waiting.append(self)
            if not self.reading_paused:
                self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self.eof_out or self.close_out:
            return True
        self.eof_out = True
        if not self.is_open:
            return True  # sent once the channel is open, after what the socket sent
        batch = getattr(self.conn, "wraith_batch", None)  # EOF and CLOSE in one write
        if batch is not None:
            batch[0]()
        try:
            if not self.queue:
                self._send_eof()
        finally:
            if batch is not None:
                batch[1]()
        return True  # keep our write side open: half-close

    def connection_lost(self, exc: BaseException | None) -> None:
        self.sock_lost = True
        self._stop_timer()
        if self.close_out:
            return
        if exc is None and self.eof_out and self.eof_in:
            if not self.queue:
                self._close_channel()
            return  # the queue drains first (the EOF, then the close, follow it)
        self._abort_channel()  # cut: the peer must see a failure, not a clean end

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.last:  # the socket took what we wrote: bytes are moving
            self.last = time.monotonic()
        self._grant()

    def backlog_cleared(self) -> None:
        """The connection's send buffer has drained (backlog.py)."""
        self.backlog_wait = False
        if not self.reading_paused and not self.sock_lost and not self.close_out:
            self.transport.resume_reading()

    # -- the channel (asyncssh's connection calls these) -------------------------

    def lean_data(self, plain: bytes, end: int) -> bool:
        """CHANNEL_DATA from lean_recv: ``plain[10:end]`` is the data (False: malformed)."""
        datalen = int.from_bytes(plain[6:10], "big")
        if 10 + datalen != end:
            return False
        self._data(plain[10:end])
        return True

    def _data(self, data: bytes) -> None:
        if not self.is_open or self.eof_in or self.close_in:
            raise ProtocolError("Channel not open for sending")
        n = len(data)
        if n > self.recv_window:
            raise ProtocolError("Window exceeded")
        if not n or self.close_out:
            return
        self.recv_window -= n
        if self.last:
            self.last = time.monotonic()
        transport = self.transport
        if transport is None:
            if self.held is None:
                self.held = []
            self.held.append(bytes(data))
            return
        transport.write(data)
        if self.recv_window < self.window >> 1 and not self.writing_paused:
            self._grant()

    def log_received_packet(self, *args: Any) -> None:
        """asyncssh's packet log (debug level 3): these channels keep their packets out of it."""

    def process_packet(self, pkttype: int, pktid: int, packet: Any) -> bool:
        if pkttype == MSG_CHANNEL_DATA:
            data = packet.get_string()
            packet.check_end()
            self._data(data)
            return True
        if not self.is_open or self.close_in:
            raise ProtocolError("Channel not open")
        if pkttype == MSG_CHANNEL_WINDOW_ADJUST:
            adjust = packet.get_uint32()
            packet.check_end()
            self.send_window = min(self.send_window + adjust, _MAX_WINDOW)
            if self.last:
                self.last = time.monotonic()
            if self.queue:
                self._flush()
        elif pkttype == MSG_CHANNEL_EOF:
            if self.eof_in:
                raise ProtocolError("Channel not open for sending")
            packet.check_end()
            self._eof()
        elif pkttype == MSG_CHANNEL_CLOSE:
            packet.check_end()
            self._closed_by_peer()
        elif pkttype == MSG_CHANNEL_REQUEST:
            packet.get_string()
            want_reply = packet.get_boolean()
            if want_reply and not self.close_out:  # no requests on a forward channel
                self._send(MSG_CHANNEL_FAILURE, self.send_hdr)
        elif pkttype == MSG_CHANNEL_EXTENDED_DATA:
            raise ProtocolError("Invalid extended data type")
        elif pkttype in (MSG_CHANNEL_SUCCESS, MSG_CHANNEL_FAILURE):
            raise ProtocolError("Unexpected channel response")
        else:
            return False
        return True

    def process_connection_close(self, exc: Exception | None) -> None:
        """The SSH connection is gone."""
        callback, self.on_open = self.on_open, None
        if not self.close_out:
            self.close_out = True
            self._end_socket()
        self.close_in = True
        self.queue.clear()
        self._stop_timer()
        self._cleanup()
        if callback is not None:
            try:
                callback(exc or ConnectionResetError("SSH connection closed"))
            except Exception:
                log.exception("channel open handler failed")

    def close(self) -> None:
        """asyncssh's ``disconnect`` closes every channel."""
        self.abort()

    def abort(self) -> None:
        """Tear both sides down: CLOSE now, reset the socket."""
        self._abort_channel()
        self._reset_socket()

    # -- internals --------------------------------------------------------------

    def _send(self, pkttype: int, *parts: bytes | memoryview) -> None:
        conn = self.conn
        if conn._transport and not send_lean(conn, pkttype, parts):
            conn.send_packet(pkttype, *parts)

    def _flush(self) -> None:
        """Send queued socket bytes as far as the peer's window allows."""
        queue = self.queue
        while queue and self.send_window:
            size = min(self.send_window, self.send_pktsize)
            view = queue[0]
            if len(view) > size:
                data, queue[0] = view[:size], view[size:]
            else:
                data = view
                del queue[0]
            n = len(data)
            self.queued -= n
            self.send_window -= n
            self._send(MSG_CHANNEL_DATA, self.send_hdr + n.to_bytes(4, "big"), data)
        if self.reading_paused and self.queued <= LOW_WATER and not self.sock_lost:
            self.reading_paused = False
            if not self.backlog_wait:
                self.transport.resume_reading()
        if not queue and self.eof_out and not self.eof_sent:
            self._send_eof()
            if self.sock_lost and not self.close_out:
                self._close_channel()

    def _grant(self) -> None:
        """Give the peer back the window consumed (once half of it is)."""
        if self.recv_window < self.window >> 1 and not self.close_out and not self.eof_in:
            self._send(MSG_CHANNEL_WINDOW_ADJUST, self.send_hdr + (self.window - self.recv_window).to_bytes(4, "big"))
            self.recv_window = self.window

    def _send_eof(self) -> None:
        self.eof_sent = True
        self._send(MSG_CHANNEL_EOF, self.send_hdr)
        if self.eof_in:
            self._close_channel()
            self._close_socket()
        else:
            self._half_open()

    def _eof(self) -> None:
        self.eof_in = True
        transport = self.transport
        if transport is not None and not self.sock_lost:
            transport.write_eof()
        if self.eof_sent:
            self._close_channel()
            self._close_socket()
        else:
            self._half_open()

    def _closed_by_peer(self) -> None:
        self.close_in = True
        self._stop_timer()
        clean = self.eof_in and self.eof_sent
        if not self.close_out:
            self.queue.clear()
            self.close_out = True
            self._send(MSG_CHANNEL_CLOSE, self.send_hdr)
        if clean:
            self._close_socket()
        else:
            self._reset_socket()
        self._cleanup()

    def _close_channel(self) -> None:
        """Both directions have ended: CLOSE (the peer's CLOSE then cleans up)."""
        if not self.close_out:
            self.close_out = True
            self._stop_timer()
            self._send(MSG_CHANNEL_CLOSE, self.send_hdr)
            self._cleanup()

    def _abort_channel(self) -> None:
        self.queue.clear()
        self._stop_timer()
        if not self.close_out:
            self.close_out = True
            if self.is_open:
                self._send(MSG_CHANNEL_CLOSE, self.send_hdr)
            self._cleanup()

    def _end_socket(self) -> None:
        """The channel went away: a clean end if both directions had ended, else a reset."""
        if self.eof_in and self.eof_sent:
            self._close_socket()
        else:
            self._reset_socket()

    def _close_socket(self) -> None:
        """Close after what is buffered has been written (both directions have ended)."""
        t = self.transport
        if t is not None and not self.sock_lost:
            self.sock_lost = True
            t.close()

    def _reset_socket(self) -> None:
        t = self.transport
        if t is not None and not self.sock_lost:
            self.sock_lost = True
            linger_zero(t)
            t.abort()

    def _cleanup(self) -> None:
        """Leave the connection's channel table once CLOSE went both ways (or the
        connection is gone, or the open failed)."""
        if self.close_in and self.close_out and self.conn is not None:
            channels = self.conn._channels
            if channels.get(self.recv_chan) is self:
                del channels[self.recv_chan]
            self.conn = _Gone

    def _half_open(self) -> None:
        timeout = RelayEnd.half_open_timeout
        if timeout > 0 and self.timer is None and not self.close_out:
            self.last = time.monotonic()
            self.timer = asyncio.get_running_loop().call_later(timeout, self._half_open_check)

    def _half_open_check(self) -> None:
        self.timer = None
        if self.close_out:
            return
        timeout = RelayEnd.half_open_timeout
        idle = time.monotonic() - self.last
        if idle >= timeout:
            self.abort()
        else:
            self.timer = asyncio.get_running_loop().call_later(timeout - idle, self._half_open_check)

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _GoneConnection:
    """Stands in for the connection once the channel has left it: sends go nowhere."""

    _transport = None
    _channels: dict[int, Any] = {}

    @staticmethod
    def send_packet(*args: Any, **kwargs: Any) -> None:
        pass


_Gone: Any = _GoneConnection()
