"""Transports side by side in one run: tcp, tls, tls+stealth, iroh (with and without the memmove fix).

For each transport a real ``wraith serve`` + ``wraith connect`` pair runs on
loopback (iroh: relays off). Measured, interleaved so drift hits all alike:

* bulk throughput through the client's SOCKS5 port, download and upload
  (median of RUNS transfers of SIZE; iroh without the fix uses a smaller size,
  it runs at a few MB/s);
* channel latency: SOCKS5 connect + request + first byte over the live
  session (median and p99 of PROBES);
* session setup: transport connect + SSH handshake + auth from the library
  (``Session.start()``, round robin over the transports), median and p99 of SETUPS.

Ratios are relative to tcp in the same run. Usage::

    python3 bench/bench_transports.py [--size-mib 256] [--runs 3] [--probes 200] [--setups 100]
        [--nopatch-size-mib 16] [--json FILE]

Bounded: about 2-3 minutes with the defaults on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import connect_latency, download, med, pct, start_target, upload

from helpers import Keys, Proc, start_client, start_server  # noqa: E402
from transport_helpers import Certs, start_client_args, start_iroh_server, tls_server_args  # noqa: E402

NOPATCH = {"WRAITH_IROH_NO_PATCH": "1"}


def start_pairs(keys: Keys, certs: Certs, tmp: Path, procs: list[Proc]) -> dict[str, dict]:
    pairs: dict[str, dict] = {}
    tls_client = ["--transport", "tls", "--tls-ca", str(certs.ca)]

    s, port = start_server(keys, tmp, name="serve-tcp")
    procs.append(s)
    c, socks = start_client(keys, tmp, port, name="connect-tcp")
    procs.append(c)
    pairs["tcp"] = {"socks": socks, "opts": {"server": f"127.0.0.1:{port}"}}

    s, port = start_server(keys, tmp, *tls_server_args(certs), name="serve-tls")
    procs.append(s)
    c, socks = start_client(keys, tmp, port, *tls_client, name="connect-tls")
    procs.append(c)
    pairs["tls"] = {"socks": socks, "opts": {"server": f"127.0.0.1:{port}", "transport": "tls",
                                             "tls_ca": str(certs.ca)}}

    s, port = start_server(keys, tmp, *tls_server_args(certs), "--stealth", name="serve-stealth")
    procs.append(s)
    c, socks = start_client(keys, tmp, port, *tls_client, name="connect-stealth")
    procs.append(c)
    pairs["tls+stealth"] = {"socks": socks, "opts": {"server": f"127.0.0.1:{port}", "transport": "tls",
                                                     "tls_ca": str(certs.ca)}}

    for name, env in (("iroh", None), ("iroh-nopatch", NOPATCH)):
        s, _, ticket = start_iroh_server(keys, tmp, name=f"serve-{name}", env=env)
        procs.append(s)
        c, socks = start_client_args(keys, tmp, ["--transport", "iroh", "--iroh-relay", "none",
                                                 "--peer", ticket], name=f"connect-{name}", env=env)
        procs.append(c)
        pairs[name] = {"socks": socks, "opts": {"transport": "iroh", "peer": ticket, "iroh_relay": "none"}}
    return pairs


async def session_setups(keys: Keys, pairs: dict[str, dict], names: list[str], n: int) -> dict[str, list[float]]:
    """Full session setups (transport + SSH handshake + auth), round robin over the transports."""
    from wraith_core.options import ConnectOptions
    from wraith_core.ssh.client import Session
    from wraith_core.transport.base import drain_transports

    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(n):
        for name in names:
            o = ConnectOptions(identity=str(keys.client), host_key=str(keys.host_pub), socks5=None,
                               **pairs[name]["opts"])
            s = Session(o, reconnect=False)
            t0 = time.perf_counter()
            await s.start()
            times[name].append(time.perf_counter() - t0)
            await s.close()
    await drain_transports()
    return times


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--nopatch-size-mib", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--probes", type=int, default=200)
    ap.add_argument("--setups", type=int, default=100)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()

    from wraith_core import tuning

    tuning.tune_malloc()
    tmp = Path(tempfile.mkdtemp(prefix="wraith-bench-transports-"))
    keys = Keys.make(tmp / "keys")
    certs = Certs.make(tmp / "certs")
    procs: list[Proc] = []
    target, tport = start_target()
    started = time.monotonic()
    try:
        pairs = start_pairs(keys, certs, tmp, procs)
        names = list(pairs)
        size = {n: (args.nopatch_size_mib if n == "iroh-nopatch" else args.size_mib) << 20 for n in names}
        res = {n: {"down": [], "up": [], "lat": [], "setup": []} for n in names}
        for n in names:  # warm-up
            download(pairs[n]["socks"], tport, min(size[n], 8 << 20))
        for _ in range(args.runs):
            for n in names:
                res[n]["down"].append(download(pairs[n]["socks"], tport, size[n]))
                res[n]["up"].append(upload(pairs[n]["socks"], tport, size[n]))
        for _ in range(args.probes):
            for n in names:
                res[n]["lat"].append(connect_latency(pairs[n]["socks"], tport))
        loop = tuning.new_event_loop()
        try:
            # iroh-nopatch is left out: the fix does not matter for a handshake's few KiB
            timed = [n for n in names if n != "iroh-nopatch"]
            for n, v in loop.run_until_complete(session_setups(keys, pairs, timed, args.setups)).items():
                res[n]["setup"] = v
        finally:
            loop.close()
    finally:
        for p in procs:
            p.stop()
        target.terminate()
    elapsed = time.monotonic() - started

    def m(n: str, k: str, q: float | None = None) -> float:
        v = res[n][k]
        return float("nan") if not v else (med(v) if q is None else pct(v, q))

    print(f"# loopback, {args.runs} runs x {args.size_mib} MiB each way (iroh-nopatch: {args.nopatch_size_mib} MiB), "
          f"{args.probes} channel probes, {args.setups} session setups; {elapsed:.0f} s")
    print(f"{'transport':14}{'down MB/s':>10}{'up MB/s':>10}{'chan med ms':>12}{'chan p99':>10}"
          f"{'setup med ms':>14}{'setup p99':>11}")
    for n in names:
        print(f"{n:14}{m(n, 'down')/1e6:10.0f}{m(n, 'up')/1e6:10.0f}{m(n, 'lat')*1e3:12.2f}"
              f"{m(n, 'lat', .99)*1e3:10.2f}{m(n, 'setup')*1e3:14.1f}{m(n, 'setup', .99)*1e3:11.1f}")
    print("\n# ratios vs tcp (throughput: higher is better; latency: lower is better)")
    print(f"{'transport':14}{'down':>10}{'up':>10}{'chan med':>12}{'chan p99':>10}{'setup med':>14}{'setup p99':>11}")
    for n in names:
        if n == "tcp":
            continue
        print(f"{n:14}{m(n, 'down')/m('tcp', 'down'):10.2f}{m(n, 'up')/m('tcp', 'up'):10.2f}"
              f"{m(n, 'lat')/m('tcp', 'lat'):12.2f}{m(n, 'lat', .99)/m('tcp', 'lat', .99):10.2f}"
              f"{m(n, 'setup')/m('tcp', 'setup'):14.2f}{m(n, 'setup', .99)/m('tcp', 'setup', .99):11.2f}")
    print(f"\nstealth vs plain tls: down {m('tls+stealth', 'down')/m('tls', 'down'):.2f}x, "
          f"setup {m('tls+stealth', 'setup')/m('tls', 'setup'):.2f}x")
    print(f"iroh memmove fix: down {m('iroh', 'down')/m('iroh-nopatch', 'down'):.0f}x, "
          f"up {m('iroh', 'up')/m('iroh-nopatch', 'up'):.0f}x faster than the bindings' byte loop")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
