# Vendored from wraith_core/protocol/frame_input.py by bindings/python/sync_vendor.py — edit the original.
"""websockets' frame input, kept as the chunks the socket delivered.

websockets' ``StreamReader`` keeps its input in a bytearray: every byte is
copied in, the buffer grows by reallocation (a 1 MiB message arrives in
several reads) and every frame is copied out again. For a process that
moves bulk data over a WebSocket (the daemon's uploads, the client's
downloads) that was ~15 % of its CPU; ``FrameInput`` keeps the chunks and
joins a frame's bytes once, when the parser takes them (a 1 MiB masked
frame: 206 → 73 µs). It supports exactly what ``StreamReader`` does with
its buffer; ``chunked_frame_input`` swaps it in on an open connection and
leaves the connection alone if websockets' reader is not what this expects.
Needs nothing but websockets, so the Python client carries a copy
(``bindings/python/sync_vendor.py``).
"""

from __future__ import annotations

import collections
from typing import Any


SMALL = 4096  # reads shorter than this are joined to a short last chunk


class FrameInput:
    """A bytes buffer made of whole chunks: ``+=``, ``len``, truth, ``[:n]``, ``[:]``,
    ``del [:n]``, ``del [:]`` and ``find``, as websockets' reader uses a bytearray."""

    __slots__ = ("chunks", "offset", "size")

    def __init__(self, initial: bytes | bytearray = b"") -> None:
        self.chunks: collections.deque[bytes] = collections.deque()
        self.offset = 0  # bytes of chunks[0] already taken
        self.size = 0  # bytes not yet taken
        self += initial

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return self.size > 0

    def __iadd__(self, data: bytes | bytearray) -> FrameInput:
        if data:
            chunks = self.chunks
            if chunks and len(data) < SMALL and len(chunks[-1]) < SMALL:
                # small reads (a peer dripping bytes) join the last chunk: a chunk costs
                # ~40 bytes of bookkeeping, so 1-byte chunks would cost 40x the data
                chunks[-1] += data
            else:
                chunks.append(data if type(data) is bytes else bytes(data))
            self.size += len(data)
        return self

    def _end(self, key: slice) -> int:
        if key.start not in (None, 0) or key.step not in (None, 1):
            raise TypeError("only slices from the start")
        return self.size if key.stop is None else max(0, min(key.stop, self.size))

    def __getitem__(self, key: slice) -> bytes:
        n = self._end(key)
        if n == 0:
            return b""
        chunks, offset = self.chunks, self.offset
        first = chunks[0]
        if len(first) - offset >= n:
            return first if (offset == 0 and len(first) == n) else first[offset:offset + n]
        out, left = [first[offset:]], n - (len(first) - offset)
        for i in range(1, len(chunks)):
            chunk = chunks[i]
            if len(chunk) >= left:
                out.append(chunk if len(chunk) == left else chunk[:left])
                break
            out.append(chunk)
            left -= len(chunk)
        return b"".join(out)

    def __delitem__(self, key: slice) -> None:
        left = self._end(key)
        self.size -= left
        chunks = self.chunks
        while left:
            avail = len(chunks[0]) - self.offset
            if avail <= left:
                chunks.popleft()
                self.offset = 0
                left -= avail
            else:
                self.offset += left
                left = 0

    def find(self, sub: bytes, start: int = 0) -> int:
        return self[:].find(sub, start)  # only HTTP lines use it: not on the hot path


def chunked_frame_input(ws: Any) -> None:
    """Give an open websockets connection (server or client side) a ``FrameInput``."""
    from websockets.streams import StreamReader

    reader = getattr(getattr(ws, "protocol", None), "reader", None)
    if type(reader) is StreamReader and type(getattr(reader, "buffer", None)) is bytearray:
        reader.buffer = FrameInput(reader.buffer)  # type: ignore[assignment]
