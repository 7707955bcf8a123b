"""An accepted socket whose SSH channel is being opened (SOCKS5 after its request, ``-L``).

The channel is a :class:`~.ssh.socket_channel.SocketChannel`, opened at once when the
session is up, else as soon as it is back. Bytes and EOF the socket sends while the
channel opens are held; once it is open the socket is handed over
(``transport.set_protocol``) with them. A subclass says what the socket gets when the
answer comes (``_answered``) and bounds the wait with its own timer; an answer that
finds the socket gone closes its channel.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from typing import Any

from .protocol.socks5 import Reply
from .relay import linger_zero, spawn
from .ssh.channels import ChannelManager, ChannelOpenFailed
from .ssh.socket_channel import SocketChannel

log = logging.getLogger("wraith.channels")

# Bytes a client may send before its channel is open; past this, reading pauses.
HOLD_LIMIT = 64 * 1024


class ChannelOpening(asyncio.Protocol, metaclass=abc.ABCMeta):
    __slots__ = ("_transport", "_lost", "_eof", "_paused", "_chan", "_timer")

    def __init__(self) -> None:
        self._transport: Any = None
        self._lost = False
        self._eof = False
        self._paused = False
        self._chan: SocketChannel | None = None
        self._timer: asyncio.TimerHandle | None = None  # the subclass's bound on the wait

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost = True
        self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- for subclasses ------------------------------------------------------------

    @abc.abstractmethod
    def _answered(self, failure: ChannelOpenFailed | None) -> bool:
        """The server answered: tell the socket; True if the relay starts now."""

    @abc.abstractmethod
    def _held_data(self) -> bytes:
        """What the socket sent while the channel was opening."""

    def _hold_check(self, held: int) -> None:
        """Pause reading once ``held`` bytes wait for the channel (most clients wait for
        an answer, so there is no pause and resume on every connection)."""
        if not self._paused and held >= HOLD_LIMIT:
            self._paused = True
            self._transport.pause_reading()

    def _open(self, manager: ChannelManager, host: str, port: int) -> None:
        self._chan = manager.start_socket_open(host, port, self._socket_opened)
        if self._chan is None:  # session down: open once it is back
            spawn(self._open_later(manager, host, port))

    # -- the answer ----------------------------------------------------------------

    async def _open_later(self, manager: ChannelManager, host: str, port: int) -> None:
        while not self._lost:  # (the socket's own timer bounds the wait)
            try:
                await manager.wait_session()
            except ChannelOpenFailed as exc:
                self._socket_opened(exc)
                return
            except Exception:
                self._socket_opened(ChannelOpenFailed("channel open failed", Reply.GENERAL_FAILURE, "ESESSION"))
                return
            if self._lost:
                return
            self._chan = manager.start_socket_open(host, port, self._socket_opened)
            if self._chan is not None:
                return
            conn = manager.session.conn
            if conn is not None and getattr(conn, "_transport", None):  # up, yet no channel:
                # asyncssh is not what we expect (a connection that is closing gets another wait)
                log.error("cannot open channels on this asyncssh version")
                self._socket_opened(ChannelOpenFailed("channel open failed", Reply.GENERAL_FAILURE))
                return
            await asyncio.sleep(0.1)  # the session went down again at once: wait for the next one

    def _socket_opened(self, failure: ChannelOpenFailed | None) -> None:
        chan, self._chan = self._chan, None
        if self._answered(failure):
            assert chan is not None
            self._relay(chan)
        elif failure is None and chan is not None:  # the socket went away meanwhile
            chan.abort()

    def _relay(self, protocol: SocketChannel) -> None:
        """The socket now belongs to the relay: hand it what it sent meanwhile."""
        transport, held = self._transport, self._held_data()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._paused:
            transport.resume_reading()
        if held:
            protocol.data_received(held)
        if self._eof:
            protocol.eof_received()


class HoldingOpening(ChannelOpening):
    """A forward's accepted socket (``-L`` here, ``-R`` on the server): it holds what it
    sends until the channel is open; a refused or unanswered open (``_expire``, from the
    subclass's timer) resets it, so the application sees a failure, not an empty stream."""

    __slots__ = ("_held", "_held_len")

    def __init__(self) -> None:
        super().__init__()
        self._held: list[bytes] = []
        self._held_len = 0

    def _expire(self) -> None:
        self._timer = None
        log.debug("forward channel open timed out")
        self._lost = True  # a late answer finds us gone (and closes its channel)
        self._reset()

    def data_received(self, data: bytes) -> None:
        self._held.append(data)
        self._held_len += len(data)
        self._hold_check(self._held_len)

    def eof_received(self) -> bool:
        self._eof = True  # passed on once the channel is open
        return True

    def _reset(self) -> None:
        if not self._transport.is_closing():
            linger_zero(self._transport)
            self._transport.abort()

    def _held_data(self) -> bytes:
        held, self._held = b"".join(self._held), []
        return held

    def _answered(self, failure: ChannelOpenFailed | None) -> bool:
        self._cancel_timer()
        if self._lost:
            return False
        if failure is not None:
            self._reset()
            return False
        return True
