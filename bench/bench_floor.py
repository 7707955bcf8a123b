"""Where wraith's SOCKS5 connect latency stands between OpenSSH and the floor of a Python relay.

Side by side in one run, probes interleaved (connect + SOCKS5 CONNECT + one byte each way, as
bench_core.py): ``ssh -D``→``sshd``, ``wraith connect``→``wraith serve``, and the two minimal
Python relays of floor_relay.py (no SSH, no encryption): ``late`` replies to SOCKS5 after the
server confirmed, as wraith must and as ``ssh -D`` does too (measured: its success reply comes
one SSH round trip after the request, and a refused target gets no reply, only a close);
``early`` replies at once, which neither does — a lower bound. Prints medians and ratios to
OpenSSH. ``floor-late`` is the like-for-like floor of a Python relay; the gap between it and
``wraith`` is what SSH, encryption and wraith's own work per hop cost. Usage:

    python3 bench/bench_floor.py [--probes 2000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from common import connect_latency, med, pct, start_openssh_socks, start_target

from helpers import Keys, Proc, free_port, start_client, start_server  # noqa: E402

HERE = Path(__file__).resolve().parent


def start_floor(target_port: int, mode: str) -> tuple[list[subprocess.Popen[bytes]], int]:
    server_port, socks_port = free_port(), free_port()
    procs = []
    for args in (["server", str(server_port), str(target_port)], ["client", str(server_port), str(socks_port), mode]):
        p = subprocess.Popen([sys.executable, str(HERE / "floor_relay.py"), *args], stdout=subprocess.PIPE)
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
    return procs, socks_port


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probes", type=int, default=2000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="wraith-bench-"))
    keys = Keys.make(tmp / "keys")
    procs: list[Proc] = []
    plain: list[subprocess.Popen[bytes]] = []
    target, tport = start_target()
    try:
        openssh, osocks = start_openssh_socks(keys, tmp)
        procs += openssh
        server, sport = start_server(keys, tmp)
        client, wsocks = start_client(keys, tmp, sport)
        procs += [server, client]
        peers = {"openssh": osocks, "wraith": wsocks}
        for mode in ("late", "early"):
            ps, port = start_floor(tport, mode)
            plain += ps
            peers[f"floor-{mode}"] = port
        lat: dict[str, list[float]] = {k: [] for k in peers}
        for _ in range(50):  # warm-up
            for port in peers.values():
                connect_latency(port, tport)
        for _ in range(args.probes):
            for name, port in peers.items():
                lat[name].append(connect_latency(port, tport))
        base = med(lat["openssh"])
        print(f"# {args.probes} SOCKS5 connect + first-byte probes each, interleaved, loopback")
        print(f"{'':13}{'median ms':>10}{'p99 ms':>9}{'x OpenSSH':>11}")
        for name in peers:
            print(f"{name:13}{med(lat[name]) * 1e3:10.3f}{pct(lat[name], .99) * 1e3:9.3f}{med(lat[name]) / base:11.2f}")
    finally:
        for p in procs:
            p.stop()
        for q in plain:
            q.terminate()
        target.terminate()


if __name__ == "__main__":
    sys.exit(main())
