"""Throughput and connect latency through the daemon vs open_stream() in process, same run.

    python3 bench/bench_daemon.py [--mib 512] [--rounds 5]

Path measured: bindings/python (wraith_client) -> wraith daemon -> SSH -> wraith serve -> target,
against wraith_core.open_stream() in this process -> SSH -> wraith serve -> target.
The target is a separate process that sends N bytes (download) or counts what it gets (upload).
Connect latency: open_stream() (new session + channel) vs wraith_client.connect() with a fresh
session, and with a pooled session (the cost of a second connect). Bounded: a few seconds per round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from helpers import Keys, start_server  # noqa: E402
from test_daemon_support import start_daemon, start_target  # noqa: E402


async def _download(stream, n: int) -> float:
    t0 = time.perf_counter()
    stream.write(f"SEND {n} 1\n".encode())
    await stream.drain()
    got = 0
    while True:
        d = await stream.read(1 << 20)
        if not d:
            break
        got += len(d)
    dt = time.perf_counter() - t0
    assert got == n, (got, n)
    stream.write_eof()
    return n / dt


async def _upload(stream, n: int) -> float:
    blob = bytes(1 << 20)
    t0 = time.perf_counter()
    stream.write(f"SINK {1 << 40}\n".encode())
    left = n
    while left > 0:
        k = min(left, len(blob))
        stream.write(blob[:k])
        await stream.drain()
        left -= k
    stream.write_eof()
    reply = await stream.read()
    dt = time.perf_counter() - t0
    assert int(reply) == n, reply
    return n / dt


async def run(mib: int, rounds: int) -> None:
    import wraith_client

    import wraith_core
    from wraith_core.options import ConnectOptions

    tmp = Path(tempfile.mkdtemp(prefix="wraith-bench-"))
    keys = Keys.make(tmp / "keys")
    procs = []
    try:
        server, sport = start_server(keys, tmp)
        procs.append(server)
        target, tport = start_target(tmp)
        procs.append(target)
        daemon, info = start_daemon(tmp, linger="30")
        procs.append(daemon)
        tgt = f"127.0.0.1:{tport}"
        copts = ConnectOptions(server=f"127.0.0.1:{sport}", identity=str(keys.client),
                               host_key=str(keys.host_pub), socks5=None)
        dopts = dict(server=f"127.0.0.1:{sport}", identity=str(keys.client), host_key=str(keys.host_pub),
                     daemon=info["ws"], target=tgt)
        n = mib * 1024 * 1024
        res: dict[str, list[float]] = {k: [] for k in (
            "inproc_down", "daemon_down", "inproc_up", "daemon_up",
            "inproc_connect", "daemon_connect_fresh", "daemon_connect_pooled")}

        for _ in range(rounds):
            # in process: connect = SSH session + channel
            t0 = time.perf_counter()
            s = await wraith_core.open_stream(copts, target=tgt)
            res["inproc_connect"].append(time.perf_counter() - t0)
            res["inproc_down"].append(await _download(s, n))
            await s.wait_closed()
            s = await wraith_core.open_stream(copts, target=tgt)
            res["inproc_up"].append(await _upload(s, n))
            s.close()
            await s.wait_closed()

            # through the daemon: a fresh session (distinct keepalive value = distinct pool key)
            fresh = dict(dopts, keepalive_interval=5.0 + len(res["daemon_connect_fresh"]) / 1000)
            t0 = time.perf_counter()
            s = await wraith_client.connect(**fresh)
            res["daemon_connect_fresh"].append(time.perf_counter() - t0)
            assert s.opened["pooled"] is False
            res["daemon_down"].append(await _download(s, n))
            await s.wait_closed()
            t0 = time.perf_counter()
            s = await wraith_client.connect(**fresh)
            res["daemon_connect_pooled"].append(time.perf_counter() - t0)
            assert s.opened["pooled"] is True
            res["daemon_up"].append(await _upload(s, n))
            await s.aclose()

        def mbps(v: list[float]) -> float:
            return statistics.median(v) / 1e6

        def ms(v: list[float]) -> float:
            return statistics.median(v) * 1000

        def pair_ratio(a: str, b: str) -> float:
            # per-round ratios (each pair ran back to back) resist load drifting during the run
            return statistics.median(x / y for x, y in zip(res[a], res[b]))

        print(f"wraith daemon benchmark: {mib} MiB per transfer, {rounds} rounds, medians")
        print(f"  download  in-process open_stream : {mbps(res['inproc_down']):8.1f} MB/s")
        print(f"  download  wraith_client → daemon : {mbps(res['daemon_down']):8.1f} MB/s   "
              f"ratio {statistics.median(res['daemon_down']) / statistics.median(res['inproc_down']):.2f}")
        print(f"  upload    in-process open_stream : {mbps(res['inproc_up']):8.1f} MB/s")
        print(f"  upload    wraith_client → daemon : {mbps(res['daemon_up']):8.1f} MB/s   "
              f"ratio {statistics.median(res['daemon_up']) / statistics.median(res['inproc_up']):.2f}")
        print(f"  ratio daemon/in-process, median of per-round ratios: download "
              f"{pair_ratio('daemon_down', 'inproc_down'):.2f}, upload {pair_ratio('daemon_up', 'inproc_up'):.2f}"
              f"  (goal >= 0.8)")
        print(f"  connect   in-process open_stream (session + channel) : {ms(res['inproc_connect']):7.1f} ms")
        print(f"  connect   daemon, fresh session                      : {ms(res['daemon_connect_fresh']):7.1f} ms")
        print(f"  connect   daemon, pooled session (channel only)      : {ms(res['daemon_connect_pooled']):7.1f} ms"
              f"   ({statistics.median(res['daemon_connect_fresh']) / statistics.median(res['daemon_connect_pooled']):.1f}x faster than fresh)")
        print(f"  server log 'connection opened': {server.log().count('connection opened')}")
    finally:
        await wraith_client.shutdown()
        for p in reversed(procs):
            p.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from wraith_core import tuning

    tuning.run(run(args.mib, args.rounds))


if __name__ == "__main__":
    main()
