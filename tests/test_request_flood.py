"""An authenticated client that floods requests wanting replies and never reads them.

Each request costs the server a reply. Such a peer used to make the server queue every reply
as its own object (~400 bytes of memory for a 36-byte packet), and each of its reads (thousands
of small packets) was handled in one go, with asyncssh copying the rest of the read once per
packet: other users' connections stalled for seconds. Now replies wait joined (~36 bytes each,
until the connection is dropped at CONN_ABORT) and a read is handled a few hundred packets per
loop pass."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import asyncssh
import pytest
from asyncssh.constants import MSG_CHANNEL_REQUEST
from asyncssh.packet import Boolean, String, UInt32

from helpers import PY, Keys, start_client, start_server
from test_hostile import check_good, good_client

HERE = Path(__file__).parent
REQUESTS = 300_000


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.timeout(120)
async def test_requests_never_read_cost_little_and_stall_no_one(keys: Keys, tmp_path: Path, procs: list) -> None:
    server, sport = start_server(keys, tmp_path)
    procs.append(server)
    client, socks = start_client(keys, tmp_path, sport)
    procs.append(client)
    echo = subprocess.Popen([PY, str(HERE / "loadgen.py"), "target", "0"], stdout=subprocess.PIPE)
    try:
        assert echo.stdout is not None
        eport = int(echo.stdout.readline().split()[1])
        conn = await asyncssh.connect("127.0.0.1", sport, username="u", client_keys=[str(keys.client)],
                                      known_hosts=None, encryption_algs=["aes128-gcm@openssh.com"],
                                      agent_path=None, config=None)
        chan, _ = await conn.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", eport)
        base = rss_kib(server.p.pid)
        conn._transport.pause_reading()  # never reads the replies
        request = (UInt32(chan._send_chan), String(b"x"), Boolean(True))
        loop = asyncio.get_running_loop()
        good: list[tuple[bool, float, str]] = []
        user = asyncio.create_task(good_client(socks, eport, loop.time() + 3600, good))
        sent = 0
        async with asyncio.timeout(90):
            while sent < REQUESTS:
                for _ in range(2000):
                    conn.send_packet(MSG_CHANNEL_REQUEST, *request)
                sent += 2000
                backed_up = conn._transport.get_write_buffer_size() > 8 << 20
                await asyncio.sleep(0.05 if backed_up else 0.001)
            await asyncio.sleep(1)  # the server works through what it has read
        grown_mib = (rss_kib(server.p.pid) - base) / 1024
        user.cancel()
        conn.abort()
        # 300k replies of ~36 bytes: ~10 MiB as bytes, ~115 MiB as one object each
        assert grown_mib < 48, f"server memory grew {grown_mib:.0f} MiB for {sent} unread replies"
        check_good(good, at_least=3)  # (its bound: no transfer took 5 s or more)
    finally:
        echo.kill()
        echo.wait(5)
