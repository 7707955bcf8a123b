"""``serve()``: a running wraith server for programs.

Incoming control-channel streams (``wraith-control:0``) arrive with a
``ConnectionInfo`` through ``on_connection(cb)`` (a plain function, or an
async one, which runs as a task) or ``async for stream, info in server``
(iteration ends when the server closes). While nothing consumes them, the
built-in event hub does (that is what ``wraith serve`` runs). Once iteration
has started, streams queue for it; those still queued at ``close()`` are
aborted.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from .duplex import DuplexStream
from .options import ServeOptions
from .ssh.server import ConnectionInfo, SSHServerRunner

log = logging.getLogger("wraith.serve")

ConnectionCallback = Callable[[DuplexStream, ConnectionInfo], Awaitable[None] | None]
_Item = tuple[DuplexStream, ConnectionInfo] | None  # None: the server closed


class WraithServer:
    def __init__(self, options: ServeOptions, use_hub: bool = True) -> None:
        self.options = options
        self.runner = SSHServerRunner(options, on_control=self._incoming)
        self._callback: ConnectionCallback | None = None
        self._queue: asyncio.Queue[_Item] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
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
        if self._closed:
            stream.abort()
        elif self._callback is not None:
            result = self._callback(stream, info)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._callback_done)
        elif self._queue is not None:
            self._queue.put_nowait((stream, info))
        elif self._hub is not None:
            self._hub.add(stream, info)  # type: ignore[attr-defined]
        else:
            stream.abort()

    def _callback_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("connection callback failed: %s", task.exception().__class__.__name__)

    def __aiter__(self) -> AsyncIterator[tuple[DuplexStream, ConnectionInfo]]:
        if self._queue is None:
            self._queue = asyncio.Queue()
            if self._closed:
                self._queue.put_nowait(None)
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[DuplexStream, ConnectionInfo]]:
        assert self._queue is not None
        while True:
            item = await self._queue.get()
            if item is None:
                self._queue.put_nowait(None)  # every other iterator ends too
                return
            yield item

    async def close(self) -> None:
        self._closed = True
        await self.runner.close()
        if self._queue is not None:
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if item is not None:
                    item[0].abort()
            self._queue.put_nowait(None)
        if self._hub is not None:
            await self._hub.close()  # type: ignore[attr-defined]
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

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
