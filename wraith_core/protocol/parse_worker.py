"""Envelope frames parsed in a child process, so a big one does not stall the event loop.

Parsing 16 MiB of tiny JSON values takes about half a second; a hub shares its
event loop with every tunnel of the server. :class:`ParseWorker` sends whole
frames to a child (``python -I parse_worker.py``: the standard library and
``envelope.py`` only, no package import, no copy of the parent's ``__main__``) over its stdin and reads
one JSON answer per frame from its stdout, both length-prefixed. The child ends
when its stdin does: when the parent closes it, or dies.

The answer carries what a hub needs and no payload: the type and id, and for a
``__`` control message only ``{"type": …}`` of its payload. A frame the child
cannot answer in time, or that kills it, is a ``too-complex`` protocol error for
the member that sent it; the next frame gets a new child.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .envelope import Envelope, ProtocolError

HEADER = struct.Struct(">I")  # (envelope.HEADER: this file also runs as a script, without the package)
ANSWER_LIMIT = 64 * 1024 * 1024  # an answer is about as large as the frame's id
PARSE_TIMEOUT = 20.0  # seconds for one frame (16 MiB of the worst JSON: ~0.5 s)
FRAMES_PER_CHILD = 64  # then a new child (the old one's heap goes with it)
_HERE = os.path.dirname(os.path.abspath(__file__))


def answer(ev: Any) -> dict[str, Any]:
    """The child's answer for one parsed frame: ``parse_frame(frame, False)``'s Envelope or
    ProtocolError (told apart by their fields: the child has its own copy of the classes)."""
    if hasattr(ev, "reason"):
        return {"error": ev.reason, "message": ev.message}
    payload = None
    if ev.type.startswith("__") and isinstance(ev.payload, dict):
        t = ev.payload.get("type")
        payload = {"type": t if isinstance(t, str) and len(t) <= 4096 else 0}  # (0: not a type)
    return {"type": ev.type, "id": ev.id, "payload": payload}


def _event(reply: dict[str, Any], frame: bytes) -> Envelope | ProtocolError:
    from .envelope import Envelope, ProtocolError

    if "error" in reply:
        return ProtocolError(str(reply["error"]), str(reply.get("message", "")))
    return Envelope(reply["type"], reply["id"], reply.get("payload"), frame)


class ParseWorker:
    """One child at a time, started on first use; frames are parsed in the order given."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._parsed = 0
        self._closed = False

    async def parse(self, frame: bytes) -> Envelope | ProtocolError:
        async with self._lock:
            if self._closed:
                return _event({"error": "too-complex", "message": "the hub is closing"}, frame)
            try:
                proc = self._proc or await self._start()
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(HEADER.pack(len(frame)))
                proc.stdin.write(frame)
                async with asyncio.timeout(PARSE_TIMEOUT):
                    await proc.stdin.drain()
                    (n,) = HEADER.unpack(await proc.stdout.readexactly(HEADER.size))
                    if n > ANSWER_LIMIT:
                        raise ValueError("answer too large")
                    reply = json.loads(await proc.stdout.readexactly(n))
            except (OSError, ValueError, EOFError, asyncio.IncompleteReadError, TimeoutError):
                self._stop(kill=True)
                return _event({"error": "too-complex", "message": "the frame could not be parsed in time"}, frame)
            self._parsed += 1
            if self._parsed >= FRAMES_PER_CHILD:
                self._stop(kill=False)
            return _event(reply, frame)

    async def _start(self) -> asyncio.subprocess.Process:
        self._parsed = 0
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", os.path.join(_HERE, "parse_worker.py"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, start_new_session=True)  # (not in the terminal's Ctrl-C)
        return self._proc

    def _stop(self, kill: bool) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if kill and proc.returncode is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
        if proc.stdin is not None:
            proc.stdin.close()  # the child ends at EOF

    async def close(self) -> None:
        self._closed = True
        proc = self._proc
        self._stop(kill=False)
        if proc is not None:
            try:
                await asyncio.wait_for(proc.wait(), 2)
            except asyncio.TimeoutError:
                proc.kill()


def _serve(parse: Callable[[bytes, bool], Any]) -> None:
    """The child's loop: frames in on stdin, answers out on stdout, until stdin ends."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = inp.read(HEADER.size)
        if len(head) < HEADER.size:
            return
        (n,) = HEADER.unpack(head)
        frame = inp.read(n)
        if len(frame) < n:
            return
        data = json.dumps(answer(parse(frame, False))).encode("ascii")  # (ids may hold lone surrogates)
        out.write(HEADER.pack(len(data)) + data)
        out.flush()


if __name__ == "__main__":  # the child: envelope.py loaded by its path, no package import
    import importlib.util

    spec = importlib.util.spec_from_file_location("_wraith_envelope", os.path.join(_HERE, "envelope.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    _serve(module.parse_frame)
