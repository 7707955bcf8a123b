"""Two wraith peers under heavy load both ways, many channels, over a slow link.

Each end's SSH send buffer then holds far more than the relays' own marks (window
adjustments flush every channel's queued bytes at once). An end that stopped reading its
peer while that buffer was large would wait for a peer doing the same: both directions
stalled for good (measured with a 16 MiB read stop: throughput 0 after ~8 s, the session
lost to keepalive). Both directions must keep moving, and the session must stay up."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import pytest

from helpers import Keys, Proc, start_server, wait_for_log, wraith

STREAMS = 64
RATE = 5_000_000  # bytes/s each way on the link between the two peers
INTERVAL = 2.0
INTERVALS = 8
CHUNK = 64 * 1024
BLOB = os.urandom(CHUNK)


async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Forward at most RATE bytes/s (a slow link), reading only after the last write drained."""
    loop = asyncio.get_running_loop()
    t0, sent = loop.time(), 0
    try:
        while data := await r.read(CHUNK):
            w.write(data)
            sent += len(data)
            await w.drain()
            ahead = sent / RATE - (loop.time() - t0)
            if ahead > 0:
                await asyncio.sleep(ahead)
        w.write_eof()
    except (ConnectionError, OSError):
        pass


async def _source_sink(r: asyncio.StreamReader, w: asyncio.StreamWriter, counter: list[int]) -> None:
    async def source() -> None:
        while True:
            w.write(BLOB)
            await w.drain()

    async def sink() -> None:
        while data := await r.read(1 << 18):
            counter[0] += len(data)

    try:
        await asyncio.gather(source(), sink())
    except (ConnectionError, OSError):
        pass


@pytest.mark.timeout(90)
async def test_both_directions_keep_moving_over_a_slow_link(keys: Keys, tmp_path: Path, procs: list) -> None:
    server, sport = start_server(keys, tmp_path)
    procs.append(server)

    async def link(r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
        r2, w2 = await asyncio.open_connection("127.0.0.1", sport)
        await asyncio.gather(_pipe(r1, w2), _pipe(r2, w1))
        w1.close()
        w2.close()

    proxy = await asyncio.start_server(link, "127.0.0.1", 0)
    pport = proxy.sockets[0].getsockname()[1]
    client = Proc(wraith("connect", "--server", f"127.0.0.1:{pport}", "--identity", str(keys.client),
                         "--host-key", str(keys.host_pub), "--socks5", "127.0.0.1:0"),
                  tmp_path / "connect.log", ready=r"socks5 listening .*:(\d+)$")
    procs.append(client)
    assert client.match is not None
    socks = int(client.match.group(1))
    await asyncio.to_thread(wait_for_log, client, "session up")  # (the link runs on this loop)
    down, up = [0], [0]  # bytes the SOCKS clients / the targets received
    target = await asyncio.start_server(lambda r, w: _source_sink(r, w, up), "127.0.0.1", 0)
    tport = target.sockets[0].getsockname()[1]

    async def stream() -> None:
        r, w = await asyncio.open_connection("127.0.0.1", socks)
        w.write(b"\x05\x01\x00")
        await r.readexactly(2)
        w.write(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + struct.pack(">H", tport))
        assert (await r.readexactly(10))[1] == 0
        await _source_sink(r, w, down)

    tasks = [asyncio.create_task(stream()) for _ in range(STREAMS)]
    moved: list[tuple[int, int]] = []
    try:
        for _ in range(INTERVALS):
            before = (down[0], up[0])
            await asyncio.sleep(INTERVAL)
            moved.append((down[0] - before[0], up[0] - before[1]))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        target.close()
        proxy.close()
    assert all(d > 0 and u > 0 for d, u in moved[1:]), f"a direction stalled (bytes per {INTERVAL} s): {moved}"
    assert "session lost" not in client.log()
