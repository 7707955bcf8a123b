"""Server side of a direct-tcpip open, by callback, for targets given as IP addresses.

asyncssh answers a CHANNEL_OPEN from a task: it awaits the session coroutine
(our dial: ``loop.create_connection``, which builds the socket's transport
before it returns), then sends the confirmation a loop pass later. That is
the longest step of a SOCKS connect on the server. Here the connect starts
from the open itself, the confirmation goes out the moment the socket reports
connected, and the socket's transport is built afterwards — while the
confirmation travels to the client and its application, so off the critical
path. Bytes that arrive from the channel meanwhile are held by the relay
(and bytes the target sends wait in the kernel).

Installed as ``process_open`` on our own channel object (an instance
attribute, as in ``conn_fixes``). Host names (DNS) and targets reached
through ``--proxy`` keep the dial task; so does a channel whose asyncssh
internals are not what this expects.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from typing import Any

import asyncssh
from asyncssh.constants import DEFAULT_LANG

from ..dial import TIMED_OUT, reason_for_oserror
from ..relay import RelayEnd, spawn
from .internals import has_names

log = logging.getLogger("wraith.server")

# what the callback open uses on asyncssh's channel and connection objects
_CHANNEL_NAMES = ("process_open", "_send_chan", "_send_window", "_send_pktsize", "_recv_chan", "_recv_window",
                  "_recv_pktsize", "_send_state", "_recv_state", "_session", "_conn", "_cleanup",
                  "resume_reading", "_wrap_session")
_CONN_NAMES = ("send_channel_open_confirmation", "send_channel_open_failure")

Address = tuple[int, Any]  # (address family, socket address)


def numeric_address(host: str, port: int) -> Address | None:
    """The socket address for an IP address literal (no DNS lookup), else None.
    (``inet_pton`` is exact and a fraction of ``getaddrinfo``'s cost; scoped IPv6
    addresses and other spellings go the dial path.)"""
    if not 0 < port < 65536:
        return None
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except (OSError, UnicodeError, ValueError):
            continue
        return (family, (host, port)) if family == socket.AF_INET else (family, (host, port, 0, 0))
    return None


def install(chan: Any, address: Address, timeout: float) -> RelayEnd | None:
    """Make ``chan`` connect to ``address`` when asyncssh processes the open. Returns the
    channel's relay end (hand it to asyncssh as the session), or None when asyncssh's
    channel is not what this expects (use the dial task then)."""
    conn = getattr(chan, "_conn", None)
    if not has_names(chan, _CHANNEL_NAMES) or not has_names(conn, _CONN_NAMES):
        return None
    target, chan_end = RelayEnd.pair()
    opener = _TargetConnect(chan, conn, target, chan_end, address, timeout)
    chan.process_open = opener.process_open
    return chan_end


class _TargetConnect:
    """One target connect in flight for one channel."""

    __slots__ = ("chan", "conn", "target", "chan_end", "address", "timeout", "sock", "timer", "loop")

    def __init__(self, chan: Any, conn: Any, target: RelayEnd, chan_end: RelayEnd,
                 address: Address, timeout: float) -> None:
        self.chan = chan
        self.conn = conn
        self.target = target
        self.chan_end = chan_end
        self.address = address
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def process_open(self, send_chan: int, send_window: int, send_pktsize: int, session: Any) -> None:
        """asyncssh's ``SSHChannel.process_open``, without the task: start the connect."""
        chan = self.chan
        chan._send_chan = send_chan
        chan._send_window = send_window
        chan._send_pktsize = send_pktsize
        del chan.process_open  # one use; and no reference cycle through the instance
        family, sockaddr = self.address
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            self._fail(reason_for_oserror(exc))
            return
        self.sock = sock
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex(sockaddr)
        except OSError as exc:
            err = exc.errno or errno.EHOSTUNREACH
        if err in (errno.EINPROGRESS, errno.EAGAIN):
            # A local target (loopback) has answered by the time connect() returns:
            # settle it now rather than a loop pass later.
            err = self._settled()
        if err == 0:
            self._connected()
            return
        if err > 0:
            self._failed_errno(err)
            return
        loop = self.loop = asyncio.get_running_loop()
        loop.add_writer(sock.fileno(), self._writable)
        self.timer = loop.call_later(self.timeout, self._timed_out)

    def _settled(self) -> int:
        """0 if connected, an errno if failed, -1 if still connecting."""
        sock = self.sock
        assert sock is not None
        try:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                return err
            sock.getpeername()
        except OSError as exc:
            return -1 if exc.errno == errno.ENOTCONN else (exc.errno or errno.EHOSTUNREACH)
        return 0

    def _stop_waiting(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.loop is not None and self.sock is not None:
            self.loop.remove_writer(self.sock.fileno())
            self.loop = None

    def _writable(self) -> None:
        self._stop_waiting()
        assert self.sock is not None
        try:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as exc:
            err = exc.errno or errno.EHOSTUNREACH
        if err:
            self._failed_errno(err)
        else:
            self._connected()

    def _timed_out(self) -> None:
        self.timer = None
        self._stop_waiting()
        self._close_sock()
        self._fail(TIMED_OUT)

    def _failed_errno(self, err: int) -> None:
        self._close_sock()
        self._fail(reason_for_oserror(OSError(err, os.strerror(err))))

    def _close_sock(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _fail(self, reason: str) -> None:
        chan = self.chan
        try:
            if chan._conn is not None:
                self.conn.send_channel_open_failure(chan._send_chan, asyncssh.OPEN_CONNECT_FAILED, reason, DEFAULT_LANG)
            asyncio.get_running_loop().call_soon(chan._cleanup)
        except Exception:
            log.exception("channel open failure could not be sent")

    def _connected(self) -> None:
        """Confirm the channel now; give the socket its transport afterwards."""
        chan, sock, chan_end = self.chan, self.sock, self.chan_end
        assert sock is not None
        if chan._conn is None:  # the SSH connection went away meanwhile
            self._close_sock()
            return
        try:
            # what asyncssh's _finish_open_request does for a forward channel
            wrapped, chan._session = chan._wrap_session(chan_end)
            self.conn.send_channel_open_confirmation(chan._send_chan, chan._recv_chan,
                                                     chan._recv_window, chan._recv_pktsize)
            chan._send_state = "open"
            chan._recv_state = "open"
            chan_end.connection_made(wrapped)
            chan_end.session_started()
            chan.resume_reading()
        except Exception:
            log.exception("channel open confirmation failed")
            self._close_sock()
            chan.abort()
            return
        self.sock = None
        spawn(_attach(self.target, chan_end, sock))


async def _attach(target: RelayEnd, chan_end: RelayEnd, sock: socket.socket) -> None:
    try:
        await asyncio.get_running_loop().create_connection(lambda: target, sock=sock)
    except Exception:
        sock.close()
        chan_end.abort()
