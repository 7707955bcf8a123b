"""End-to-end backpressure through the daemon: a slow consumer slows the SSH channel, memory stays flat.

1 GiB flows from a fast target to a reader that first stalls, then reads at a
limited rate; the daemon's (and the server's) RSS must stay bounded while it
does. The other way, a fast writer into a slow target must block in drain()
instead of filling the daemon.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import pytest
import wraith_client

from helpers import Keys
from test_daemon_support import expected_sha, rss_kib, start_env

GIB = 1024 * 1024 * 1024
# against the ~700 MB that piled up before ChannelStream (and the 1 GiB without any backpressure)
RSS_BUDGET_KIB = 64 * 1024


class RssSampler:
    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak = {k: 0 for k in pids}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for k, pid in self.pids.items():
                try:
                    self.peak[k] = max(self.peak[k], rss_kib(pid))
                except OSError:
                    pass
            time.sleep(0.05)

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


@pytest.fixture
def env(keys: Keys, tmp_path, procs):
    return start_env(keys, tmp_path, procs)


async def test_slow_reader_1gib_keeps_daemon_memory_bounded(env) -> None:
    dpid, spid = env["daemon"].p.pid, env["server"].p.pid
    s = await wraith_client.connect(**dict(env["opts"], target=f"127.0.0.1:{env['tport']}"))
    s.write(b"SEND %d 11\n" % GIB)
    await s.drain()
    h = hashlib.sha256()
    first = await s.readexactly(1 << 20)
    h.update(first)
    got = len(first)
    base = {"daemon": rss_kib(dpid), "server": rss_kib(spid)}
    t0 = time.monotonic()
    with RssSampler({"daemon": dpid, "server": spid}) as rss:
        # phase 1: the reader stalls; the target keeps trying to send as fast as it can
        await asyncio.sleep(3.0)
        stalled_growth = rss.peak["daemon"] - base["daemon"]
        # phase 2: a reader slower than the producer (~1 MiB every 4 ms ≈ 250 MB/s at most)
        while True:
            d = await s.read(1 << 20)
            if not d:
                break
            h.update(d)
            got += len(d)
            await asyncio.sleep(0.004)
    elapsed = time.monotonic() - t0
    s.write_eof()
    await s.wait_closed()
    assert got == GIB and h.hexdigest() == expected_sha(GIB, 11)
    assert stalled_growth < RSS_BUDGET_KIB, f"daemon grew {stalled_growth} KiB while the reader stalled"
    for name in ("daemon", "server"):
        growth = rss.peak[name] - base[name]
        assert growth < RSS_BUDGET_KIB, f"{name} RSS grew by {growth} KiB (base {base[name]} KiB)"
    assert elapsed < 70, f"1 GiB took {elapsed:.1f} s"


async def _upload_to_slow_target(env) -> dict:
    dpid, spid = env["daemon"].p.pid, env["server"].p.pid
    s = await wraith_client.connect(**dict(env["opts"], target=f"127.0.0.1:{env['tport']}"))
    rate = 40 * 1024 * 1024  # the target reads 40 MiB/s
    s.write(b"SINK %d\n" % rate)
    await s.drain()
    base = {"daemon": rss_kib(dpid), "server": rss_kib(spid)}
    total = 256 * 1024 * 1024
    blob = bytes(1 << 20)
    t0 = time.monotonic()
    with RssSampler({"daemon": dpid, "server": spid}) as rss:
        for _ in range(total // len(blob)):
            s.write(blob)
            await s.drain()
        wrote = time.monotonic() - t0
        s.write_eof()
        count = int(await s.read())
    await s.wait_closed()
    assert count == total
    return {"wrote": wrote, "min_time": 0.6 * total / rate,
            "daemon": rss.peak["daemon"] - base["daemon"], "server": rss.peak["server"] - base["server"]}


async def test_fast_writer_slow_target_pushes_back_end_to_end(env) -> None:
    r = await _upload_to_slow_target(env)
    assert r["daemon"] < RSS_BUDGET_KIB, r
    assert r["server"] < RSS_BUDGET_KIB, r
    # the writer was held back to about the target's pace (nothing buffered the upload)
    assert r["wrote"] > r["min_time"], r
