"""Two network namespaces joined by an impaired point-to-point link.

    client ns (wrc<pid><n>)                         server ns (wrs<pid><n>)
    tun wtc.. 10.213.0.1 <-- wire process --> tun wts.. 10.213.0.2
                          (delay, loss, reorder per direction)

Why not veth + ``tc netem``: this machine's kernel has no ``sch_netem``
(``tc qdisc add ... netem`` answers "Specified qdisc kind is unknown"), so the
link is a userspace netem: one TUN device in each namespace and a small
forwarding process (``python3 tests/netns.py wire ...``, run in the root
namespace, attached to both devices through setns) that copies IP packets
between them, dropping a random fraction (``loss``), holding each packet for
``delay`` ms (a FIFO, so order is kept), and letting a fraction (``reorder``)
skip the delay queue so it overtakes the packets ahead of it — the same knobs
and semantics as ``netem delay D loss L reorder R``. Both directions are
impaired alike unless told otherwise.

Used by the impaired-network tests and ``bench/bench_resilience.py``. Names are
unique per process (pid + counter); :meth:`NetPair.destroy` kills every process
started through the pair and deletes both namespaces (and so the devices), also
after a failure (use it as a context manager or a fixture). Nothing here routes
anywhere but between these two namespaces: neither has a default route.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import Proc

CLIENT_ADDR = "10.213.0.1"
SERVER_ADDR = "10.213.0.2"
HERE = Path(__file__).resolve().parent
REPO = HERE.parent

_counter = 0


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {r.stderr.strip()}")
    return r


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    e.setdefault("PYTHONUNBUFFERED", "1")
    return e


class NetPair:
    def __init__(self, tmp: Path, impairment: str = "", tag: str = "") -> None:
        global _counter
        _counter += 1
        ident = f"{os.getpid()}{tag}{_counter}"
        self.client = f"wrc{ident}"
        self.server = f"wrs{ident}"
        self.tc = f"wtc{ident}"[:15]
        self.ts = f"wts{ident}"[:15]
        self.tmp = tmp
        self.procs: list[Proc] = []
        self.popens: list[subprocess.Popen[bytes]] = []
        self.wire: subprocess.Popen[bytes] | None = None
        self._created: list[str] = []
        self.impairment = impairment

    # -- lifecycle -------------------------------------------------------------------

    def create(self) -> NetPair:
        """``impairment`` like ``"delay 50ms loss 2%"`` or ``"delay 20ms loss 1% reorder 25%"``."""
        for ns in (self.client, self.server):
            sh("ip", "netns", "add", ns)
            self._created.append(ns)
        for ns, dev, addr, peer in ((self.client, self.tc, CLIENT_ADDR, SERVER_ADDR),
                                    (self.server, self.ts, SERVER_ADDR, CLIENT_ADDR)):
            x = ["ip", "netns", "exec", ns]
            sh(*x, "ip", "link", "set", "lo", "up")
            sh(*x, "ip", "tuntap", "add", "dev", dev, "mode", "tun")
            sh(*x, "ip", "addr", "add", addr, "peer", peer, "dev", dev)
            sh(*x, "ip", "link", "set", dev, "mtu", "1500", "up")
        self.set_impairment(self.impairment)
        return self

    def set_impairment(self, spec: str) -> None:
        """Start the wire with netem-style ``spec`` (empty: a clean link), or change it on the running
        wire without touching the devices (``"loss 100%"`` is a black hole)."""
        if self.wire is not None and self.wire.poll() is None:
            assert self.wire.stdin is not None and self.wire.stdout is not None
            self.wire.stdin.write(spec.encode() + b"\n")
            self.wire.stdin.flush()
            line = self.wire.stdout.readline()
            if line.strip() != b"ok":
                raise RuntimeError(f"wire refused {spec!r}: {line!r}")
            self.impairment = spec
            return
        self.wire = subprocess.Popen([sys.executable, __file__, "wire", self.client, self.tc, self.server,
                                      self.ts, spec], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     start_new_session=True)
        assert self.wire.stdout is not None
        line = self.wire.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"wire process did not start: {line!r}")

    def wire_stats(self) -> dict[str, int]:
        """Ask the wire (SIGUSR1) for its counters: packets passed / dropped / reordered."""
        assert self.wire is not None and self.wire.stdout is not None
        self.wire.send_signal(signal.SIGUSR1)
        import json

        return json.loads(self.wire.stdout.readline())

    def _stop_wire(self) -> None:
        w, self.wire = self.wire, None
        if w is not None and w.poll() is None:
            w.kill()
            w.wait(5)

    def destroy(self) -> None:
        for p in reversed(self.procs):
            try:
                p.stop(timeout=3)
            except Exception:
                pass
        for q in reversed(self.popens):
            if q.poll() is None:
                try:
                    os.killpg(q.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                q.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self._stop_wire()
        for ns in self._created:
            sh("ip", "netns", "del", ns, check=False)
        self._created.clear()

    def __enter__(self) -> NetPair:
        try:
            return self.create()
        except BaseException:
            self.destroy()
            raise

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # -- processes ---------------------------------------------------------------------

    @staticmethod
    def cmd(ns: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *args]

    def proc(self, ns: str, args: list[str], name: str, ready: str | None = None, timeout: float = 20) -> Proc:
        """A :class:`helpers.Proc` inside ``ns`` (``ip netns exec`` execs, so its pid is the program's)."""
        p = Proc(self.cmd(ns, *args), self.tmp / f"{name}.log", env=env(), ready=ready, timeout=timeout)
        self.procs.append(p)
        return p

    def popen(self, ns: str, args: list[str], **kw: object) -> subprocess.Popen[bytes]:
        kw.setdefault("env", env())
        q = subprocess.Popen(self.cmd(ns, *args), start_new_session=True, **kw)  # type: ignore[call-overload]
        self.popens.append(q)
        return q

    def run(self, ns: str, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.cmd(ns, *args), capture_output=True, timeout=timeout, env=env())

    def wait_port(self, ns: str, host: str, port: int, timeout: float = 15) -> None:
        code = ("import socket,sys,time\nd=time.monotonic()+%r\n"
                "while time.monotonic()<d:\n"
                " try: socket.create_connection((%r,%d),timeout=1).close(); sys.exit(0)\n"
                " except OSError: time.sleep(0.05)\nsys.exit(1)") % (timeout, host, port)
        r = self.run(ns, [sys.executable, "-c", code], timeout=timeout + 10)
        if r.returncode != 0:
            raise AssertionError(f"{host}:{port} not reachable in {ns}")


def leftover_namespaces() -> list[str]:
    """Namespaces this process created and did not delete (for a teardown assertion)."""
    if shutil.which("ip") is None:
        return []
    out = sh("ip", "netns", "list", check=False).stdout
    mine = (f"wrc{os.getpid()}", f"wrs{os.getpid()}")
    return [line.split()[0] for line in out.splitlines() if line.startswith(mine)]


def wait_until(pred, timeout: float, step: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


# -- the wire: a userspace netem between two TUN devices -------------------------------------------

def parse_impairment(spec: str) -> tuple[float, float, float]:
    """``delay 50ms loss 2% reorder 25%`` -> (delay seconds, loss fraction, reorder fraction)."""
    words = spec.split()
    delay = loss = reorder = 0.0
    i = 0
    while i < len(words):
        key, val = words[i], words[i + 1]
        if key == "delay":
            delay = float(val.removesuffix("ms")) / 1000 if val.endswith("ms") else float(val.removesuffix("s"))
        elif key == "loss":
            loss = float(val.removesuffix("%")) / 100
        elif key == "reorder":
            reorder = float(val.removesuffix("%")) / 100
        else:
            raise ValueError(f"unknown impairment {key!r}")
        i += 2
    return delay, loss, reorder


def _open_tun(ns: str, dev: str) -> int:
    import ctypes
    import fcntl
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    here = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(target, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", dev.encode(), 0x0001 | 0x1000))  # TUNSETIFF, TUN|NO_PI
    finally:
        libc.setns(here, 0x40000000)
        os.close(here)
        os.close(target)
    return fd


def run_wire(cns: str, cdev: str, sns: str, sdev: str, spec: str) -> None:
    import asyncio
    import collections
    import json
    import random

    cfg = list(parse_impairment(spec))  # delay, loss, reorder; replaced by a line on stdin
    fds = {"c": _open_tun(cns, cdev), "s": _open_tun(sns, sdev)}
    stats = collections.Counter()
    limit = 20000  # packets held per direction (netem's limit is 1000 by default; we never want to drop here)
    rng = random.Random()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        queues = {"c": collections.deque(), "s": collections.deque()}  # keyed by the OUTPUT side
        timers: dict[str, asyncio.TimerHandle | None] = {"c": None, "s": None}

        def emit(out: str, pkt: bytes) -> None:
            try:
                os.write(fds[out], pkt)
                stats["passed"] += 1
            except OSError:
                stats["write_errors"] += 1

        def flush(out: str) -> None:
            timers[out] = None
            q = queues[out]
            now = loop.time()
            while q and q[0][0] <= now:
                emit(out, q.popleft()[1])
            if q:
                timers[out] = loop.call_at(q[0][0], flush, out)

        def readable(src: str) -> None:
            out = "s" if src == "c" else "c"
            delay, loss, reorder = cfg
            for _ in range(256):
                try:
                    pkt = os.read(fds[src], 65536)
                except BlockingIOError:
                    return
                stats["max_len"] = max(stats["max_len"], len(pkt))
                if loss and rng.random() < loss:
                    stats["dropped"] += 1
                    continue
                if not delay or (reorder and rng.random() < reorder):
                    stats["reordered" if delay else "direct"] += 1
                    emit(out, pkt)
                    continue
                q = queues[out]
                if len(q) >= limit:
                    stats["overflow"] += 1
                    continue
                q.append((loop.time() + delay, pkt))
                if timers[out] is None:
                    timers[out] = loop.call_at(q[0][0], flush, out)

        def report() -> None:
            print(json.dumps(dict(stats)), flush=True)

        import signal as sig

        loop.add_reader(fds["c"], readable, "c")
        loop.add_reader(fds["s"], readable, "s")
        loop.add_signal_handler(sig.SIGUSR1, report)

        def control() -> None:
            line = sys.stdin.readline()
            if not line:  # our parent is gone: stop
                loop.stop()
                return
            try:
                cfg[:] = parse_impairment(line.strip())
                print("ok", flush=True)
            except (ValueError, IndexError) as exc:
                print(f"error {exc}", flush=True)

        loop.add_reader(sys.stdin.fileno(), control)
        print("ready", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(main())
    except RuntimeError:  # loop.stop() from control(): stdin closed
        pass


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "wire":
    run_wire(*sys.argv[2:7])
