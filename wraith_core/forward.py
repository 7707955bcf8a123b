"""Local forwards (``--forward``, OpenSSH ``-L``): listen here, open a channel per connection."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .addr import ForwardSpec
from .errors import ConnectError
from .relay import AcceptedEnd, RelayEnd
from .ssh.channels import ChannelManager

log = logging.getLogger("wraith.forward")


class LocalForwarder:
    def __init__(self, manager: ChannelManager, spec: ForwardSpec) -> None:
        self.manager = manager
        self.spec = spec
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        spec = self.spec
        host, port = spec.host, spec.port

        async def opener(end: RelayEnd, _transport: Any) -> None:
            await self.manager.open_relay(end, host, port)

        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: AcceptedEnd(opener), spec.bind_host,
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
