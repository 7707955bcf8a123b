"""Load: many streams through one SSH session, memory per stream, and RSS under churn.

Four processes each time — wraith serve, wraith connect, the echo target and the load generator
(tests/loadgen.py) — so each one stays under the per-process fd limit (20,000 here). The numbers
(peak RSS, KiB per stream) are printed; the budget asserted is generous on purpose (it catches a
leak or a per-stream buffer blow-up, not noise).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import PY, Keys, Proc, start_client, start_server

HERE = Path(__file__).resolve().parent
LOADGEN = str(HERE / "loadgen.py")

# Per-stream memory budget per process (measured: ~5-6 KiB in wraith connect and in wraith serve).
STREAM_BUDGET_KIB = 24


def status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in KiB, and the number of open fds, of one process."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(val.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


class Rig:
    def __init__(self, server: Proc, client: Proc, socks: int, target: subprocess.Popen[bytes], tport: int) -> None:
        self.server, self.client, self.socks, self.target, self.tport = server, client, socks, target, tport

    def rss(self) -> tuple[dict[str, int], dict[str, int]]:
        return status(self.client.p.pid), status(self.server.p.pid)

    def streams(self, n: int, size: int, timeout: float = 120) -> dict:
        r = subprocess.run([PY, LOADGEN, "streams", str(self.socks), str(self.tport), str(n), str(size)],
                           capture_output=True, timeout=timeout)
        assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
        return json.loads(r.stdout)


@pytest.fixture
def rig(keys: Keys, tmp_path: Path, procs: list) -> Iterator[Rig]:
    server, sport = start_server(keys, tmp_path)
    procs.append(server)
    client, socks = start_client(keys, tmp_path, sport)
    procs.append(client)
    target = subprocess.Popen([PY, LOADGEN, "target", "0"], stdout=subprocess.PIPE)
    try:
        assert target.stdout is not None
        tport = int(target.stdout.readline().split()[1])
        yield Rig(server, client, socks, target, tport)
    finally:
        target.kill()
        target.wait(5)
    for p in (client, server):
        assert "Traceback" not in p.log(), p.log()[-3000:]


def _kib(v: float) -> str:
    return f"{v / 1024:.1f} MiB" if v >= 1024 else f"{v:.1f} KiB"


@pytest.mark.timeout(90)
def test_1000_concurrent_streams_hashed(rig: Rig) -> None:
    res = rig.streams(1000, 64 * 1024)
    assert res["opened"] == 1000 and res["ok"] == 1000 and res["bad"] == 0, res
    c, s = rig.rss()
    print(f"\n1000 concurrent x 64 KiB echo: open {res['open_s']} s, transfer {res['xfer_s']} s; "
          f"peak RSS client {_kib(c['VmHWM'])}, server {_kib(s['VmHWM'])}", file=sys.stderr)


@pytest.mark.timeout(120)
def test_10000_idle_streams_memory(rig: Rig) -> None:
    n = 10_000
    rig.streams(50, 4096)  # warm-up: first channel opens allocate one-off state
    time.sleep(0.5)
    c0, s0 = rig.rss()
    gen = subprocess.Popen([PY, LOADGEN, "idle", str(rig.socks), str(rig.tport), str(n)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert gen.stdin is not None and gen.stdout is not None
    try:
        held = json.loads(gen.stdout.readline() or b"null")
        assert held is not None, gen.stderr.read().decode(errors="replace")[-3000:] if gen.poll() is not None else ""
        assert held["held"] == n, held
        c1, s1 = rig.rss()
        # every one of the 10,000 still carries bytes both ways
        gen.stdin.write(b"check\n")
        gen.stdin.flush()
        checked = json.loads(gen.stdout.readline())
        assert checked["ok"] == n, checked
        # ... and a fresh transfer works while they are all open
        extra = rig.streams(20, 256 * 1024)
        assert extra["ok"] == 20, extra
        c2, s2 = rig.rss()
        gen.stdin.write(b"quit\n")
        gen.stdin.flush()
        gen.wait(30)
    finally:
        if gen.poll() is None:
            gen.kill()
            gen.wait(5)
    per_c = (c1["VmRSS"] - c0["VmRSS"]) / n
    per_s = (s1["VmRSS"] - s0["VmRSS"]) / n
    print(f"\n{n} idle streams opened in {held['open_s']} s, re-checked in {checked['check_s']} s; "
          f"client RSS {_kib(c0['VmRSS'])} -> {_kib(c1['VmRSS'])} ({per_c:.1f} KiB/stream, peak {_kib(c2['VmHWM'])}), "
          f"server RSS {_kib(s0['VmRSS'])} -> {_kib(s1['VmRSS'])} ({per_s:.1f} KiB/stream, peak {_kib(s2['VmHWM'])})",
          file=sys.stderr)
    assert per_c < STREAM_BUDGET_KIB and per_s < STREAM_BUDGET_KIB, (per_c, per_s)
    # once the load generator is gone, every socket of those streams is released on both sides
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        c3, s3 = rig.rss()
        if c3["fds"] <= c0["fds"] + 20 and s3["fds"] <= s0["fds"] + 20:
            break
        time.sleep(0.2)
    assert c3["fds"] <= c0["fds"] + 20 and s3["fds"] <= s0["fds"] + 20, (c0, c3, s0, s3)
    after = rig.streams(10, 64 * 1024)
    assert after["ok"] == 10, after


@pytest.mark.timeout(90)
def test_churn_soak_rss_flat(rig: Rig) -> None:
    seconds, warm = 40.0, 10.0
    # every 5th stream is reset by the client part-way (the relay's abort path must not leak either)
    gen = subprocess.Popen([PY, LOADGEN, "churn", str(rig.socks), str(rig.tport), str(seconds), "40", str(32 * 1024), "5"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    c0, s0 = rig.rss()
    samples: list[tuple[float, int, int]] = []
    t0 = time.monotonic()
    try:
        while gen.poll() is None and time.monotonic() - t0 < seconds + 30:
            c, s = rig.rss()
            samples.append((time.monotonic() - t0, c["VmRSS"], s["VmRSS"]))
            time.sleep(1.0)
        out, err = gen.communicate(timeout=30)
    finally:
        if gen.poll() is None:
            gen.kill()
            gen.wait(5)
    res = json.loads(out)
    assert res["done"] > 1000 and res["bad"] == 0 and res["aborted"] > 200, (res, err.decode(errors="replace")[-2000:])
    warm_c = max(c for t, c, _ in samples if t <= warm)
    warm_s = max(s for t, _, s in samples if t <= warm)
    end_c, end_s = samples[-1][1], samples[-1][2]
    c1, s1 = rig.rss()
    print(f"\nchurn {seconds:.0f} s x 40 workers: {res['done']} streams ({res['done'] / seconds:.0f}/s) "
          f"+ {res['aborted']} reset part-way; "
          f"client RSS start {_kib(c0['VmRSS'])}, after warm-up {_kib(warm_c)}, end {_kib(end_c)}; "
          f"server RSS start {_kib(s0['VmRSS'])}, after warm-up {_kib(warm_s)}, end {_kib(end_s)}; "
          f"fds client {c0['fds']}->{c1['fds']} server {s0['fds']}->{s1['fds']}", file=sys.stderr)
    # flat: no more than 20 % + 8 MiB above the post-warm-up level after ~4x as many streams
    assert end_c <= warm_c * 1.2 + 8192, (warm_c, end_c, samples)
    assert end_s <= warm_s * 1.2 + 8192, (warm_s, end_s, samples)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (c1["fds"] <= c0["fds"] + 20 and s1["fds"] <= s0["fds"] + 20):
        time.sleep(0.2)
        c1, s1 = rig.rss()
    assert c1["fds"] <= c0["fds"] + 20 and s1["fds"] <= s0["fds"] + 20, (c0, c1, s0, s1)
