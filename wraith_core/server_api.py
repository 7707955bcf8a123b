"""``serve()``: a running wraith server for programs.

Incoming control-channel streams (``wraith-control:0``) arrive with a
``ConnectionInfo`` through ``on_connection(cb)`` or ``async for stream, info
in server``. While nothing consumes them, the built-in event hub does (that
is what ``wraith serve`` runs).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from .duplex import DuplexStream
from .options import ServeOptions
from .ssh.server import ConnectionInfo, SSHServerRunner

log = logging.getLogger("wraith.serve")

ConnectionCallback = Callable[[DuplexStream, ConnectionInfo], None]


class WraithServer:
    def __init__(self, options: ServeOptions, use_hub: bool = True) -> None:
        self.options = options
        self.runner = SSHServerRunner(options, on_control=self._incoming)
        self._callback: ConnectionCallback | None = None
        self._queue: asyncio.Queue[tuple[DuplexStream, ConnectionInfo]] | None = None
        self._hub = None
        if use_hub:
            self._hub = _make_hub()

    @property
    def hub(self) -> object:
        return self._hub

    async def start(self) -> WraithServer:
        await self.runner.start()
        return self

    def addresses(self) -> list[str]:
        return self.runner.addresses()

    def on_connection(self, callback: ConnectionCallback) -> None:
        self._callback = callback

    def _incoming(self, stream: DuplexStream, info: ConnectionInfo) -> None:
        if self._callback is not None:
            self._callback(stream, info)
        elif self._queue is not None:
            self._queue.put_nowait((stream, info))
        elif self._hub is not None:
            self._hub.add(stream, info)  # type: ignore[attr-defined]
        else:
            stream.abort()

    def __aiter__(self) -> AsyncIterator[tuple[DuplexStream, ConnectionInfo]]:
        if self._queue is None:
            self._queue = asyncio.Queue()
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[DuplexStream, ConnectionInfo]]:
        assert self._queue is not None
        while True:
            item = await self._queue.get()
            yield item

    async def close(self) -> None:
        await self.runner.close()
        if self._hub is not None:
            await self._hub.close()  # type: ignore[attr-defined]

    async def __aenter__(self) -> WraithServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def serve(options: ServeOptions, on_connection: ConnectionCallback | None = None) -> WraithServer:
    server = WraithServer(options)
    if on_connection is not None:
        server.on_connection(on_connection)
    return await server.start()


def _make_hub() -> object:
    try:
        from .bus import Hub
    except ImportError:  # the event bus is not part of this build
        return None
    return Hub()
