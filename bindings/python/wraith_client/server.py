"""``serve()`` through the daemon: a control WebSocket, and one WebSocket per incoming stream."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from . import _ipc
from .daemon import Endpoint
from .errors import WraithError
from .stream import Stream, open_stream

log = logging.getLogger("wraith_client")


@dataclass(frozen=True)
class ConnectionInfo:
    remote_address: str
    transport: str
    user: str
    key_fingerprint: str

    @staticmethod
    def from_wire(d: dict[str, Any]) -> ConnectionInfo:
        return ConnectionInfo(str(d.get("remoteAddress", "")), str(d.get("transport", "")),
                              str(d.get("user", "")), str(d.get("keyFingerprint", "")))


ConnectionCallback = Callable[[Stream, ConnectionInfo], Any]


class Server:
    def __init__(self, endpoint: Endpoint, ws: ClientConnection, opened: dict[str, Any]) -> None:
        self._endpoint = endpoint
        self._ws = ws
        self.id: str = opened.get("id", "")
        self.addresses: list[str] = list(opened.get("addresses", []))
        self._callback: ConnectionCallback | None = None
        self._queue: asyncio.Queue[tuple[Stream, ConnectionInfo] | None] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def on_connection(self, callback: ConnectionCallback) -> None:
        self._callback = callback

    async def _run(self) -> None:
        try:
            async for raw in self._ws:
                msg = _ipc.decode(raw)
                info = msg.get("info")
                if msg["type"] == "incoming" and isinstance(msg.get("id"), str) and isinstance(info, (dict, type(None))):
                    self._spawn(self._accept(msg["id"], ConnectionInfo.from_wire(info or {})))
                elif msg["type"] == "error":
                    log.warning("wraith server %s: %s %s", self.id, msg.get("code"), msg.get("message"))
                else:
                    raise _ipc.ProtocolViolation(f"unexpected {msg['type']!r} message on a serve control")
        except (ConnectionClosed, _ipc.ProtocolViolation) as exc:
            if isinstance(exc, _ipc.ProtocolViolation):
                log.warning("wraith server %s: the daemon broke the IPC protocol: %s", self.id, exc)
                await self._ws.close(1002)
        finally:
            self._closed = True
            self._queue.put_nowait(None)

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _accept(self, in_id: str, info: ConnectionInfo) -> None:
        try:
            ws = await self._endpoint.open()
            stream = await open_stream(ws, {"type": "open", "kind": "accept", "id": in_id})
        except WraithError as exc:
            log.warning("wraith server %s: could not accept %s: %s", self.id, in_id, exc)
            return
        cb = self._callback
        if cb is not None:
            result = cb(stream, info)
            if inspect.isawaitable(result):
                await result
        else:
            self._queue.put_nowait((stream, info))

    def __aiter__(self) -> AsyncIterator[tuple[Stream, ConnectionInfo]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[Stream, ConnectionInfo]]:
        while True:
            item = await self._queue.get()
            if item is None:
                self._queue.put_nowait(None)
                return
            yield item

    async def close(self) -> None:
        """Stop the server (listener and its SSH sessions)."""
        await self._ws.close()
        try:
            await asyncio.wait_for(self._loop_task, 10)
        except (asyncio.TimeoutError, Exception):
            pass
        for t in list(self._tasks):
            t.cancel()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
