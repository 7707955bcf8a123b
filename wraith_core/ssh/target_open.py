"""Server side of a direct-tcpip open, by callback, for targets given as IP addresses.

asyncssh answers a CHANNEL_OPEN from a task: it builds the channel, awaits the
session coroutine (our dial: ``loop.create_connection``, which builds the
socket's transport before it returns), then sends the confirmation a loop pass
later. That is the longest step of a SOCKS connect on the server. Here
``connection_requested`` hands asyncssh a stand-in for the channel whose
``process_open`` starts the connect; the confirmation goes out the moment the
socket reports connected (at once for a loopback target), and only then are
asyncssh's channel object (its number predicted, then checked) and the
socket's transport built — while the confirmation travels to the client and
its application, so off the critical path. Bytes that arrive from the channel
meanwhile are held by the relay (and bytes the target sends wait in the
kernel). A failed connect needs no channel object at all.

Host names (DNS) and targets reached through ``--proxy`` keep the dial task;
so does a connection whose asyncssh internals are not what this expects.
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
from .internals import has_names, next_channel_number, release

log = logging.getLogger("wraith.server")

# what the callback open uses on asyncssh's connection and on the channel it then builds
_CONN_NAMES = ("send_channel_open_confirmation", "send_channel_open_failure", "create_tcp_channel", "_transport",
               "_next_recv_chan", "_channels", "abort")
_CHANNEL_NAMES = ("_send_chan", "_send_window", "_send_pktsize", "_recv_chan", "_recv_window", "_recv_pktsize",
                  "_send_state", "_recv_state", "_session", "_wrap_session", "resume_reading",
                  "set_inbound_peer_names", "_cleanup")
_prediction_checked = [False]  # as the client's: the first confirmation builds the channel first

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


def pending_channel(conn: Any, address: Address, timeout: float, window: int,
                    pktsize: int) -> tuple[Any, RelayEnd] | None:
    """What ``connection_requested`` returns for an IP-address target: a stand-in for the
    channel, whose ``process_open`` (called by asyncssh) connects, and the channel's relay
    end as the session. None when asyncssh's connection is not what this expects."""
    if not has_names(conn, _CONN_NAMES):
        return None
    target, chan_end = RelayEnd.pair()
    return _PendingChannel(conn, target, chan_end, address, timeout, window, pktsize), chan_end


class _PendingChannel:
    """A direct-tcpip open whose target connect is in flight. asyncssh's channel object is
    built only once the confirmation has gone out (its number is known in advance); a
    failed connect needs no channel at all, only the open-failure message."""

    __slots__ = ("conn", "target", "chan_end", "address", "timeout", "window", "pktsize", "names",
                 "send", "sock", "timer", "loop")

    def __init__(self, conn: Any, target: RelayEnd, chan_end: RelayEnd, address: Address, timeout: float,
                 window: int, pktsize: int) -> None:
        self.conn = conn
        self.target = target
        self.chan_end = chan_end
        self.address = address
        self.timeout = timeout
        self.window = window
        self.pktsize = pktsize
        self.names: tuple[Any, ...] = ()
        self.send = (0, 0, 0)  # the peer's channel number, window and packet size
        self.sock: socket.socket | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def set_inbound_peer_names(self, *names: Any) -> None:
        self.names = names  # for the channel, once it exists

    def process_open(self, send_chan: int, send_window: int, send_pktsize: int, session: Any) -> None:
        """asyncssh's ``SSHChannel.process_open``, without the task: start the connect."""
        self.send = (send_chan, send_window, send_pktsize)
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
        if self.conn._transport:
            self.conn.send_channel_open_failure(self.send[0], asyncssh.OPEN_CONNECT_FAILED, reason, DEFAULT_LANG)

    def _connected(self) -> None:
        """Confirm now; build the channel right after; give the socket its transport later."""
        conn, sock, chan_end = self.conn, self.sock, self.chan_end
        assert sock is not None
        self.sock = None
        if not conn._transport:  # the SSH connection went away meanwhile
            sock.close()
            return
        send_chan, send_window, send_pktsize = self.send
        window, pktsize = self.window, self.pktsize
        number = next_channel_number(conn)
        early = _prediction_checked[0]
        if early:
            conn.send_channel_open_confirmation(send_chan, number, window, pktsize)
        chan: Any = None
        try:
            chan = conn.create_tcp_channel(window=window, max_pktsize=pktsize)
            ok = (has_names(chan, _CHANNEL_NAMES) and chan._recv_chan == number
                  and (chan._recv_window, chan._recv_pktsize) == (window, pktsize))
        except Exception:  # asyncssh.ChannelOpenError cannot happen here: the transport is up
            ok = False
        if not ok:
            sock.close()
            if chan is not None:
                release(chan)
            if early:  # a confirmation went out for a number that is not this channel's
                log.error("channel number prediction failed: closing the session")
                conn.abort()
            else:
                self._fail("Connection failed")
            return
        try:
            # what asyncssh's process_open and _finish_open_request do for a forward channel
            chan._send_chan, chan._send_window, chan._send_pktsize = send_chan, send_window, send_pktsize
            chan.set_inbound_peer_names(*self.names)
            wrapped, chan._session = chan._wrap_session(chan_end)
            if not early:  # the first open: the prediction held, so later ones confirm first
                conn.send_channel_open_confirmation(send_chan, number, window, pktsize)
                _prediction_checked[0] = True
            chan._send_state = "open"
            chan._recv_state = "open"
            chan_end.connection_made(wrapped)
            chan_end.session_started()
            chan.resume_reading()
        except Exception:
            log.exception("channel open confirmation failed")
            sock.close()
            chan.abort()
            return
        spawn(_attach(self.target, chan_end, sock))


async def _attach(target: RelayEnd, chan_end: RelayEnd, sock: socket.socket) -> None:
    try:
        await asyncio.get_running_loop().create_connection(lambda: target, sock=sock)
    except Exception:
        sock.close()
        chan_end.abort()
