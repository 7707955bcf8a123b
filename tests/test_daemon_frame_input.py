"""The chunked input buffer for websockets' frame reader (protocol/frame_input.py), used by the
daemon and the Python client:
the same bytes as websockets' own bytearray for every operation, and whole frames (masked,
split anywhere, with control frames between) parsed exactly as before."""

from __future__ import annotations

import os
import random

from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from wraith_core.protocol.frame_input import FrameInput, chunked_frame_input

# (operation, size): 0 append n random bytes, 1 take n from the front, 2 take all, 3 find
OPS = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 300) | st.integers(3000, 9000)), max_size=80)


@settings(max_examples=300, deadline=None)
@given(initial=st.binary(max_size=20), ops=OPS)
def test_same_as_bytearray(initial: bytes, ops: list[tuple[int, int]]) -> None:
    ref, buf = bytearray(initial), FrameInput(initial)
    for op, n in ops:
        if op == 0:
            data = os.urandom(n)
            ref += data
            buf += data
        elif op == 1:
            assert buf[:n] == bytes(ref[:n])
            del ref[:n]
            del buf[:n]
        elif op == 2:
            assert buf[:] == bytes(ref)
            del ref[:]
            del buf[:]
        else:
            assert buf.find(b"\n", n % 7) == ref.find(b"\n", n % 7)
        assert len(buf) == len(ref) and bool(buf) == bool(ref)


def test_a_dripping_peer_costs_no_more_than_its_bytes() -> None:
    """1-byte reads join the last chunk (a chunk per byte would cost ~40 bytes per byte)."""
    buf, ref = FrameInput(), bytearray()
    for i in range(100_000):
        b = bytes([i & 0xFF])
        buf += b
        ref += b
    assert len(buf.chunks) <= 100_000 // 4096 + 1
    buf += os.urandom(70_000)  # a big read stays its own chunk
    buf += b"x"
    assert len(buf.chunks) <= 100_000 // 4096 + 3
    assert buf[:100_000] == bytes(ref)


def _parser(chunked: bool) -> ServerProtocol:
    p = ServerProtocol(max_size=None)
    p.state = State.OPEN  # past the handshake: frames from here on
    p.parser = p.parse()
    if chunked:
        p.reader.buffer = FrameInput(p.reader.buffer)  # type: ignore[assignment]
    next(p.parser)
    return p


def test_frames_split_anywhere_parse_the_same() -> None:
    rng = random.Random(7)
    frames = []
    for size in (0, 1, 125, 126, 65535, 65536, 300_000, 1 << 20):
        frames.append(Frame(Opcode.BINARY, os.urandom(size)))
        frames.append(Frame(Opcode.PING, os.urandom(rng.randint(0, 125))))
    wire = b"".join(f.serialize(mask=True, extensions=[]) for f in frames)
    results = []
    for chunked in (False, True):
        p, at, got = _parser(chunked), 0, []
        while at < len(wire):
            step = rng.choice((1, 2, 3, 7, 100, 4096, 65536, 262144))
            p.receive_data(wire[at:at + step])
            at += step
            got += [(f.opcode, f.data) for f in p.events_received()]
        assert p.parser_exc is None
        results.append(got)
    assert results[0] == results[1] == [(f.opcode, f.data) for f in frames]


async def test_installed_on_a_real_connection() -> None:
    """On websockets' asyncio server connection (what the daemon gets), the swap happens
    and messages still arrive whole."""
    import asyncio

    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve

    seen: list[object] = []

    async def handler(ws) -> None:  # type: ignore[no-untyped-def]
        chunked_frame_input(ws)
        seen.append(type(ws.protocol.reader.buffer))
        async for msg in ws:
            await ws.send(str(len(msg)))

    async with serve(handler, "127.0.0.1", 0, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", max_size=None) as client:
            for size in (1, 70_000, 3 << 20):
                await client.send(os.urandom(size))
                assert await asyncio.wait_for(client.recv(), 10) == str(size)
    assert seen == [FrameInput]
