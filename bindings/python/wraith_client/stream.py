"""A stream through the daemon: one WebSocket, the same API as wraith_core's DuplexStream.

::

    data = await s.read(65536)      # b"" at EOF; read(-1) reads until EOF
    await s.readexactly(4)
    s.write(b"..."); await s.drain()
    s.write_eof()                   # half-close
    s.close(); await s.wait_closed()   # or: await s.aclose()

Backpressure: the WebSocket is read only when you read (so a slow reader
slows the SSH channel on the daemon's side), and ``drain()`` waits until what
was written has gone into the socket below its high-water mark.
"""

from __future__ import annotations

import asyncio
import secrets
import struct
from collections import deque
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import apply_mask
from websockets.protocol import State

from . import _ipc
from .errors import StreamError, UsageError, WraithError

_EOF = object()
CLOSE_TIMEOUT = 10.0  # close() after our eof: the daemon takes what was written, then answers
ABORT_GRACE = 1.0  # abort(), or close() before our eof: a moment for the close frame, then the cut
SHUTTING_DOWN = 1001  # the daemon's close code when it exits (docs/ipc.md §1.2)


class Stream:
    def __init__(self, ws: ClientConnection, opened: dict[str, Any]) -> None:
        self._ws = ws
        self.id: str = opened.get("id", "")
        self.opened = opened
        self.info: dict[str, Any] = {k: v for k, v in opened.items() if k not in ("type",)}
        self._chunks: deque[bytes] = deque()
        self._eof = False
        self._exc: BaseException | None = None
        self._pending: deque[Any] = deque()
        self._flusher: asyncio.Task[None] | None = None
        self._werr: BaseException | None = None
        self._eof_sent = False
        self._closing = False
        self._closed_task: asyncio.Task[None] | None = None
        self._reading = False  # a read is waiting (one at a time, as asyncio's StreamReader)
        self._dropping = False  # closing: incoming messages are read and dropped

    # -- reading -------------------------------------------------------------------

    async def _fill(self) -> None:
        if self._dropping:  # read() after close(): nothing more is kept
            self._exc = self._exc or StreamError("stream closed", "ECLOSED")
            self._eof = True
            return
        try:
            raw = await self._ws.recv()
        except ConnectionClosed as exc:
            if not self._eof:
                self._exc = self._close_error(exc)
            self._eof = True
            return
        try:
            msg = _ipc.decode(raw)
        except _ipc.ProtocolViolation as exc:
            self._exc = StreamError(str(exc), "EPROTO")
            self._eof = True
            await self._ws.close(1002)
            return
        t = msg["type"]
        data = msg.get("data")
        if t == "data" and isinstance(data, (bytes, bytearray)):
            if data:
                self._chunks.append(bytes(data))
        elif t == "eof":
            self._eof = True
        elif t == "error":
            self._exc = StreamError(str(msg.get("message", "")), str(msg.get("code", "ECONNRESET")))
            self._eof = True
        else:  # data that is not bytes, or a message a stream does not get: never skip it quietly
            self._exc = StreamError(f"the daemon broke the IPC protocol ({t!r} message on a stream)", "EPROTO")
            self._eof = True
            await self._ws.close(1002)

    def _close_error(self, exc: ConnectionClosed) -> BaseException:
        if self._exc is not None:
            return self._exc
        if self._closing:
            return StreamError("stream closed", "ECLOSED")
        rcvd = exc.rcvd
        code = rcvd.code if rcvd is not None else None
        if code == SHUTTING_DOWN:
            return StreamError("the wraith daemon is shutting down", "EDAEMON")
        return StreamError(f"the daemon closed the stream before its end (close code {code})", "ECONNRESET")

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (``-1``: until EOF); ``b""`` at EOF; raises if the stream broke."""
        if self._reading:  # as asyncio's StreamReader: one reader at a time
            raise UsageError("read() called while another read of this stream is waiting")
        self._reading = True
        try:
            return await self._read(n)
        finally:
            self._reading = False

    async def _read(self, n: int) -> bytes:
        if n == 0:
            return b""
        if n < 0:
            parts: list[bytes] = []
            while True:
                part = await self._read(1 << 20)
                if not part:
                    return b"".join(parts)
                parts.append(part)
        while not self._chunks and not self._eof:
            await self._fill()
        if not self._chunks:
            if self._exc is not None:
                raise self._exc
            return b""
        chunk = self._chunks[0]
        if len(chunk) <= n:
            self._chunks.popleft()
            return chunk
        self._chunks[0] = chunk[n:]
        return chunk[:n]

    async def readexactly(self, n: int) -> bytes:
        if n < 0:
            raise ValueError("readexactly size can not be less than zero")
        if self._reading:
            raise UsageError("readexactly() called while another read of this stream is waiting")
        self._reading = True
        try:
            out = bytearray()
            while len(out) < n:
                part = await self._read(n - len(out))
                if not part:
                    raise asyncio.IncompleteReadError(bytes(out), n)
                out += part
            return bytes(out)
        finally:
            self._reading = False

    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> bytes:
        data = await self.read(1 << 20)
        if not data:
            raise StopAsyncIteration
        return data

    # -- writing -------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._werr is not None:
            raise self._werr
        if self._eof_sent or self._closing:
            raise StreamError("write after write_eof() or close()", "EPIPE")
        if not data:
            return
        data = bytes(data)
        for i in range(0, len(data), _ipc.SEND_CHUNK):
            self._pending.append(data[i:i + _ipc.SEND_CHUNK] if len(data) > _ipc.SEND_CHUNK else data)
        self._kick()

    def _kick(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        ws = self._ws
        try:
            while self._pending:
                item = self._pending.popleft()
                if item is _EOF:
                    await ws.send(_ipc.EOF_BYTES)
                else:
                    await send_data(ws, item)
        except ConnectionClosed as exc:
            self._pending.clear()
            shutdown = exc.rcvd is not None and exc.rcvd.code == SHUTTING_DOWN
            self._werr = self._exc or (StreamError("stream closed", "ECLOSED") if self._closing else
                                       self._close_error(exc) if shutdown else
                                       StreamError("the stream was closed by the far end", "EPIPE"))
            if not self._eof and self._exc is None and not self._closing:
                self._exc = self._close_error(exc)
        except Exception as exc:  # the socket failed under us (the daemon died: reset, broken pipe)
            # kept here, never left in the task: drain() and the next write() raise it, and
            # no "Task exception was never retrieved" if nobody drains
            self._pending.clear()
            err = StreamError(f"the connection to the wraith daemon was lost ({type(exc).__name__}: {exc})",
                              "ECONNRESET")
            self._werr = self._exc or (StreamError("stream closed", "ECLOSED") if self._closing else err)
            if not self._eof and self._exc is None and not self._closing:
                self._exc = err

    async def drain(self) -> None:
        f = self._flusher
        if f is not None:
            try:
                await asyncio.shield(f)
            except asyncio.CancelledError:
                if not f.cancelled():
                    raise  # we were cancelled, not the flusher
                # abort() stopped the flusher: the write error below says so
        if self._werr is not None:
            raise self._werr

    def write_eof(self) -> None:
        if self._eof_sent or self._closing:
            return
        self._eof_sent = True
        self._pending.append(_EOF)
        self._kick()

    def can_write_eof(self) -> bool:
        return True

    # -- closing -------------------------------------------------------------------

    def close(self) -> None:
        """Flush what was written, then close. Before EOF went both ways this aborts the channel."""
        if self._closed_task is None:
            self._closed_task = asyncio.get_running_loop().create_task(self._close())

    async def _close(self) -> None:
        f = self._flusher
        if f is not None:
            try:
                await asyncio.wait_for(asyncio.shield(f), 10)
            except (asyncio.TimeoutError, Exception):
                pass
        self._closing = True
        # after our eof the daemon lets the channel finish what we sent: give it time to take
        # it; before, the daemon aborts the channel whatever we say (docs/ipc.md §4.1)
        await self._close_ws(1000, "close", CLOSE_TIMEOUT if self._eof_sent else ABORT_GRACE)

    async def _close_ws(self, code: int, reason: str, timeout: float) -> None:
        """The WebSocket close, bounded: a daemon that stopped reading keeps our close frame
        queued behind the data it did not take — then the connection is cut. Meanwhile what
        still comes is read and dropped: the daemon's answer to our close waits behind it
        (unread data used to hold every close() of an unread download for 5 s)."""
        drop = asyncio.get_running_loop().create_task(self._drop_incoming())
        try:
            await asyncio.wait_for(self._ws.close(code, reason), timeout)
        except (asyncio.TimeoutError, Exception):
            pass
        finally:
            drop.cancel()
            if self._ws.state is not State.CLOSED:
                self._ws.transport.abort()

    async def _drop_incoming(self) -> None:
        if self._reading:
            return  # a read() is waiting: it takes the messages (and sees the close)
        self._chunks.clear()
        self._dropping = True
        try:
            while True:
                await self._ws.recv()
        except Exception:  # the close ended it
            pass

    def abort(self) -> None:
        """Drop everything and reset the channel (the far end sees a reset)."""
        self._closing = True
        self._pending.clear()
        if self._werr is None:
            self._werr = StreamError("the stream was aborted", "ECLOSED")
        if self._flusher is not None:
            self._flusher.cancel()
        if self._closed_task is None:
            self._closed_task = asyncio.get_running_loop().create_task(self._close_ws(4000, "abort", ABORT_GRACE))

    def is_closing(self) -> bool:
        return self._closing or self._closed_task is not None

    async def wait_closed(self) -> None:
        if self._closed_task is not None:
            await asyncio.shield(self._closed_task)
        await self._ws.wait_closed()

    async def aclose(self) -> None:
        self.close()
        await self.wait_closed()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.info.get(name, default)


async def send_data(ws: ClientConnection, payload: bytes) -> None:
    """One ``data`` message, masked in a single pass (websockets' send() copies it ~4 times).

    A client frame is a header, a 4-byte mask and the masked payload; the
    payload here is the msgpack header + our bytes, so mask the two parts
    separately (the mask rotates by the first part's length) and write both.
    """
    protocol = ws.protocol
    transport = ws.transport
    if protocol.state is not State.OPEN or protocol.extensions or transport.is_closing():
        await ws.send(_ipc.encode_data(payload))
        return
    mp = _ipc.data_header(len(payload))
    length = len(mp) + len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x82, 0x80 | length)
    elif length < 65536:
        head = struct.pack("!BBH", 0x82, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", 0x82, 0x80 | 127, length)
    mask = secrets.token_bytes(4)
    k = len(mp) % 4
    transport.writelines((head + mask + apply_mask(mp, mask), apply_mask(payload, mask[k:] + mask[:k])))
    await ws.drain()


DEFAULT_ANSWER_TIMEOUT = 60.0  # for an open without connectTimeout (as the Node package)


def answer_timeout(open_msg: dict[str, Any]) -> float:
    """How long to wait for the daemon's answer: the SSH connect it may have to make, plus slack."""
    options = open_msg.get("options") or {}
    connect = options.get("connectTimeout") if isinstance(options, dict) else None
    return float(connect) + 10.0 if isinstance(connect, (int, float)) else DEFAULT_ANSWER_TIMEOUT


async def open_stream(ws: ClientConnection, open_msg: dict[str, Any], timeout: float | None = None) -> Stream:
    """Send ``open`` on a fresh WebSocket and wait for ``opened`` (or raise the ``error``)."""
    wait = answer_timeout(open_msg) if timeout is None else timeout
    try:
        await ws.send(_ipc.encode(open_msg))
        try:
            raw = await asyncio.wait_for(ws.recv(), wait)
        except asyncio.TimeoutError:
            ws.transport.abort()
            raise WraithError(f"no answer from the wraith daemon within {wait:g} s", "ETIMEDOUT") from None
        msg = _ipc.decode(raw)
    except ConnectionClosed as exc:
        rcvd = exc.rcvd
        if rcvd is not None and rcvd.code == 1009:  # refused from its frame header, unread
            raise WraithError(f"the daemon refused the open message: {rcvd.reason or 'too big'} "
                              f"(at most {_ipc.MAX_CONTROL_MESSAGE} bytes)", "EPROTO") from None
        if rcvd is not None and rcvd.code == SHUTTING_DOWN:
            raise WraithError("the wraith daemon is shutting down", "EDAEMON") from None
        raise WraithError("the daemon closed the connection before answering", "EDAEMON") from None
    except _ipc.ProtocolViolation as exc:
        await ws.close(1002)
        raise WraithError(str(exc), "EPROTO") from None
    except BaseException:
        await ws.close()
        raise
    if msg["type"] == "error":
        await ws.close()
        raise WraithError(str(msg.get("message", "")), str(msg.get("code", "EDAEMON")))
    if msg["type"] != "opened":
        await ws.close(1002)
        raise WraithError(f"the daemon answered open with {msg['type']!r}", "EPROTO")
    return Stream(ws, msg)
