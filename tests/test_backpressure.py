"""Backpressure end to end: a slow reader behind a forward keeps wraith's memory flat."""

from __future__ import annotations

import asyncio
import time

from helpers import Keys, start_client, start_server


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
