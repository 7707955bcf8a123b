"""Local forwards (``--forward``, OpenSSH ``-L``): listen here, open a channel per connection.

Each accepted socket opens its channel at once (opening.py: held bytes, then the socket
is handed to its SocketChannel). A channel that cannot be opened, or does not answer
within the connect timeout plus the open slack, resets the socket: the application sees
a failure, not an empty stream.
"""

from __future__ import annotations

import asyncio
import logging

from .addr import ForwardSpec
from .errors import ConnectError
from .opening import HoldingOpening
from .ssh import channels
from .ssh.channels import ChannelManager

log = logging.getLogger("wraith.forward")


class _ForwardConn(HoldingOpening):
    __slots__ = ("_forwarder",)

    def __init__(self, forwarder: LocalForwarder) -> None:
        super().__init__()
        self._forwarder = forwarder

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        fwd = self._forwarder
        wait = fwd.manager.session.options.connect_timeout + channels.OPEN_SLACK
        self._timer = asyncio.get_running_loop().call_later(wait, self._expire)
        self._open(fwd.manager, fwd.spec.host, fwd.spec.port)

class LocalForwarder:
    def __init__(self, manager: ChannelManager, spec: ForwardSpec) -> None:
        self.manager = manager
        self.spec = spec
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        spec = self.spec
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: _ForwardConn(self), spec.bind_host,
                                                    spec.bind_port, reuse_address=True, backlog=1024)
        except OSError as exc:
            raise ConnectError(f"--forward: cannot listen on {spec.bind_host}:{spec.bind_port}: "
                               f"{exc.strerror or exc}") from None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
