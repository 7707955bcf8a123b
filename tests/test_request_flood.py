"""An authenticated client that floods requests wanting replies and never reads them.

Each request costs the server a reply. Such a peer used to make the server queue every reply
as its own object (~400 bytes of memory for a 36-byte packet), and each of its reads (thousands
of small packets) was handled in one go, with asyncssh copying the rest of the read once per
packet: other users' connections stalled for seconds. Then replies waited joined (~36 bytes
each), up to 256 MiB per connection. Now, with the send buffer over its mark, the peer is not
read once 20,000 replies wait (TCP holds it back), and, reading nothing, it answers no
keepalive: it is dropped. A read is handled a few hundred packets per loop pass."""

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
REQUESTS = 1_000_000  # past what the kernel's socket buffers on both ends hold, ~10 MB of replies


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
            while sent < REQUESTS and conn._transport is not None:  # (until it is dropped)
                for _ in range(2000):
                    conn.send_packet(MSG_CHANNEL_REQUEST, *request)
                sent += 2000
                backed_up = conn._transport is None or conn._transport.get_write_buffer_size() > 8 << 20
                await asyncio.sleep(0.05 if backed_up else 0.001)
            await asyncio.sleep(1)  # the server works through what it has read
        grown_mib = (rss_kib(server.p.pid) - base) / 1024
        # 1M replies of ~36 bytes: ~36 MiB as bytes (~400 MiB as one object each); read no more
        # after 20,000 of them past the 4 MiB mark
        assert grown_mib < 24, f"server memory grew {grown_mib:.0f} MiB for {sent} unread replies"
        assert "SSH peer asks for replies and does not read them" in server.log()
        async with asyncio.timeout(30):  # reading nothing, it answers no keepalive (5 s, twice)
            while conn._transport is not None and not conn._transport.is_closing():
                await asyncio.sleep(0.2)
        user.cancel()
        conn.abort()
        check_good(good, at_least=3)  # (its bound: no transfer took 5 s or more)
    finally:
        echo.kill()
        echo.wait(5)


class _TLSTunnel:
    def __init__(self, ctx: object) -> None:
        self.ctx = ctx

    async def create_connection(self, factory, host, port):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().create_connection(factory, host, port, ssl=self.ctx,
                                                                  server_hostname="localhost")


@pytest.mark.parametrize("transport", ["tcp", "tls"])
async def test_a_burst_then_the_peers_fin_is_all_delivered(keys: Keys, tmp_path: Path, procs: list,
                                                           transport: str) -> None:
    """A peer sends thousands of small data packets and then its FIN (a killed client: no SSH
    close). The server handles a few hundred packets per loop pass; over TLS the rest used to
    be dropped at the FIN (a paused TLS transport ends without handing over what it holds):
    ~65 % of what the server had received never reached the target."""
    import os
    import signal
    import socket
    import ssl

    from transport_helpers import Certs, tls_server_args

    extra: list[str] = []
    tunnel = None
    if transport == "tls":
        certs = Certs.make(tmp_path / "certs")
        extra = tls_server_args(certs)
        tunnel = _TLSTunnel(ssl.create_default_context(cafile=str(certs.ca)))
    server, sport = start_server(keys, tmp_path, *extra)
    procs.append(server)
    got = [0]
    done = asyncio.Event()

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                got[0] += len(data)
        except ConnectionError:
            pass
        done.set()
        w.close()

    target = await asyncio.start_server(sink, "127.0.0.1", 0)
    tport = target.sockets[0].getsockname()[1]
    packets, size = 3000, 40
    try:
        conn = await asyncssh.connect("127.0.0.1", sport, tunnel=tunnel, username="u", client_keys=[str(keys.client)],
                                      known_hosts=None, agent_path=None, config=None,
                                      encryption_algs=["aes128-gcm@openssh.com"])
        _, w = await conn.open_connection("127.0.0.1", tport)
        await asyncio.sleep(0.3)
        os.kill(server.p.pid, signal.SIGSTOP)  # busy elsewhere: the burst and the FIN arrive together
        try:
            for _ in range(packets):
                w.write(b"x" * size)
            raw = conn._transport  # type: ignore[attr-defined]
            while raw.get_write_buffer_size():
                await asyncio.sleep(0.001)
            raw.get_extra_info("socket").shutdown(socket.SHUT_WR)
            await asyncio.sleep(0.2)
        finally:
            os.kill(server.p.pid, signal.SIGCONT)
        await asyncio.wait_for(done.wait(), 20)
        assert got[0] == packets * size
        conn.abort()
    finally:
        target.close()
