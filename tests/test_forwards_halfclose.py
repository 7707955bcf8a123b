"""--forward / --remote-forward with curl, and half-close in both directions under load."""

from __future__ import annotations

import asyncio
import hashlib
import os


import pytest

from helpers import (GENERIC_PUMP_ENV, GENERIC_PUMP_MARK, Keys, curl, free_port, sha, socks_connect, start_client,
                     start_server, wait_for_log)

# "fused": the default relay (SocketChannel); "generic": asyncssh's channel + relay.RelayEnd,
# the path taken when the fused one cannot apply (tests/fallback/sitecustomize.py)
PUMPS = pytest.mark.parametrize("pump", ["fused", "generic"])


def _env(pump: str) -> dict[str, str] | None:
    return GENERIC_PUMP_ENV if pump == "generic" else None


@PUMPS
def test_local_and_remote_forwards(keys: Keys, files, tmp_path, procs, pump: str) -> None:
    server, sport = start_server(keys, tmp_path, env=_env(pump))
    procs.append(server)
    lport, rport = free_port(), free_port()
    client, _ = start_client(keys, tmp_path, sport,
                             "--forward", f"127.0.0.1:{lport}:localhost:{files.port}",
                             "--remote-forward", f"{rport}:127.0.0.1:{files.port}", env=_env(pump))
    procs.append(client)
    assert (GENERIC_PUMP_MARK in server.log() + client.log()) == (pump == "generic")
    wait_for_log(client, "remote forward up")
    for port in (lport, rport):
        for name in ("small.bin", "big.bin", "empty.bin"):
            r = curl(f"http://127.0.0.1:{port}/{name}")
            assert r.returncode == 0, r.stderr
            assert sha(r.stdout) == files.hashes[name]
    # a forward whose target is down: the local connection is reset, not left hanging
    dead = free_port()
    client2, _ = start_client(keys, tmp_path, sport, "--forward", f"{free_port()}:127.0.0.1:{dead}", name="c2")
    procs.append(client2)
    fport = int(client2.wait_line(r"forward listening .*:(\d+)$").group(1))
    r = curl(f"http://127.0.0.1:{fport}/")
    assert r.returncode in (52, 56), r  # empty reply / recv failure: the connection was closed


async def _half_close_round(socks: int, port: int, payload: bytes) -> None:
    # client -> target, then EOF; the target answers only after seeing EOF
    reader, writer = await socks_connect(socks, "127.0.0.1", port)
    writer.write(b"U" + payload)
    await writer.drain()
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 30)
    assert answer == hashlib.sha256(payload).digest() + payload[::-1]
    writer.close()


async def _reverse_half_close_round(socks: int, port: int, payload: bytes) -> None:
    # target -> client, then the target's EOF; the client keeps sending afterwards
    reader, writer = await socks_connect(socks, "127.0.0.1", port)
    writer.write(b"D")
    await writer.drain()
    got = await asyncio.wait_for(reader.read(), 30)  # ends at the target's EOF
    assert got == payload
    writer.write(payload[::-1])  # still writable after the peer's EOF
    await writer.drain()
    writer.write_eof()
    verdict = await asyncio.wait_for(reader.read(), 30)
    assert verdict == b""  # stream fully closed after EOF both ways
    writer.close()


@PUMPS
def test_half_close_both_directions_under_load(keys: Keys, tmp_path, procs, pump: str) -> None:
    server, sport = start_server(keys, tmp_path, env=_env(pump))
    procs.append(server)
    client, socks = start_client(keys, tmp_path, sport)
    procs.append(client)
    results: list[bytes] = []

    async def main() -> None:
        async def target(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            mode = await r.readexactly(1)
            if mode == b"U":
                data = await r.read()  # until EOF
                w.write(hashlib.sha256(data).digest() + data[::-1])
                await w.drain()
                w.close()
            else:
                w.write(payloads[0])
                await w.drain()
                w.write_eof()
                rest = await r.read()
                results.append(rest)
                w.close()

        payloads = [os.urandom(300_000)]
        srv = await asyncio.start_server(target, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        for _ in range(3):
            await asyncio.gather(*[_half_close_round(socks, port, os.urandom(200_000)) for _ in range(15)],
                                 *[_reverse_half_close_round(socks, port, payloads[0]) for _ in range(15)])
        for _ in range(100):  # the target may see the final EOF a moment after the client is done
            if len(results) == 45:
                break
            await asyncio.sleep(0.05)
        srv.close()
        assert len(results) == 45 and all(r == payloads[0][::-1] for r in results)

    asyncio.run(main())


@PUMPS
def test_echo_with_early_eof_loses_nothing(keys: Keys, tmp_path, procs, pump: str) -> None:
    """Write a lot and EOF at once to an echo target: the echo and its EOF arrive whole.

    Here the target's EOF reaches wraith serve while the echoed bytes still wait for SSH
    window; closing the channel then must not drop that EOF (nor reset the stream)."""
    server, sport = start_server(keys, tmp_path, env=_env(pump))
    procs.append(server)
    client, socks = start_client(keys, tmp_path, sport)
    procs.append(client)

    async def main() -> None:
        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(1 << 16):
                w.write(data)
                await w.drain()
            w.close()

        srv = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]

        async def one() -> None:
            reader, writer = await socks_connect(socks, "127.0.0.1", port)
            data = os.urandom(12 * 1024 * 1024)

            async def send() -> None:
                writer.write(data)
                writer.write_eof()
                await writer.drain()

            async def slow_read() -> bytes:  # a slow reader keeps the SSH window exhausted
                got = bytearray()
                while part := await reader.read(256 * 1024):
                    got += part
                    await asyncio.sleep(0.01)
                return bytes(got)

            t = asyncio.ensure_future(send())
            back = await asyncio.wait_for(slow_read(), 60)
            await t
            assert len(back) == len(data) and sha(back) == sha(data)
            writer.close()

        await asyncio.gather(*[one() for _ in range(4)])
        srv.close()

    asyncio.run(main())


def test_forward_to_a_refused_target_resets_the_connection(keys: Keys, tmp_path, procs) -> None:
    """-L (and -R) to a target that refuses: the application sees a reset, not an empty stream
    that looks like a clean end — with and without bytes sent first."""
    import socket

    server, sport = start_server(keys, tmp_path)
    procs.append(server)
    lport, rport, dead = free_port(), free_port(), free_port()
    client, _ = start_client(keys, tmp_path, sport, "--forward", f"{lport}:127.0.0.1:{dead}",
                             "--remote-forward", f"{rport}:127.0.0.1:{dead}")
    procs.append(client)
    wait_for_log(client, "remote forward up")
    for port in (lport, rport):
        for first in (b"", b"hello"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                if first:
                    s.sendall(first)
                try:
                    got = s.recv(100)
                except ConnectionResetError:
                    continue
                raise AssertionError(f"port {port}: {got!r} instead of a reset")
