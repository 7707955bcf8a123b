"""Resilience benchmark: recovery after a server restart, streams held + memory per stream
(wraith vs OpenSSH), and throughput on an impaired link (wraith vs OpenSSH ``ssh -D``).

    python3 bench/bench_resilience.py [--restarts 5] [--blackholes 3] [--streams 3000] [--runs 5] [--size-mib 4]

1. recover: ``wraith serve`` is SIGKILLed and started again on the same port while
   ``wraith connect`` runs; the time from the kill until a new SOCKS5 connection carries a
   byte (median of N). The client's backoff starts at 1 s, so ~1 s + server start is the floor.
   Also with the server down 2.5 s (backoff cost), and a black-holed link (tests/netns.py wire
   dropping every packet): time until keepalives declare the session lost, and from the link's
   return until a new stream works.
2. streams: N concurrently open SOCKS5 streams through one session (load generator and echo
   target in their own processes), each checked with an echo; RSS before/after of the client
   and of the server side (for OpenSSH: ``ssh -D`` and the sum of sshd's per-connection
   processes) -> KiB per stream.
3. impaired link: two network namespaces joined by tests/netns.py's userspace netem (this
   kernel has no sch_netem), ``wraith serve`` and ``sshd`` side by side in the server
   namespace, ``wraith connect`` and ``ssh -D`` in the client namespace; downloads and uploads
   of SIZE through each, interleaved, median of R runs, for two impairments.
Runs in about 3-4 minutes on 2 cores. Traffic stays on loopback and in the namespaces it creates.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, recv_exact, socks_open, start_target

from helpers import PY, Keys, Proc, free_port, start_client, start_server, wait_for_log, wait_port, wraith  # noqa: E402
from netns import SERVER_ADDR, NetPair  # noqa: E402
from openssh import SSHD, ssh_base, start_sshd  # noqa: E402

LOADGEN = str(ROOT / "tests" / "loadgen.py")
IMPAIRMENTS = ["delay 50ms loss 2%", "delay 20ms loss 1% reorder 25%"]


def med(v: list[float]) -> float:
    return statistics.median(v) if v else float("nan")


def probe(socks: int, tport: int, timeout: float = 10) -> bool:
    try:
        s = socks_open(socks, "127.0.0.1", tport)
    except OSError:
        return False
    try:
        s.settimeout(timeout)
        s.sendall(b"P")
        recv_exact(s, 1)
        return True
    except OSError:
        return False
    finally:
        s.close()


# -- 1. recovery --------------------------------------------------------------------------------

def bench_recover(keys: Keys, tmp: Path, rounds: int, tport: int, outage: float = 0.0) -> dict[str, list[float]]:
    """SIGKILL the server, keep it down ``outage`` seconds, start it again on the same port."""
    sport = free_port()
    server, _ = start_server(keys, tmp, listen=f"127.0.0.1:{sport}", name="recover-serve0")
    client, socks = start_client(keys, tmp, sport, name="recover-connect")
    out: dict[str, list[float]] = {"kill_to_ok": [], "listen_to_ok": []}
    try:
        assert probe(socks, tport)
        for i in range(rounds):
            t0 = time.monotonic()
            server.signal(signal.SIGKILL)
            server.p.wait(5)
            server.stop()
            time.sleep(outage)
            server, _ = start_server(keys, tmp, listen=f"127.0.0.1:{sport}", name=f"recover-serve{i + 1}")
            t_listen = time.monotonic()
            deadline = t0 + 60
            while not probe(socks, tport) and time.monotonic() < deadline:
                time.sleep(0.05)
            t_ok = time.monotonic()
            if t_ok >= deadline:
                raise RuntimeError(f"no recovery within 60 s:\n{client.log()[-2000:]}")
            out["kill_to_ok"].append(t_ok - t0)
            out["listen_to_ok"].append(t_ok - t_listen)
            time.sleep(0.5)
    finally:
        client.stop()
        server.stop()
    return out


# -- 1b. black-holed link (default keepalives) ----------------------------------------------------------

POLL = """
import sys, time
sys.path.insert(0, {bench!r})
from common import recv_exact, socks_open
socks, tport = int(sys.argv[1]), int(sys.argv[2])
t0 = time.monotonic()
while time.monotonic() - t0 < 60:
    try:
        s = socks_open(socks, "127.0.0.1", tport)
        s.settimeout(5)
        s.sendall(b"P")
        recv_exact(s, 1)
        s.close()
        break
    except OSError:
        time.sleep(0.05)
print(time.monotonic() - t0)
"""


def bench_blackhole(keys: Keys, tmp: Path, rounds: int) -> dict[str, list[float]]:
    """Drop every packet on the link (no RST/FIN): time until the client declares the session lost
    (default keepalives), then restore the link: time until a new SOCKS5 stream works."""
    out: dict[str, list[float]] = {"detect": [], "recover": []}
    ns_tmp = Path(tempfile.mkdtemp(prefix="ns", dir=tmp))
    os.chmod(ns_tmp, 0o755)
    net = NetPair(ns_tmp, "delay 10ms")
    try:
        net.create()
        t = net.popen(net.server, [PY, str(ROOT / "bench" / "common.py"), "target", "9000"], stdout=subprocess.PIPE)
        assert t.stdout is not None and t.stdout.readline().strip() == b"ready"
        net.proc(net.server, wraith("serve", "--key", str(keys.host), "--authorized-keys", str(keys.authorized),
                                    "--listen", f"{SERVER_ADDR}:2222"), "serve", ready="listening")
        client = net.proc(net.client, wraith("connect", "--server", f"{SERVER_ADDR}:2222", "--identity",
                                             str(keys.client), "--host-key", str(keys.host_pub), "--socks5",
                                             "127.0.0.1:1080"), "connect", ready="socks5 listening")
        wait_for_log(client, "session up", timeout=30)
        poll = POLL.format(bench=str(ROOT / "bench"))
        for i in range(rounds):
            lost = client.log().count("session lost")
            t0 = time.monotonic()
            net.set_impairment("delay 10ms loss 100%")
            while client.log().count("session lost") <= lost and time.monotonic() - t0 < 60:
                time.sleep(0.05)
            out["detect"].append(time.monotonic() - t0)
            net.set_impairment("delay 10ms")
            r = net.run(net.client, [PY, "-c", poll, "1080", "9000"], timeout=90)
            out["recover"].append(float(r.stdout))
    finally:
        net.destroy()
    return out


# -- 2. streams held, memory per stream -------------------------------------------------------------

def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def hold_streams(socks: int, tport: int, n: int, client_pids, server_pids) -> dict:  # type: ignore[no-untyped-def]
    # warm-up: a few streams first, so one-off allocations are not counted per stream
    subprocess.run([PY, LOADGEN, "streams", str(socks), str(tport), "20", "4096"], capture_output=True, timeout=60)
    time.sleep(0.5)
    c0, s0 = rss_kib(client_pids()), rss_kib(server_pids())
    gen = subprocess.Popen([PY, LOADGEN, "idle", str(socks), str(tport), str(n)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert gen.stdin is not None and gen.stdout is not None
    try:
        held = json.loads(gen.stdout.readline() or b"{}")
        time.sleep(0.5)
        c1, s1 = rss_kib(client_pids()), rss_kib(server_pids())
        gen.stdin.write(b"check\n")
        gen.stdin.flush()
        checked = json.loads(gen.stdout.readline() or b"{}")
        gen.stdin.write(b"quit\n")
        gen.stdin.flush()
        gen.wait(60)
    finally:
        if gen.poll() is None:
            gen.kill()
            gen.wait(5)
    h = held.get("held", 0) or float("nan")
    return {"held": held.get("held", 0), "ok_after": checked.get("ok", 0), "errors": held.get("errors", {}),
            "open_s": held.get("open_s"), "client_kib": (c1 - c0) / h, "server_kib": (s1 - s0) / h,
            "client_rss": c1, "server_rss": s1}


def bench_streams(keys: Keys, tmp: Path, n: int) -> dict[str, dict]:
    res: dict[str, dict] = {}
    echo = subprocess.Popen([PY, LOADGEN, "target", "0"], stdout=subprocess.PIPE)
    try:
        assert echo.stdout is not None
        tport = int(echo.stdout.readline().split()[1])
        _streams_both(keys, tmp, n, tport, res)
    finally:
        echo.kill()
        echo.wait(5)
    return res


def _streams_both(keys: Keys, tmp: Path, n: int, tport: int, res: dict[str, dict]) -> None:
    server, sport = start_server(keys, tmp, name="streams-serve")
    client, socks = start_client(keys, tmp, sport, name="streams-connect")
    try:
        res["wraith"] = hold_streams(socks, tport, n, lambda: [client.p.pid], lambda: [server.p.pid])
    finally:
        client.stop()
        server.stop()
    sshd, dport = start_sshd(keys, tmp)
    osocks = free_port()
    ssh = Proc(ssh_base(keys, dport, tmp) + ["-N", "-D", f"127.0.0.1:{osocks}", "root@127.0.0.1"], tmp / "ssh.log")
    try:
        wait_port("127.0.0.1", osocks)
        res["openssh"] = hold_streams(osocks, tport, n, lambda: [ssh.p.pid], lambda: descendants(sshd.p.pid))
    finally:
        ssh.stop()
        sshd.stop()


# -- 3. throughput on an impaired link ---------------------------------------------------------------

XFER = """
import sys, time
sys.path.insert(0, {bench!r})
from common import download, upload
socks, tport, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
fn = download if sys.argv[4] == "down" else upload
print(fn(socks, tport, size))
"""


def bench_impaired(keys: Keys, tmp: Path, spec: str, runs: int, size: int) -> dict[str, dict[str, list[float]]]:
    res = {name: {"down": [], "up": []} for name in ("wraith", "openssh")}
    ns_tmp = Path(tempfile.mkdtemp(prefix="ns", dir=tmp))
    os.chmod(ns_tmp, 0o755)
    net = NetPair(ns_tmp, spec)
    try:
        net.create()
        tport = 9000
        t = net.popen(net.server, [PY, str(ROOT / "bench" / "common.py"), "target", str(tport)],
                      stdout=subprocess.PIPE)
        assert t.stdout is not None and t.stdout.readline().strip() == b"ready"
        net.proc(net.server, wraith("serve", "--key", str(keys.host), "--authorized-keys", str(keys.authorized),
                                    "--listen", f"{SERVER_ADDR}:2222"), "serve", ready="listening")
        cfg = ns_tmp / "sshd_config"
        cfg.write_text("\n".join([
            "Port 22", f"ListenAddress {SERVER_ADDR}", f"HostKey {keys.host}", f"AuthorizedKeysFile {keys.authorized}",
            f"PidFile {ns_tmp / 'sshd.pid'}", "StrictModes no", "UsePAM no", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password", "AllowTcpForwarding yes",
            "LogLevel ERROR"]) + "\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        net.proc(net.server, [SSHD, "-D", "-e", "-f", str(cfg)], "sshd")
        net.wait_port(net.client, SERVER_ADDR, 22)
        client = net.proc(net.client, wraith("connect", "--server", f"{SERVER_ADDR}:2222", "--identity", str(keys.client),
                                             "--host-key", str(keys.host_pub), "--socks5", "127.0.0.1:1080"),
                          "connect", ready="socks5 listening")
        wait_for_log(client, "session up", timeout=30)
        args = ssh_base(keys, 22, ns_tmp)
        pub = keys.host_pub.read_text().split()
        (ns_tmp / "ssh_known_hosts").write_text(f"{SERVER_ADDR} {pub[0]} {pub[1]}\n")
        net.proc(net.client, args + ["-N", "-D", "127.0.0.1:1081", f"root@{SERVER_ADDR}"], "ssh")
        net.wait_port(net.client, "127.0.0.1", 1081)
        code = XFER.format(bench=str(ROOT / "bench"))
        peers = {"wraith": 1080, "openssh": 1081}
        for name, port in peers.items():  # warm-up (and a check that both paths work)
            r = net.run(net.client, [PY, "-c", code, str(port), str(tport), str(1 << 20), "down"], timeout=120)
            if r.returncode != 0:
                raise RuntimeError(f"{name} warm-up failed: {r.stderr.decode()[-1000:]}")
        for _ in range(runs):
            for name, port in peers.items():
                for d in ("down", "up"):
                    r = net.run(net.client, [PY, "-c", code, str(port), str(tport), str(size), d], timeout=120)
                    if r.returncode == 0:
                        res[name][d].append(float(r.stdout))
                    else:
                        print(f"  {name} {d} failed: {r.stderr.decode()[-300:]}", file=sys.stderr)
        stats = net.wire_stats()
        res["wire"] = stats  # type: ignore[assignment]
    finally:
        net.destroy()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--restarts", type=int, default=5)
    ap.add_argument("--blackholes", type=int, default=3)
    ap.add_argument("--streams", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=4)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="wraith-bench-res-"))
    os.chmod(tmp, 0o755)
    keys = Keys.make(tmp / "keys")
    target, tport = start_target()
    t_start = time.monotonic()
    try:
        print(f"# 1. recovery after SIGKILL of wraith serve, restarted on the same port after an outage "
              f"({args.restarts} rounds each; client backoff 1, 2, 4 ... s)")
        print(f"{'outage s':>9}{'kill->works median s':>22}{'min':>7}{'max':>7}{'listening->works median s':>27}")
        for outage in (0.0, 2.5):
            rec = bench_recover(keys, tmp, args.restarts if outage == 0 else max(1, args.restarts // 2), tport, outage)
            print(f"{outage:9.1f}{med(rec['kill_to_ok']):22.2f}{min(rec['kill_to_ok']):7.2f}{max(rec['kill_to_ok']):7.2f}"
                  f"{med(rec['listen_to_ok']):27.2f}", flush=True)

        bh = bench_blackhole(keys, tmp, args.blackholes)
        print(f"black-holed link (every packet dropped, default keepalive 5 s x 3), {args.blackholes} rounds: "
              f"lost noticed after median {med(bh['detect']):.1f} s [{min(bh['detect']):.1f}-{max(bh['detect']):.1f}]; "
              f"link back -> new SOCKS5 stream works: median {med(bh['recover']):.2f} s "
              f"[{min(bh['recover']):.2f}-{max(bh['recover']):.2f}]", flush=True)

        st = bench_streams(keys, tmp, args.streams)
        print(f"\n# 2. {args.streams} concurrently open SOCKS5 streams through one session, each echo-checked")
        print(f"{'':9}{'held':>7}{'ok again':>10}{'open s':>8}{'client KiB/stream':>19}{'server KiB/stream':>19}"
              f"{'client RSS MiB':>16}{'server RSS MiB':>16}")
        for name, r in st.items():
            print(f"{name:9}{r['held']:7d}{r['ok_after']:10d}{r['open_s'] or 0:8.1f}{r['client_kib']:19.1f}"
                  f"{r['server_kib']:19.1f}{r['client_rss'] / 1024:16.1f}{r['server_rss'] / 1024:16.1f}")
            if r["errors"]:
                print(f"  {name} open errors: {r['errors']}")
        w, o = st["wraith"], st["openssh"]
        if o["client_kib"] > 0 and o["server_kib"] > 0:
            print(f"ratio wraith/OpenSSH memory per stream: client {w['client_kib'] / o['client_kib']:.2f}, "
                  f"server {w['server_kib'] / o['server_kib']:.2f} (lower is better)", flush=True)

        size = args.size_mib << 20
        print(f"\n# 3. throughput on an impaired link (userspace netem, both directions), "
              f"{args.runs} x {args.size_mib} MiB each way, median MB/s, TCP congestion control "
              f"{Path('/proc/sys/net/ipv4/tcp_congestion_control').read_text().strip()} (the kernel's; "
              f"namespaces may not change it here)")
        for spec in IMPAIRMENTS:
            r = bench_impaired(keys, tmp, spec, args.runs, size)
            print(f"{spec}   (wire: {r['wire']})")
            for d in ("down", "up"):
                w, o = r["wraith"][d], r["openssh"][d]
                print(f"  {d:5} wraith {med(w) / 1e6:6.2f} [{min(w, default=0) / 1e6:.2f}-{max(w, default=0) / 1e6:.2f}]"
                      f"   ssh -D {med(o) / 1e6:6.2f} [{min(o, default=0) / 1e6:.2f}-{max(o, default=0) / 1e6:.2f}]"
                      f"   ratio {med(w) / med(o):.2f}", flush=True)
        print("(MB/s: median [min-max]; ratio = wraith/OpenSSH medians, higher is better; with BBR (this "
              "kernel's default) random loss costs far less than with CUBIC/Reno; runs vary a lot on a "
              "shared 2-core machine)")
        print(f"\ntotal {time.monotonic() - t_start:.0f} s")
    finally:
        target.terminate()


if __name__ == "__main__":
    sys.exit(main())
