"""Impaired network: wraith serve and wraith connect in two network namespaces joined by a lossy,
delayed (and reordering) link; multi-MB transfers both ways complete with intact hashes.

The link is tests/netns.py's userspace netem (this kernel has no sch_netem); the test checks
that the impairment is really there (round trip >= 2 x delay, packets dropped) so it cannot
pass on a clean link by accident.
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

from helpers import PY, Keys, wraith
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
def impaired(request: pytest.FixtureRequest, keys: Keys, tmp_path: Path) -> Iterator[tuple[NetPair, str, bytes, int]]:
    spec, _ = CASES[request.param]
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
                                             "--socks5", f"127.0.0.1:{SOCKS_PORT}"), "connect",
                          ready="socks5 listening")
        net.wait_port(net.server, "127.0.0.1", HTTP_PORT)
        deadline = time.monotonic() + 20
        while "session up" not in client.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "session up" in client.log(), client.log()[-2000:]
        yield net, request.param, data, tport
    finally:
        net.destroy()
        assert not any(ns in leftover_namespaces() for ns in (net.client, net.server))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impaired", list(CASES), indirect=True)
def test_transfers_intact_under_impairment(impaired: tuple[NetPair, str, bytes, int]) -> None:
    net, case, data, tport = impaired
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
