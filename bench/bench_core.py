"""wraith connect -> wraith serve vs ssh -D -> sshd, side by side on loopback, default settings on both.

Prints bulk throughput both directions (median of N runs of SIZE), SOCKS5 connect + first-byte latency
(median, p99 of M) and the ratios wraith/OpenSSH. The probes alternate between the two and are also
split into rounds: the ratio of each round's medians is printed too, and their median, since on a
shared machine the load drifts over a run and a round's two medians see the same load. Usage:

    python3 bench/bench_core.py [--size-mib 512] [--runs 3] [--probes 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import PHASES, connect_phases, download, med, pct, start_openssh_socks, start_target, upload

from helpers import Keys, Proc, start_client, start_server  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--probes", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    size = args.size_mib << 20
    tmp = Path(tempfile.mkdtemp(prefix="wraith-bench-"))
    keys = Keys.make(tmp / "keys")
    procs: list[Proc] = []
    target, tport = start_target()
    try:
        server, sport = start_server(keys, tmp)
        procs.append(server)
        client, wsocks = start_client(keys, tmp, sport)
        procs.append(client)
        openssh, osocks = start_openssh_socks(keys, tmp)
        procs += openssh
        peers = {"wraith": wsocks, "openssh": osocks}
        # warm-up
        for port in peers.values():
            download(port, tport, 16 << 20)
        res: dict[str, dict[str, list[float]]] = {k: {"down": [], "up": [], "lat": []} for k in peers}
        for _ in range(args.runs):  # interleaved, so drift hits both alike
            for name, port in peers.items():
                res[name]["down"].append(download(port, tport, size))
                res[name]["up"].append(upload(port, tport, size))
        round_ratios: list[float] = []
        phases: dict[str, list[tuple[float, ...]]] = {k: [] for k in peers}
        per_round = max(1, args.probes // args.rounds)
        for rnd in range(args.rounds):
            lat: dict[str, list[float]] = {k: [] for k in peers}
            for _ in range(per_round if rnd < args.rounds - 1 else args.probes - per_round * rnd):
                for name, port in peers.items():
                    parts = connect_phases(port, tport)
                    phases[name].append(parts)
                    lat[name].append(sum(parts))
            for name in peers:
                res[name]["lat"] += lat[name]
            if lat["wraith"] and lat["openssh"]:
                round_ratios.append(med(lat["wraith"]) / med(lat["openssh"]))
        print(f"# {args.runs} runs x {args.size_mib} MiB each way, {args.probes} connect probes, loopback")
        print(f"{'':10}{'down MB/s':>12}{'up MB/s':>12}{'conn med ms':>14}{'conn p99 ms':>14}")
        for name in peers:
            r = res[name]
            print(f"{name:10}{med(r['down'])/1e6:12.0f}{med(r['up'])/1e6:12.0f}"
                  f"{med(r['lat'])*1e3:14.2f}{pct(r['lat'], 0.99)*1e3:14.2f}")
        w, o = res["wraith"], res["openssh"]
        print(f"{'ratio':10}{med(w['down'])/med(o['down']):12.2f}{med(w['up'])/med(o['up']):12.2f}"
              f"{med(w['lat'])/med(o['lat']):14.2f}{pct(w['lat'], .99)/pct(o['lat'], .99):14.2f}")
        print("(throughput ratio = wraith/OpenSSH, higher is better; latency ratio: lower is better)")
        print(f"connect latency ratio per round of {per_round} probes: "
              + " ".join(f"{x:.2f}" for x in round_ratios) + f"  (median {med(round_ratios):.2f})")
        print("connect latency by phase, median us (wraith / OpenSSH):")
        for i, phase in enumerate(PHASES):
            wm, om = (med([p[i] for p in phases[n]]) * 1e6 for n in ("wraith", "openssh"))
            print(f"  {phase:16}{wm:8.0f}{om:8.0f}   {wm / om:5.2f}x")
    finally:
        for p in procs:
            p.stop()
        target.terminate()


if __name__ == "__main__":
    sys.exit(main())
