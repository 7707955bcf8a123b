"""Server side of a direct-tcpip open, by callback, for targets given as IP addresses.

asyncssh answers a CHANNEL_OPEN from a task: it builds the channel, awaits the
session coroutine (our dial: ``loop.create_connection``, which builds the
socket's transport before it returns), then sends the confirmation a loop pass
later. That is the longest step of a SOCKS connect on the server. Here
``connection_requested`` hands asyncssh a stand-in for the channel whose
``process_open`` starts the connect; the confirmation goes out the moment the
socket reports connected (at once for a loopback target), on a
:class:`~.socket_channel.SocketChannel` (the channel and the socket's protocol in
one); the socket's transport is built after that, while the confirmation
travels to the client. Bytes that arrive from the channel meanwhile are held by
the channel (and bytes the target sends wait in the kernel). A failed connect
needs no channel object at all.

Host names (DNS) and targets reached through ``--proxy`` keep the dial task;
so does a connection whose asyncssh internals are not what this expects.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import time
from typing import Any

import asyncssh
from asyncssh.constants import DEFAULT_LANG

from ..dial import TIMED_OUT, DialError, dial, reason_for_oserror
from ..relay import LINGER_ZERO, spawn
from .internals import has_names
from .socket_channel import SocketChannel

log = logging.getLogger("wraith.server")

# what the callback open and its SocketChannel use on asyncssh's connection
_CONN_NAMES = ("send_channel_open_confirmation", "send_channel_open_failure", "add_channel",
               "_update_recv_pktlen", "_transport", "_channels", "send_packet")

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


class DialBudget:
    """Target connects in flight on one SSH connection, at most ``limit``. Each holds a
    descriptor until it answers or times out: without a bound, one client opening
    channels to a black-holed address could use up the server's descriptors, and so
    refuse everybody else's connections."""

    __slots__ = ("limit", "used", "with_channel")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.with_channel = 0  # of those, the ones whose channel is in the connection's table already

    def take(self) -> bool:
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def give(self) -> None:
        self.used -= 1


# -- the descriptor reserve ------------------------------------------------------------------
# Linux hands out the lowest free descriptor number, so a new descriptor numbered N means
# N are in use. Opens and forwards refuse a descriptor numbered within the top eighth of
# RLIMIT_NOFILE (at least 64, at most 1024, never more than half): those stay free for
# what must keep working when one login is greedy — accepting connections and logging in.
RESERVE_LOW, RESERVE_HIGH = 64, 1024
LOW_FDS_LOG_EVERY = 10.0  # seconds between "descriptors running low" lines
_low_logged = -LOW_FDS_LOG_EVERY


def fd_reserve(limit: int) -> int:
    """How many descriptors of a soft limit of ``limit`` are kept back."""
    return min(max(limit // 8, RESERVE_LOW), RESERVE_HIGH, limit // 2)


def in_fd_reserve(fd: int) -> bool:
    """Whether descriptor ``fd``, just made, lies in the reserve (the limit is read each
    time: an administrator may lower it with prlimit while the server runs)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or fd < soft - fd_reserve(soft):
        return False
    global _low_logged
    now = time.monotonic()
    if now - _low_logged >= LOW_FDS_LOG_EVERY:  # one line per burst, not one per refusal
        _low_logged = now
        log.warning("file descriptors running low (limit %d): refusing new channels and forwards", soft)
    return True


# Dials made elsewhere (``dial.py``: host names, ``--proxy``) admitted and not yet over, on
# all connections: each is about to take a descriptor, or holds one already.
_dials_in_flight = 0


def fds_running_out() -> bool:
    """:func:`in_fd_reserve` for a dial made elsewhere (``dial.py``), whose socket is made
    later in a task: the descriptor the next socket would get (found by opening one and
    closing it again), counting one more for each such dial in flight — a burst of them
    all passes this check before the first has its socket."""
    try:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno in (errno.EMFILE, errno.ENFILE)
    os.close(fd)
    return in_fd_reserve(fd + _dials_in_flight)


NO_DESCRIPTORS = "Server out of file descriptors"


def pending_channel(conn: Any, address: Address, timeout: float, window: int,
                    pktsize: int, budget: DialBudget | None = None) -> tuple[Any, None] | None:
    """What ``connection_requested`` returns for an IP-address target: a stand-in for the
    channel, whose ``process_open`` (called by asyncssh) connects, and no session (the
    channel is its own). None when asyncssh's connection is not what this expects.
    ``budget``: taken already, given back when the connect has an outcome."""
    if not has_names(conn, _CONN_NAMES):
        return None
    return _PendingChannel(conn, address, timeout, window, pktsize, budget), None


_DIRECT_TCPIP = b"direct-tcpip"


def parse_direct_open(plain: bytes, end: int) -> tuple[int, int, int, str, int] | None:
    """A direct-tcpip CHANNEL_OPEN's fields from a decrypted packet (``plain[1]`` is the
    message type, the payload ends at ``end``): the peer's channel number, window and
    packet size, the target host and port. None for anything else or anything unusual
    (asyncssh's own path then handles the packet and raises the right error)."""
    return parse_open(plain, end, _DIRECT_TCPIP)


def parse_open(plain: bytes, end: int, chantype_wanted: bytes) -> tuple[int, int, int, str, int] | None:
    """As :func:`parse_direct_open` for a channel type of the same layout (``forwarded-tcpip``:
    the host and port are the listener's)."""
    fields: list[Any] = []
    pos = 2
    for kind in "sUUUsUsU":  # type, channel, window, packet size, host, port, originator, its port
        if pos + 4 > end:
            return None
        value = int.from_bytes(plain[pos:pos + 4], "big")
        pos += 4
        if kind == "s":
            if pos + value > end:
                return None
            fields.append(plain[pos:pos + value])
            pos += value
        else:
            fields.append(value)
    chantype, send_chan, send_window, send_pktsize, host, port, orig_host = fields[:7]
    if pos != end or chantype != chantype_wanted or not send_pktsize:
        return None
    try:
        orig_host.decode("utf-8")  # asyncssh refuses the open otherwise
        return send_chan, send_window, send_pktsize, host.decode("utf-8"), port
    except UnicodeDecodeError:
        return None


class _PendingChannel:
    """A direct-tcpip open whose target connect is in flight. The channel is built once
    the target has answered; a failed connect needs no channel at all, only the
    open-failure message."""

    __slots__ = ("conn", "address", "timeout", "window", "pktsize", "send", "sock", "timer", "loop", "budget")

    def __init__(self, conn: Any, address: Address, timeout: float, window: int, pktsize: int,
                 budget: DialBudget | None = None) -> None:
        self.budget = budget
        self.conn = conn
        self.address = address
        self.timeout = timeout
        self.window = window
        self.pktsize = pktsize
        self.send = (0, 0, 0)  # the peer's channel number, window and packet size
        self.sock: socket.socket | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def set_inbound_peer_names(self, *names: Any) -> None:
        """asyncssh passes the channel's peer names (nothing here keeps them)."""

    def process_open(self, send_chan: int, send_window: int, send_pktsize: int, session: Any) -> None:
        """asyncssh's ``SSHChannel.process_open``, without the task: start the connect."""
        self.send = (send_chan, send_window, send_pktsize)
        family, sockaddr = self.address
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self._fail(NO_DESCRIPTORS, asyncssh.OPEN_RESOURCE_SHORTAGE)
            else:
                self._fail(reason_for_oserror(exc))
            return
        if in_fd_reserve(sock.fileno()):
            sock.close()
            self._fail(NO_DESCRIPTORS, asyncssh.OPEN_RESOURCE_SHORTAGE)
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

    def _settle_budget(self) -> None:
        budget, self.budget = self.budget, None
        if budget is not None:
            budget.give()

    def _fail(self, reason: str, code: int = asyncssh.OPEN_CONNECT_FAILED) -> None:
        self._settle_budget()
        if self.conn._transport:
            self.conn.send_channel_open_failure(self.send[0], code, reason, DEFAULT_LANG)

    def _connected(self) -> None:
        """Confirm now, on a channel fused with the socket; give the socket its transport later."""
        self._settle_budget()
        conn, sock = self.conn, self.sock
        assert sock is not None
        self.sock = None
        if not conn._transport:  # the SSH connection went away meanwhile
            sock.close()
            return
        send_chan, send_window, send_pktsize = self.send
        try:
            chan = SocketChannel(conn, self.window, self.pktsize)
        except Exception:  # asyncssh.ChannelOpenError cannot happen here: the transport is up
            log.exception("channel setup failed")
            sock.close()
            self._fail("Connection failed")
            return
        conn.send_channel_open_confirmation(send_chan, chan.recv_chan, self.window, self.pktsize)
        chan.opened(send_chan, send_window, send_pktsize)
        _flush(conn)  # out now, not when this batch of received packets is done
        spawn(_attach(chan, sock))


def pending_dial(conn: Any, host: str, port: int, timeout: float, window: int, pktsize: int,
                 proxy: Any, budget: DialBudget | None = None) -> tuple[Any, None] | None:
    """As :func:`pending_channel`, for a host name or a target reached through ``proxy``:
    a task resolves and dials (``dial.py``), straight into a SocketChannel that is
    confirmed once connected. None when asyncssh's connection is not what this expects."""
    if not has_names(conn, _CONN_NAMES):
        return None
    return _PendingDial(conn, host, port, timeout, window, pktsize, proxy, budget), None


class _PendingDial:
    __slots__ = ("conn", "host", "port", "timeout", "window", "pktsize", "proxy", "budget", "chan_made")

    def __init__(self, conn: Any, host: str, port: int, timeout: float, window: int, pktsize: int,
                 proxy: Any, budget: DialBudget | None = None) -> None:
        self.budget = budget
        self.conn = conn
        self.host = host
        self.port = port
        self.timeout = timeout
        self.window = window
        self.pktsize = pktsize
        self.proxy = proxy
        self.chan_made = False

    def set_inbound_peer_names(self, *names: Any) -> None:
        """asyncssh passes the channel's peer names (nothing here keeps them)."""

    def process_open(self, send_chan: int, send_window: int, send_pktsize: int, session: Any) -> None:
        global _dials_in_flight
        _dials_in_flight += 1
        spawn(self._dial_within_budget(send_chan, send_window, send_pktsize))

    async def _dial_within_budget(self, send_chan: int, send_window: int, send_pktsize: int) -> None:
        global _dials_in_flight
        try:
            await self._dial(send_chan, send_window, send_pktsize)
        finally:
            _dials_in_flight -= 1
            if self.budget is not None:
                self.budget.give()
                if self.chan_made:
                    self.budget.with_channel -= 1

    async def _dial(self, send_chan: int, send_window: int, send_pktsize: int) -> None:
        conn = self.conn
        if not conn._transport:
            return
        chan = SocketChannel(conn, self.window, self.pktsize)  # the socket may speak before the answer
        if self.budget is not None:  # in the connection's table now: counted there, not twice
            self.chan_made = True
            self.budget.with_channel += 1
        code = asyncssh.OPEN_CONNECT_FAILED
        try:
            await dial(chan, self.host, self.port, self.timeout, self.proxy)
        except DialError as exc:
            reason = exc.reason
            if exc.prohibited:  # the server's --proxy said "not allowed": the client's SOCKS reply 2
                code = asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
        except Exception:  # never let an unexpected error end the task silently
            reason = "Connection failed"
        else:
            if not chan.close_out and conn._transport:  # (the target may have reset meanwhile)
                # the confirmation first: opened() sends what the target has said so far
                conn.send_channel_open_confirmation(send_chan, chan.recv_chan, self.window, self.pktsize)
                chan.opened(send_chan, send_window, send_pktsize)
                return
            reason = "Connection reset"
        chan.discard()
        if conn._transport:
            conn.send_channel_open_failure(send_chan, code, reason, DEFAULT_LANG)


def _flush(conn: Any) -> None:
    """Send what the connection has batched (speedups), the confirmation among it."""
    flush = getattr(conn, "wraith_flush", None)
    if flush is not None:
        flush()


async def _attach(chan: SocketChannel, sock: socket.socket) -> None:
    if chan.close_out:  # the channel ended before the socket was handed over: reset the target
        _reset(sock)
        return
    try:
        await asyncio.get_running_loop().create_connection(lambda: chan, sock=sock)
    except Exception:
        _reset(sock)
        chan.abort()


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:  # already closed along with a transport
        pass
