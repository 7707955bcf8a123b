"""Benchmark wraith-tun against SOCKS5 directly, through the same `wraith connect` in the same run.

    python bench/bench_tun.py [--size-mb 64] [--runs 5] [--latency-runs 30] [--flows 1000] [--mtu N]

Needs root (it builds two network namespaces: a client running `wraith connect`
and `wraith-tun --setup`, and a server running `wraith serve` and an HTTP test
host). Reports medians of curl download/upload throughput and request latency
through the TUN vs through `curl --socks5-hostname`, their ratios, and how many
flows the shim holds with how much memory per flow. Bounded: about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "tun"))

from netenv import HTTP_ADDR, HTTP_PORT, SERVICE_ADDR, TestNet, ensure_tools, wraith_tun_cmd  # noqa: E402

URL = f"http://{HTTP_ADDR}:{HTTP_PORT}"


def curl(net: TestNet, *args: str, timeout: float = 60) -> dict[str, float]:
    fmt = '{"down":%{speed_download},"up":%{speed_upload},"total":%{time_total},"ready":%{time_pretransfer},"ttfb":%{time_starttransfer},"code":%{http_code}}'
    r = net.run(net.client, "curl", "-sS", "-o", "/dev/null", "-w", fmt, *args, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"curl {' '.join(args)} failed: {r.stderr.decode().strip()}")
    out = json.loads(r.stdout)
    if out["code"] != 200:
        raise RuntimeError(f"curl {' '.join(args)}: HTTP {out['code']}")
    return out


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def hold_flows(net: TestNet, shim_pid: int, flows: int) -> dict[str, float]:
    code = f"""
import resource, socket, sys, time
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
socks = []
t = time.monotonic()
for i in range({flows}):
    socks.append(socket.create_connection(("{HTTP_ADDR}", {HTTP_PORT + 1}), timeout=10))
print(time.monotonic() - t, flush=True)
sys.stdin.readline()
"""
    before = rss_kib(shim_pid)
    p = net.start(net.client, sys.executable, "-c", code, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdin is not None
    line = p.stdout.readline()
    if not line:
        raise RuntimeError("flow holder failed")
    took = float(line)
    time.sleep(0.5)
    during = rss_kib(shim_pid)
    p.stdin.close()
    p.wait(timeout=30)
    return {"flows": flows, "open_s": took, "rss_before_kib": before, "rss_held_kib": during,
            "kib_per_flow": (during - before) / flows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--latency-runs", type=int, default=30)
    ap.add_argument("--flows", type=int, default=1000)
    ap.add_argument("--mtu", type=int, default=None, help="TUN MTU (default: wraith-tun's)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_tun: needs root (network namespaces, TUN)", file=sys.stderr)
        return 2
    ensure_tools("ip", "curl", "ssh-keygen")
    started = time.monotonic()
    with TestNet("b") as net:
        (net.www / "big.bin").write_bytes(os.urandom(a.size_mb << 20))
        (net.www / "small.bin").write_bytes(b"x" * 100)
        net.start_http()
        socks_host, socks_port = net.start_wraith()
        socks = f"{socks_host}:{socks_port}"
        extra = ["--mtu", str(a.mtu)] if a.mtu else []
        shim = net.start(net.client, *wraith_tun_cmd("--socks5", socks, "--setup", "--bypass", f"{SERVICE_ADDR}/32",
                                                     *extra), stderr=subprocess.PIPE)
        assert shim.stderr is not None
        ready = shim.stderr.readline().decode()
        if "ready" not in ready:
            raise RuntimeError(f"wraith-tun did not start: {ready}")
        direct = ["--socks5-hostname", socks]
        big = net.www / "big.bin"
        results: dict[str, list[float]] = {k: [] for k in ("down_direct", "down_tun", "up_direct", "up_tun",
                                                           "lat_direct", "lat_tun",
                                                           "conn_direct", "conn_tun")}
        # warm up both paths
        curl(net, *direct, f"{URL}/small.bin")
        curl(net, f"{URL}/small.bin")
        for _ in range(a.runs):  # interleaved, so drift hits both paths alike
            results["down_direct"].append(curl(net, *direct, f"{URL}/big.bin")["down"])
            results["down_tun"].append(curl(net, f"{URL}/big.bin")["down"])
            results["up_direct"].append(curl(net, *direct, "--data-binary", f"@{big}", f"{URL}/upload")["up"])
            results["up_tun"].append(curl(net, "--data-binary", f"@{big}", f"{URL}/upload")["up"])
        for _ in range(a.latency_runs):
            d = curl(net, *direct, f"{URL}/small.bin")
            t = curl(net, f"{URL}/small.bin")
            results["lat_direct"].append(d["total"])
            results["lat_tun"].append(t["total"])
            results["conn_direct"].append(d["ready"])
            results["conn_tun"].append(t["ready"])
        held = hold_flows(net, shim.pid, a.flows)
        shim.send_signal(signal.SIGTERM)
        shim.wait(timeout=15)
        stopped = shim.stderr.read().decode().strip().splitlines()

    med = {k: statistics.median(v) for k, v in results.items()}
    mb = 1e6
    print(f"wraith-tun benchmark ({a.size_mb} MiB x {a.runs} runs, {a.latency_runs} small requests, "
          f"same wraith connect; MTU {a.mtu or 'default'})")
    print(f"  download  direct SOCKS5 {med['down_direct'] / mb:8.1f} MB/s   TUN {med['down_tun'] / mb:8.1f} MB/s   "
          f"ratio {med['down_tun'] / med['down_direct']:.2f}x")
    print(f"  upload    direct SOCKS5 {med['up_direct'] / mb:8.1f} MB/s   TUN {med['up_tun'] / mb:8.1f} MB/s   "
          f"ratio {med['up_tun'] / med['up_direct']:.2f}x")
    print(f"  connect   direct SOCKS5 {med['conn_direct'] * 1000:8.2f} ms     TUN {med['conn_tun'] * 1000:8.2f} ms     "
          f"ratio {med['conn_tun'] / med['conn_direct']:.2f}x   (curl time_pretransfer: connection usable)")
    print(f"  request   direct SOCKS5 {med['lat_direct'] * 1000:8.2f} ms     TUN {med['lat_tun'] * 1000:8.2f} ms     "
          f"ratio {med['lat_tun'] / med['lat_direct']:.2f}x   (curl time_total, new connection each)")
    print(f"  flows held {held['flows']} (opened in {held['open_s']:.2f} s), shim RSS {held['rss_before_kib'] / 1024:.1f}"
          f" -> {held['rss_held_kib'] / 1024:.1f} MiB = {held['kib_per_flow']:.1f} KiB per idle flow")
    if stopped:
        print(f"  {stopped[-1]}")
    print(f"  wall time {time.monotonic() - started:.0f} s")
    print(json.dumps({"median": med, "held": held}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
