"""The SOCKS5 listener: protocol/socks5 + channel manager + the socket's channel (opening.py).

The success reply is sent only after the SSH channel has opened; failures map
to SOCKS5 reply codes, and a channel not open within the handshake timeout
(30 s from the connection) gets a general-failure reply. Domain names go to
the server unresolved (SOCKS5h). Targets are never logged.
"""

from __future__ import annotations

import asyncio
import logging

from .errors import ConnectError
from .opening import ChannelOpening
from .protocol.socks5 import ConnectRequest, HandshakeFailed, Reply, Socks5Server
from .ssh.channels import ChannelManager, ChannelOpenFailed

log = logging.getLogger("wraith.socks")

HANDSHAKE_TIMEOUT = 30.0


class _SocksConn(ChannelOpening):
    __slots__ = ("_listener", "_codec", "_waiting")

    def __init__(self, listener: Socks5Listener) -> None:
        super().__init__()
        self._listener = listener
        self._codec = Socks5Server(listener.credentials)
        self._waiting = False  # request received, channel opening

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
        if self._waiting:  # bytes sent before our reply are held
            self._hold_check(len(codec.trailing_data))
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
                self._hold_check(len(codec.trailing_data))
                self._open(self._listener.manager, event.host, event.port)
                return

    def eof_received(self) -> bool:
        # EOF during the handshake: nothing sensible can follow
        if self._codec.state not in ("wait_reply", "done"):
            self._cancel_timer()
            return False
        self._eof = True  # the client half-closed right after its request: pass it on later
        return True

    def _held_data(self) -> bytes:
        return self._codec.trailing_data

    def _answered(self, failure: ChannelOpenFailed | None) -> bool:
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
