"""Impaired network: wraith serve and wraith connect in two network namespaces joined by a lossy,
delayed (and reordering) link; multi-MB transfers both ways complete with intact hashes.

The link is tests/netns.py's userspace netem (this kernel has no sch_netem); the test checks
that the impairment is really there (round trip >= 2 x delay, packets dropped) so it cannot
pass on a clean link by accident. A second test black-holes the link (every packet dropped, no
RST/FIN): keepalives must notice, SOCKS5 requests must fail properly meanwhile, and the session
must come back by itself when the link does.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import PY, Keys, Proc, wraith
from netns import SERVER_ADDR, NetPair, leftover_namespaces

HERE = Path(__file__).resolve().parent
SSH_PORT, SOCKS_PORT, HTTP_PORT = 2222, 1080, 8080
DOWN_SIZE = 6 * 1024 * 1024
ECHO_STREAMS, ECHO_SIZE = 64, 64 * 1024

CASES = {
    # spec, the least median round trip it must show (reordered packets skip the delay)
    "loss2-delay50": ("delay 50ms loss 2%", 0.09),
    "loss1-reorder": ("delay 20ms loss 1% reorder 25%", 0.018),
}
# the black-hole test: a clean 10 ms link that then drops everything; keepalive every 2 s, 3 missed
BLACKHOLE = {"blackhole": ("delay 10ms", 0.018)}
KEEPALIVE = ["--keepalive-interval", "2", "--keepalive-count-max", "3"]

SOCKS_DURING_OUTAGE = """
import socket, struct, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
t0 = time.monotonic()
s.sendall(b"\\x05\\x01\\x00\\x05\\x01\\x00\\x01\\x7f\\x00\\x00\\x01" + struct.pack(">H", int(sys.argv[2])))
got = b""
while len(got) < 12:
    part = s.recv(12 - len(got))
    if not part:
        break
    got += part
print(got.hex(), round(time.monotonic() - t0, 2))
"""

RTT_PROBE = """
import socket, statistics, sys, time
rtts = []
for _ in range(7):
    t0 = time.monotonic()
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
    rtts.append(time.monotonic() - t0)
print(statistics.median(rtts))
"""


@pytest.fixture
def impaired(request: pytest.FixtureRequest, keys: Keys, tmp_path: Path
             ) -> Iterator[tuple[NetPair, str, bytes, int, Proc]]:
    spec, _ = {**CASES, **BLACKHOLE}[request.param]
    extra = KEEPALIVE if request.param in BLACKHOLE else []
    www = tmp_path / "www"
    www.mkdir()
    data = os.urandom(DOWN_SIZE)
    (www / "down.bin").write_bytes(data)
    net = NetPair(tmp_path, spec)
    try:
        net.create()
        net.popen(net.server, [PY, "-m", "http.server", str(HTTP_PORT), "--bind", "127.0.0.1",
                               "--directory", str(www)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = net.popen(net.server, [PY, str(HERE / "loadgen.py"), "target", "0"], stdout=subprocess.PIPE)
        assert target.stdout is not None
        tport = int(target.stdout.readline().split()[1])
        net.proc(net.server, wraith("serve", "--key", str(keys.host), "--authorized-keys", str(keys.authorized),
                                    "--listen", f"{SERVER_ADDR}:{SSH_PORT}"), "serve", ready=r"listening")
        client = net.proc(net.client, wraith("connect", "--server", f"{SERVER_ADDR}:{SSH_PORT}",
                                             "--identity", str(keys.client), "--host-key", str(keys.host_pub),
                                             "--socks5", f"127.0.0.1:{SOCKS_PORT}", *extra), "connect",
                          ready="socks5 listening")
        net.wait_port(net.server, "127.0.0.1", HTTP_PORT)
        deadline = time.monotonic() + 20
        while "session up" not in client.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "session up" in client.log(), client.log()[-2000:]
        yield net, request.param, data, tport, client
    finally:
        net.destroy()
        assert not any(ns in leftover_namespaces() for ns in (net.client, net.server))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impaired", list(CASES), indirect=True)
def test_transfers_intact_under_impairment(impaired: tuple[NetPair, str, bytes, int, Proc]) -> None:
    net, case, data, tport, _ = impaired
    spec, min_rtt = CASES[case]
    # the impairment is real: the path's median round trip is about 2 x the one-way delay
    probe = net.run(net.client, [PY, "-c", RTT_PROBE, SERVER_ADDR, str(SSH_PORT)], timeout=30)
    assert probe.returncode == 0, probe.stderr
    rtt = float(probe.stdout)
    assert rtt >= min_rtt, f"round trip {rtt * 1e3:.1f} ms: impairment {spec!r} not in effect"

    t0 = time.monotonic()
    # a 6 MiB download (curl, SOCKS5h) and 64 concurrent echo streams of 64 KiB each (upload + download,
    # hashed both ways) at the same time, all over the one SSH session on the impaired link
    down = net.popen(net.client, ["curl", "-sS", "--max-time", "40", "--socks5-hostname", f"127.0.0.1:{SOCKS_PORT}",
                                  f"http://localhost:{HTTP_PORT}/down.bin"], stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
    echo = net.run(net.client, [PY, str(HERE / "loadgen.py"), "streams", str(SOCKS_PORT), str(tport),
                                str(ECHO_STREAMS), str(ECHO_SIZE)], timeout=45)
    body, err = down.communicate(timeout=45)
    elapsed = time.monotonic() - t0

    assert down.returncode == 0, err.decode(errors="replace")
    assert len(body) == len(data)
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
    assert echo.returncode == 0, echo.stderr.decode(errors="replace")[-2000:]
    res = json.loads(echo.stdout)
    assert res["ok"] == ECHO_STREAMS and res["bad"] == 0, res

    stats = net.wire_stats()
    assert stats.get("dropped", 0) > 0, f"no packet was dropped: {stats}"
    if "reorder" in spec:
        assert stats.get("reordered", 0) > 0, stats
    moved = len(data) + 2 * ECHO_STREAMS * ECHO_SIZE
    print(f"\n{case}: rtt {rtt * 1e3:.0f} ms, {moved / 2**20:.1f} MiB in {elapsed:.1f} s "
          f"({moved / elapsed / 1e6:.2f} MB/s), wire {stats}", file=sys.stderr)


def _echo_ok(net: NetPair, tport: int) -> None:
    r = net.run(net.client, [PY, str(HERE / "loadgen.py"), "streams", str(SOCKS_PORT), str(tport), "4", "65536"],
                timeout=30)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    res = json.loads(r.stdout)
    assert res["ok"] == 4, res


def _wait_log(p: Proc, text: str, count: int, timeout: float) -> float:
    t0 = time.monotonic()
    while p.log().count(text) < count and time.monotonic() - t0 < timeout:
        time.sleep(0.05)
    assert p.log().count(text) >= count, f"no {text!r} x{count} within {timeout}s:\n{p.log()[-2000:]}"
    return time.monotonic() - t0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impaired", list(BLACKHOLE), indirect=True)
def test_blackhole_detected_and_recovered(impaired: tuple[NetPair, str, bytes, int, Proc]) -> None:
    """The link silently drops everything (no RST, no FIN): keepalives notice within
    interval x count (+ slack); a SOCKS5 request meanwhile gets a failure reply, not a hang;
    once the link is back the client reconnects by itself and streams work again."""
    net, _, _, tport, client = impaired
    _echo_ok(net, tport)
    net.set_impairment("delay 10ms loss 100%")
    detect = _wait_log(client, "session lost", 1, timeout=20)
    assert detect <= 2 * 3 + 6, f"black hole noticed after {detect:.1f} s"
    r = net.run(net.client, [PY, "-c", SOCKS_DURING_OUTAGE, str(SOCKS_PORT), str(tport)], timeout=40)
    assert r.returncode == 0, r.stderr
    reply, waited = r.stdout.decode().split()
    # method selection 05 00, then a CONNECT reply 05 <code> with a failure code
    assert reply[:6] == "050005" and reply[6:8] not in ("00", ""), f"reply {reply} during the outage"
    assert float(waited) <= 15, waited
    net.set_impairment("delay 10ms")
    recover = _wait_log(client, "session up", 2, timeout=30)
    _echo_ok(net, tport)
    print(f"\nblack hole noticed after {detect:.1f} s (keepalive 2 s x 3); SOCKS5 during the outage: "
          f"reply code {reply[6:8]} after {waited} s; session back {recover:.1f} s after the link", file=sys.stderr)
