"""What one WebSocket may make the daemon hold: message size limits and a daemon-wide budget.

websockets reads a frame whole before handing it over, and a ``data`` message
may be 16 MiB. Left alone, every client could make the daemon hold a few of
them (measured: 48 MiB per stream whose target stalls, 1 GiB for 20; 16 MiB
per WebSocket that sends only the start of a first frame). So:

* before a stream is open, a message may be at most the control limit (1 MiB):
  a larger frame is refused from its header, before its payload is read;
* frames up to what the bindings send (1 MiB of data) stay a per-stream cost,
  bounded by websockets' receive queue;
* a larger frame is admitted only within a budget shared by every WebSocket:
  it is reserved when the frame's header announces its size — before its
  payload is read — and returned once the daemon is done with its message
  (the message handed to the channel, or the WebSocket gone). Until there is
  room, that WebSocket is not read (its client's writes block, as under any
  backpressure); everyone sending ordinary messages keeps going;
* a WebSocket that waits for room while it holds some (the start of a fragmented
  message, say) is closed after ``HELD_WAIT`` seconds: WebSockets holding the
  whole budget in first fragments, each waiting for room for its next one, would
  otherwise wait for each other for good — and, not being read, never notice
  their clients going away, so their room would never come back.

The hooks are websockets' reader (``read_exact``) and its receive queue
(``Assembler.put`` / ``pause`` / ``resume``), as frame_input hooks the input
buffer. When they are not what this expects, the WebSocket keeps the size
limits but gets no budget (as before).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Generator
from typing import Any

from ..protocol import ipc

log = logging.getLogger("wraith.daemon")

LARGE_BUDGET = 64 * 1024 * 1024  # all WebSockets' frames above their free size, together
OPEN_FREE = 64 * 1024  # before `open` is answered: an open with inline keys fits
DATA_FREE = ipc.DATA_CHUNK + 64  # a stream: what the bindings send (1 MiB of data + its header)

HELD_WAIT = 15.0  # seconds a WebSocket that holds room may wait for more before it is closed

_DATA_OPCODES = (0, 1, 2)  # continuation, text, binary (control frames are never queued)


class InputBudget:
    """Bytes of large frames all WebSockets hold, at most ``limit`` (first come, first served)."""

    def __init__(self, limit: int = LARGE_BUDGET) -> None:
        self.limit = limit
        self.used = 0
        self._waiting: collections.deque[InputGate] = collections.deque()

    def take(self, gate: InputGate, n: int) -> bool:
        """Reserve ``n`` for ``gate`` now, or queue it (``gate.granted`` is called later)."""
        if not self._waiting and self._fits(n):
            self.used += n
            return True
        self._waiting.append(gate)
        return False

    def _fits(self, n: int) -> bool:
        # an empty budget admits anything (a frame can never be larger than the whole
        # budget, but if it were it must not wait forever)
        return self.used == 0 or self.used + n <= self.limit

    def give(self, n: int) -> None:
        self.used -= n
        self._grant()

    def forget(self, gate: InputGate) -> None:
        try:
            self._waiting.remove(gate)
        except ValueError:
            return
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self._fits(self._waiting[0].wanted):
            gate = self._waiting.popleft()
            self.used += gate.wanted
            gate.granted()


class InputGate:
    """One WebSocket's reservations. ``consumed()`` after each message the daemon is done with;
    ``close()`` when the WebSocket is gone."""

    def __init__(self, ws: Any, budget: InputBudget, free: int = OPEN_FREE) -> None:
        self.ws = ws
        self.budget = budget
        self.free = free  # frames up to this size need no reservation
        self.held = 0  # reserved, not yet given back
        self.wanted = 0  # the size of the frame waiting for room (0: none)
        self._frames: collections.deque[int] = collections.deque()  # reserved, not yet queued
        self._message = 0  # reservations of the message being assembled
        self._messages: collections.deque[int] = collections.deque()  # per queued message
        self._paused_by: set[str] = set()
        self._closed = False
        protocol = ws.protocol
        self._reader = protocol.reader
        self._read_exact: Callable[[int], Generator[None, None, Any]] = protocol.reader.read_exact
        self._queue = ws.recv_messages
        self._put: Callable[[Any], None] = ws.recv_messages.put
        if ws.recv_messages.paused:
            self._paused_by.add("queue")

    def install(self) -> None:
        self._reader.read_exact = self._gated_read_exact
        self._queue.put = self._put_frame
        self._queue.pause = lambda: self._pause("queue")
        self._queue.resume = lambda: self._resume("queue")

    # -- websockets' side --------------------------------------------------------------

    def _gated_read_exact(self, n: int) -> Generator[None, None, Any]:
        # the parser reads a frame's payload with one read_exact(length), after its header
        # (at most 8 bytes at a time): only a payload read is ever above ``free``
        if n > self.free and not self._closed:
            self.wanted = n
            if self.budget.take(self, n):
                self._admit()
            else:
                self._pause("budget")
                timer = (asyncio.get_running_loop().call_later(HELD_WAIT, self._give_up)
                         if self.held else None)
                try:
                    while self.wanted and not self._reader.eof:
                        yield
                finally:
                    if timer is not None:
                        timer.cancel()
                if self.wanted:  # the connection ended while waiting: the read fails below
                    self.budget.forget(self)
                    self.wanted = 0
        return (yield from self._read_exact(n))

    def _give_up(self) -> None:
        """Holding room, it waited ``HELD_WAIT`` for more: closed, so its room comes back."""
        if self.wanted and not self._closed:
            log.debug("ipc: a connection holding input budget waited too long for more; closed")
            self.ws.transport.abort()

    def granted(self) -> None:
        """Called by the budget: the waiting frame has its room."""
        self._admit()
        self._resume("budget")
        # the parser waits for a call to go on (its bytes may all be here already)
        asyncio.get_running_loop().call_soon(self._kick)

    def _admit(self) -> None:
        self.held += self.wanted
        self._frames.append(self.wanted)
        self.wanted = 0

    def _kick(self) -> None:
        if self._closed or self._reader.eof or self.ws.transport.is_closing():
            return
        self.ws.data_received(b"")

    def _put_frame(self, frame: Any) -> None:
        if int(frame.opcode) in _DATA_OPCODES:
            # frames arrive here in the order they were read; a reserved one is the oldest
            # reservation. (Sizes cannot be confused: ``free`` only grows, so a frame read
            # without a reservation is smaller than every reservation made before or after it.)
            if self._frames and self._frames[0] == len(frame.data):
                self._message += self._frames.popleft()
            if frame.fin:
                self._messages.append(self._message)
                self._message = 0
        self._put(frame)

    def _pause(self, why: str) -> None:
        if not self._paused_by:
            self.ws.transport.pause_reading()
        self._paused_by.add(why)

    def _resume(self, why: str) -> None:
        self._paused_by.discard(why)
        if not self._paused_by:
            self.ws.transport.resume_reading()

    # -- the daemon's side ---------------------------------------------------------------

    def consumed(self) -> None:
        """The daemon is done with the oldest message it received: give back its room."""
        n = self._messages.popleft() if self._messages else 0
        if n:
            self.held -= n
            self.budget.give(n)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.budget.forget(self)
        self.wanted = 0
        held, self.held = self.held, 0
        self._frames.clear()
        self._messages.clear()
        if held:
            self.budget.give(held)


def set_max_message(ws: Any, size: int) -> None:
    """The largest message ``ws`` may receive from now on (websockets reads it per frame, when
    the frame's first byte arrives, so a client that waits for ``opened`` gets the new one)."""
    protocol = ws.protocol
    if hasattr(protocol, "max_message_size"):  # websockets >= 15
        protocol.max_message_size = size
    else:  # pragma: no cover - older websockets
        protocol.max_size = size


def install(ws: Any, budget: InputBudget | None) -> InputGate | None:
    """Gate ``ws``'s large frames through ``budget``; None if websockets is not as expected."""
    from websockets.streams import StreamReader

    set_max_message(ws, ipc.MAX_CONTROL_MESSAGE)
    if budget is None:
        return None
    reader = getattr(getattr(ws, "protocol", None), "reader", None)
    queue = getattr(ws, "recv_messages", None)
    if (not isinstance(reader, StreamReader) or queue is None
            or not all(hasattr(queue, a) for a in ("put", "pause", "resume", "paused"))):
        log.debug("ipc: websockets internals differ; no input budget on this connection")
        return None
    gate = InputGate(ws, budget)
    gate.install()
    return gate


def open_stream(ws: Any, gate: InputGate | None) -> None:
    """A connect/accept stream is open: data messages of up to 16 MiB, 1 MiB ones free."""
    if gate is not None:
        gate.free = DATA_FREE
    set_max_message(ws, ipc.MAX_MESSAGE)
