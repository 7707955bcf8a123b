"""The public duplex stream: one object to read and write a channel or socket.

``DuplexStream`` is a protocol (usable for an asyncssh channel session or an
asyncio socket) with a reader/writer API in one object::

    data = await s.read(65536)      # b"" at EOF; read(-1) reads until EOF
    await s.readexactly(4)
    s.write(b"..."); await s.drain()
    s.write_eof()                   # half-close
    s.close(); await s.wait_closed()

Receive buffering is bounded: past ``limit`` bytes the transport's reading is
paused (for a channel that stops window updates, so the sender slows down).
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any

from .ssh.backlog import Backlog, backlog_of

DEFAULT_LIMIT = 1024 * 1024


class StreamClosedError(ConnectionError):
    pass


class DuplexStream:
    def __init__(self, limit: int = DEFAULT_LIMIT, info: dict[str, Any] | None = None) -> None:
        self._limit = limit
        self._buf = bytearray()
        self._eof = False
        self._exc: BaseException | None = None
        self._transport: Any = None
        self._read_paused = False
        self._resuming = False
        self._write_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._backlog: Backlog | None = None  # the SSH connection's send buffer (ssh/backlog.py)
        self._backlog_wait = False
        self._closed = asyncio.get_running_loop().create_future()
        self._local_close = False
        self.info: dict[str, Any] = dict(info or {})

    # -- protocol side --------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        conn = getattr(transport, "_conn", None)  # an asyncssh channel: its SSH connection
        if conn is not None and hasattr(conn, "__dict__") and getattr(conn, "_transport", None) is not None:
            self._backlog = backlog_of(conn)

    def session_started(self) -> None:  # asyncssh SSHSession interface
        pass

    def data_received(self, data: bytes, datatype: Any = None) -> None:
        self._buf += data
        self._wake_reader()
        if (not self._read_paused and not self._resuming and len(self._buf) > self._limit
                and self._transport is not None):
            self._read_paused = True
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        return True

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drainers()

    def connection_lost(self, exc: BaseException | None) -> None:
        if exc is not None:
            # an SSH session that dropped (asyncssh's ConnectionLost, DisconnectError) is a
            # reset for the stream's user, as a socket's would be: a ConnectionError
            self._exc = exc if isinstance(exc, OSError) else ConnectionResetError(
                errno.ECONNRESET, f"connection lost: {exc}")
        elif not self._eof and not self._local_close:
            self._exc = ConnectionResetError("stream closed by peer before EOF")
        self._eof = True
        self._wake_reader()
        self._write_paused = False
        self._wake_drainers()
        if not self._closed.done():
            self._closed.set_result(None)

    def _wake_reader(self) -> None:
        w = self._read_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _maybe_resume(self) -> None:
        if self._read_paused and len(self._buf) <= self._limit // 2 and self._transport is not None:
            self._read_paused = False
            # asyncssh (2.x) flushes its paused receive buffer inside resume_reading() and, on
            # delivering the first packet, re-opens the WHOLE window - including the packets still
            # buffered. Pausing again in the middle of that flush would leave them buffered while
            # the peer sends another window's worth: the buffer would grow by a window per cycle,
            # without bound. So take everything it flushes (at most one window), then pause.
            self._resuming = True
            try:
                self._transport.resume_reading()
            finally:
                self._resuming = False
            if len(self._buf) > self._limit and not self._read_paused:
                self._read_paused = True
                self._transport.pause_reading()

    # -- reading --------------------------------------------------------------

    async def _wait_data(self) -> None:
        if self._buf or self._eof:
            return
        if self._read_waiter is not None:  # as asyncio's StreamReader: one reader at a time
            raise RuntimeError("read() called while another coroutine is already waiting for data")
        self._read_waiter = asyncio.get_running_loop().create_future()
        try:
            await self._read_waiter
        finally:
            self._read_waiter = None

    async def read(self, n: int = -1) -> bytes:
        """Read up to ``n`` bytes (``-1``: until EOF). ``b""`` means EOF."""
        if n == 0:
            return b""
        if n < 0:
            chunks = bytearray()
            while True:
                part = await self.read(self._limit)
                if not part:
                    return bytes(chunks)
                chunks += part
        await self._wait_data()
        if not self._buf:
            if self._exc is not None:
                raise self._exc
            return b""
        data = bytes(self._buf[:n])
        del self._buf[:n]
        self._maybe_resume()
        return data

    async def readexactly(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            part = await self.read(n - len(out))
            if not part:
                raise asyncio.IncompleteReadError(bytes(out), n)
            out += part
        return bytes(out)

    def at_eof(self) -> bool:
        return self._eof and not self._buf

    # -- writing --------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._transport is None or self._closed.done():
            raise StreamClosedError("stream is closed")
        self._transport.write(bytes(data) if not isinstance(data, bytes) else data)

    async def drain(self) -> None:
        """Wait while the channel cannot take more: its window is used up, or the SSH
        connection's own send buffer is full (the peer or the network is slower)."""
        if self._exc is not None:
            raise self._exc
        if self._closed.done():
            raise StreamClosedError("stream is closed")
        while True:
            backlog = self._backlog
            full = backlog is not None and backlog.full
            if not self._write_paused and not full:
                return
            if full and not self._backlog_wait:
                assert backlog is not None
                self._backlog_wait = True
                backlog.waiting.append(self)
            fut = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(fut)
            await fut
            if self._exc is not None:
                raise self._exc
            if self._closed.done():
                return

    def backlog_cleared(self) -> None:
        """The SSH connection's send buffer has drained (ssh/backlog.py)."""
        self._backlog_wait = False
        self._wake_drainers()

    def write_eof(self) -> None:
        if self._transport is not None and not self._closed.done():
            self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self._local_close = True
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self._local_close = True
        if self._transport is not None:
            self._transport.abort()

    def is_closing(self) -> bool:
        return self._closed.done() or (self._transport is not None and self._transport.is_closing())

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in self.info:
            return self.info[name]
        if self._transport is not None:
            return self._transport.get_extra_info(name, default)
        return default

    async def __aenter__(self) -> DuplexStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()

    def __aiter__(self) -> DuplexStream:
        return self

    async def __anext__(self) -> bytes:
        data = await self.read(65536)
        if not data:
            raise StopAsyncIteration
        return data
