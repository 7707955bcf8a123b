"""The SOCKS5 listener: protocol/socks5 + channel manager + the one relay.

The success reply is sent only after the SSH channel has opened; failures map
to SOCKS5 reply codes, and a channel not open within the handshake timeout
(30 s from the connection) gets a general-failure reply. Domain names go to
the server unresolved (SOCKS5h). Targets are never logged.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from .errors import ConnectError
from .protocol.socks5 import ConnectRequest, HandshakeFailed, Reply, Socks5Server
from .relay import RelayEnd, spawn
from .ssh.channels import ChannelManager, ChannelOpenFailed, OpenDone
from .ssh.socket_channel import SocketChannel

log = logging.getLogger("wraith.socks")

HANDSHAKE_TIMEOUT = 30.0
# Bytes a client may send after its request, before the reply; past this, reading pauses.
HOLD_LIMIT = 64 * 1024


class _SocksConn(asyncio.Protocol):
    __slots__ = ("_listener", "_codec", "_transport", "_timer", "_lost", "_eof", "_waiting", "_paused", "_chan")

    def __init__(self, listener: Socks5Listener) -> None:
        self._listener = listener
        self._codec = Socks5Server(listener.credentials)
        self._transport: Any = None
        self._timer: asyncio.TimerHandle | None = None
        self._lost = False
        self._eof = False
        self._waiting = False  # request received, channel opening
        self._paused = False
        self._chan: SocketChannel | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(self._listener.handshake_timeout, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if self._waiting:  # the channel did not open in time: a failure reply, not silence
            log.debug("socks5 channel open timed out")
            self._lost = True  # a late answer finds us gone (and closes its channel)
            self._codec.reply(Reply.GENERAL_FAILURE)
            self._transport.write(self._codec.data_to_send())
            self._transport.close()
            return
        log.debug("socks5 handshake timed out")
        self._transport.abort()

    def data_received(self, data: bytes) -> None:
        codec = self._codec
        codec.receive_data(data)
        if self._waiting:
            # Bytes sent before our reply are held (most clients wait for the reply, so
            # reading is paused only if a client sends a lot: no pause/resume per connection).
            if not self._paused and len(codec.trailing_data) >= HOLD_LIMIT:
                self._paused = True
                self._transport.pause_reading()
            return
        out = codec.data_to_send()
        if out:
            self._transport.write(out)
        for event in codec.events():
            if isinstance(event, HandshakeFailed):
                log.debug("socks5 handshake failed: %s", event.reason)
                self._cancel_timer()
                self._transport.close()
                return
            if isinstance(event, ConnectRequest):
                self._waiting = True  # the timer runs on: it also bounds the wait for the channel
                if len(codec.trailing_data) >= HOLD_LIMIT:
                    self._paused = True
                    self._transport.pause_reading()
                manager = self._listener.manager
                self._chan = manager.start_socket_open(event.host, event.port, self._socket_opened)
                if self._chan is None:  # session down: wait for it
                    sock_end, chan_end = RelayEnd.pair()
                    spawn(self._connect(event, chan_end, functools.partial(self._opened, sock_end, chan_end)))
                return

    def eof_received(self) -> bool:
        # EOF during the handshake: nothing sensible can follow
        if self._codec.state not in ("wait_reply", "done"):
            self._cancel_timer()
            return False
        self._eof = True  # the client half-closed right after its request: pass it on later
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost = True
        self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _connect(self, req: ConnectRequest, chan_end: RelayEnd, done: OpenDone) -> None:
        try:
            await self._listener.manager.open_relay(chan_end, req.host, req.port)
        except ChannelOpenFailed as exc:
            done(exc)
        except Exception:
            done(ChannelOpenFailed("channel open failed", Reply.GENERAL_FAILURE))
        else:
            done(None)

    def _socket_opened(self, failure: ChannelOpenFailed | None) -> None:
        chan, self._chan = self._chan, None
        assert chan is not None
        if self._reply(failure):
            self._relay(chan)
        elif failure is None:  # the client went away meanwhile
            chan.abort()

    def _opened(self, sock_end: RelayEnd, chan_end: RelayEnd, failure: ChannelOpenFailed | None) -> None:
        if self._reply(failure):
            self._relay(sock_end)
        elif failure is None and chan_end.transport is not None:
            chan_end.transport.abort()

    def _reply(self, failure: ChannelOpenFailed | None) -> bool:
        """Answer the SOCKS request; True if the relay starts (success, client still here)."""
        self._cancel_timer()
        codec, transport = self._codec, self._transport
        if failure is not None:
            if not self._lost:
                codec.reply(failure.reply)
                transport.write(codec.data_to_send())
                transport.close()
            return False
        if self._lost:
            return False
        codec.reply(Reply.SUCCEEDED)
        transport.write(codec.data_to_send())
        return True

    def _relay(self, protocol: asyncio.Protocol) -> None:
        """The socket now belongs to the relay: hand it what the client sent meanwhile."""
        transport, trailing = self._transport, self._codec.trailing_data
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._paused:
            transport.resume_reading()
        if trailing:
            protocol.data_received(trailing)
        if self._eof:
            protocol.eof_received()


class Socks5Listener:
    def __init__(self, manager: ChannelManager, host: str, port: int,
                 credentials: tuple[bytes, bytes] | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.manager = manager
        self.host = host
        self.port = port
        self.credentials = credentials
        self.handshake_timeout = handshake_timeout
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: _SocksConn(self), self.host, self.port,
                                                    reuse_address=True, backlog=1024)
        except OSError as exc:
            raise ConnectError(f"--socks5: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self.port = int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
