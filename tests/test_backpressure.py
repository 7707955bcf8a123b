"""Backpressure end to end: a slow reader behind a forward keeps wraith's memory flat."""

from __future__ import annotations

import asyncio
import time

import pytest

from helpers import GENERIC_PUMP_ENV, GENERIC_PUMP_MARK, Keys, start_client, start_server


def rss_mib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) >> 10
    raise AssertionError("no VmRSS")


def test_slow_reader_bounded_memory(keys: Keys, tmp_path, procs) -> None:
    """The target sends as fast as it can; the local reader takes ~25 MB/s for 8 s.

    Regression: asyncssh re-grants the whole window when a paused channel resumes, so a
    relay that paused again mid-flush let ~a window per cycle pile up (RSS grew ~1 MiB per
    MiB read)."""

    async def main() -> None:
        async def source(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            chunk = bytes(1 << 20)
            try:
                for _ in range(2000):
                    w.write(chunk)
                    await w.drain()
            except ConnectionError:
                pass
            w.close()

        srv = await asyncio.start_server(source, "127.0.0.1", 0)
        tport = srv.sockets[0].getsockname()[1]
        server, sport = await asyncio.to_thread(start_server, keys, tmp_path)
        procs.append(server)
        client, _ = await asyncio.to_thread(start_client, keys, tmp_path, sport,
                                             "--forward", f"127.0.0.1:0:127.0.0.1:{tport}")
        procs.append(client)
        lport = int(client.wait_line(r"forward listening 127\.0\.0\.1:(\d+)$").group(1))
        reader, writer = await asyncio.open_connection("127.0.0.1", lport, limit=65536)
        got = 0
        t0 = time.monotonic()
        base = None
        while time.monotonic() - t0 < 8:
            data = await reader.read(65536)
            assert data
            got += len(data)
            await asyncio.sleep(0.002)
            if base is None and got > (16 << 20):
                base = rss_mib(client.p.pid), rss_mib(server.p.pid)
        end = rss_mib(client.p.pid), rss_mib(server.p.pid)
        writer.close()
        srv.close()
        assert base is not None and got > (100 << 20), got
        print(f"read {got >> 20} MiB slowly; RSS client {base[0]}->{end[0]} MiB, server {base[1]}->{end[1]} MiB")
        assert end[0] - base[0] < 40 and end[1] - base[1] < 40

    asyncio.run(main())


@pytest.mark.parametrize("pump", ["fused", "generic"])
def test_a_peer_that_stops_reading_cannot_grow_the_server(keys: Keys, tmp_path, procs, pump: str) -> None:
    """An SSH client grants a huge window (2^31, plus adjusts that would pass 2^32 - 1),
    opens a channel to a target that sends as fast as it can, then stops reading its TCP
    socket. The server must stop reading the target once the connection's own send buffer
    is full — before, the window was the only limit, and RSS grew by ~470 MB per channel."""
    import asyncssh
    from asyncssh.constants import MSG_CHANNEL_WINDOW_ADJUST
    from asyncssh.packet import UInt32

    async def main() -> None:
        async def firehose(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            chunk = bytes(1 << 20)
            try:
                for _ in range(4000):
                    w.write(chunk)
                    await w.drain()
            except ConnectionError:
                pass
            w.close()

        srv = await asyncio.start_server(firehose, "127.0.0.1", 0)
        tport = srv.sockets[0].getsockname()[1]
        env = GENERIC_PUMP_ENV if pump == "generic" else None
        server, sport = await asyncio.to_thread(start_server, keys, tmp_path, env=env)
        procs.append(server)
        assert (GENERIC_PUMP_MARK in server.log()) == (pump == "generic")
        conn = await asyncssh.connect("127.0.0.1", sport, username="u", client_keys=[str(keys.client)],
                                      known_hosts=None, encryption_algs=["aes128-gcm@openssh.com"])
        try:
            base = rss_mib(server.p.pid)

            class Quiet(asyncssh.SSHTCPSession[bytes]):
                def data_received(self, data: bytes, datatype: object) -> None:
                    pass

            chan, _ = await conn.create_connection(Quiet, "127.0.0.1", tport, window=1 << 31,
                                                   max_pktsize=1 << 18, encoding=None)
            conn._transport.pause_reading()  # the peer stops reading its TCP socket
            for _ in range(4):  # legal one by one, but the sum passes 2^32 - 1
                conn.send_packet(MSG_CHANNEL_WINDOW_ADJUST, UInt32(chan._send_chan), UInt32(1 << 31))
            peak = base
            for _ in range(12):
                await asyncio.sleep(0.25)
                peak = max(peak, rss_mib(server.p.pid))
            assert peak - base < 64, f"server RSS grew by {peak - base} MiB"
        finally:
            conn.abort()
            srv.close()
        assert "Traceback" not in server.log()

    asyncio.run(main())



async def test_a_server_that_stops_reading_cannot_grow_the_client(keys: Keys) -> None:
    """A hostile server stops reading its socket and floods requests that want a reply:
    the client answers each into its send buffer (no relay feeds it, so nothing pauses).
    Past REPLY_STOP answers over the buffer's mark the client reads the server no more,
    instead of growing without bound; then, reading nothing, it gets no keepalive answer
    and drops the connection."""
    import asyncssh
    from asyncssh.constants import MSG_GLOBAL_REQUEST
    from asyncssh.packet import Boolean, String

    from wraith_core.options import ConnectOptions
    from wraith_core.ssh import backlog
    from wraith_core.ssh.client import Session

    conns: list[asyncssh.SSHServerConnection] = []

    class Hostile(asyncssh.SSHServer):
        def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
            conns.append(conn)

    srv = await asyncssh.create_server(Hostile, "127.0.0.1", 0, server_host_keys=[str(keys.host)],
                                       authorized_client_keys=str(keys.authorized))
    port = srv.sockets[0].getsockname()[1]
    session = Session(ConnectOptions(server=f"127.0.0.1:{port}", identity=str(keys.client),
                                     host_key=str(keys.host_pub)), reconnect=False)
    await session.start()
    try:
        conn = await session.connection(timeout=10)
        peer = conns[-1]
        peer._transport.pause_reading()  # never reads the client's answers again
        most = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 40  # keepalive: 5 s, twice, after the client stops reading
        while not conn.is_closed() and loop.time() < deadline:
            if peer._transport is not None and peer._transport.get_write_buffer_size() < 8 << 20:
                for _ in range(2000):
                    peer.send_packet(MSG_GLOBAL_REQUEST, String(b"x"), Boolean(True))
            if conn._transport is not None:  # type: ignore[attr-defined]
                most = max(most, conn._transport.get_write_buffer_size())  # type: ignore[attr-defined]
            await asyncio.sleep(0.01)
        assert conn.is_closed(), "the client kept the connection of a server that reads nothing"
        assert most < backlog.CONN_HIGH + (4 << 20), f"the client buffered {most >> 20} MiB of answers"
    finally:
        await session.close()
        srv.close()
