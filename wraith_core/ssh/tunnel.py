"""Adapters from wraith transports to asyncssh's ``tunnel=`` hook.

asyncssh accepts any object with ``create_connection(factory, host, port)``
(client) or ``create_server(factory, host, port)`` (server) as a tunnel; the
factory builds its SSH connection protocol. We hand that factory to the
transport, so SSH runs over whatever stream the transport made.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ..transport.base import Acceptor, Connector


class ConnectorTunnel:
    def __init__(self, connector: Connector) -> None:
        self._connector = connector

    async def create_connection(self, session_factory: Callable[..., Any], host: str,
                                port: int) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
        return await self._connector.connect(session_factory)

    def close(self) -> None:
        pass

    async def wait_closed(self) -> None:
        pass


class AcceptorTunnel:
    """Server side. ``wrap(make_conn)`` returns the protocol to run on an accepted stream."""

    def __init__(self, acceptor: Acceptor,
                 wrap: Callable[[Callable[[], asyncio.BaseProtocol]], asyncio.BaseProtocol]) -> None:
        self._acceptor = acceptor
        self._wrap = wrap

    async def create_server(self, session_factory: Callable[[str, int], Any], host: str,
                            port: int) -> AcceptorTunnel:
        await self._acceptor.start(lambda: self._wrap(lambda: session_factory("", 0)))
        return self

    def close(self) -> None:
        self._acceptor.close()

    async def wait_closed(self) -> None:
        await self._acceptor.wait_closed()

    def get_addresses(self) -> list[Any]:
        return []

    def get_port(self) -> int:
        return 0
