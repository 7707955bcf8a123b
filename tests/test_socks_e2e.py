"""wraith connect -> wraith serve through the SOCKS5 port, with real curl and real processes."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from helpers import (GENERIC_PUMP_ENV, GENERIC_PUMP_MARK, HTTPFiles, Keys, curl, free_port, sha, start_client,
                     start_server)


@pytest.fixture(params=["fused", "generic"])
def tunnel(request, keys: Keys, tmp_path, procs):
    """``fused``: the server's default relay (SocketChannel); ``generic``: the server dials
    through asyncssh's channel and relay.RelayEnd, its path when the fused one cannot apply."""
    generic = request.param == "generic"
    server, sport = start_server(keys, tmp_path, env=GENERIC_PUMP_ENV if generic else None)
    assert (GENERIC_PUMP_MARK in server.log()) == generic
    procs.append(server)
    client, socks = start_client(keys, tmp_path, sport)
    procs.append(client)
    return server, client, socks


@pytest.mark.parametrize("mode", ["--socks5-hostname", "--socks5"])
def test_curl_through_socks_hashes(tunnel, files: HTTPFiles, mode: str) -> None:
    _, _, socks = tunnel
    for name in ("small.bin", "big.bin", "empty.bin"):
        r = curl(mode, f"127.0.0.1:{socks}", files.url(name, "localhost" if mode.endswith("hostname") else None))
        assert r.returncode == 0, r.stderr
        assert sha(r.stdout) == files.hashes[name]


def test_ipv6_target(tunnel, tmp_path) -> None:
    _, _, socks = tunnel
    f = HTTPFiles(tmp_path / "www6", {"six.bin": 300_000}, host="::1")
    try:
        r = curl("--socks5", f"127.0.0.1:{socks}", f.url("six.bin"))
        assert r.returncode == 0, r.stderr
        assert sha(r.stdout) == f.hashes["six.bin"]
    finally:
        f.stop()


def _socks_reply(socks: int, host: str, port: int) -> int:
    """Send a raw SOCKS5 CONNECT for a domain name and return the reply code."""
    with socket.create_connection(("127.0.0.1", socks), timeout=15) as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        name = host.encode()
        s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", port))
        reply = s.recv(10)
        assert reply[0] == 5
        if reply[1] != 0:
            # a failed CONNECT is followed by a close, never by an empty "success" stream
            s.settimeout(5)
            assert s.recv(1) == b""
        return reply[1]


def test_failure_reply_codes(tunnel) -> None:
    _, _, socks = tunnel
    dead = free_port()
    assert _socks_reply(socks, "127.0.0.1", dead) == 0x05          # refused
    assert _socks_reply(socks, "no-such-host.invalid", 80) == 0x04  # DNS failure on the server
    assert _socks_reply(socks, "wraith-control", 1) == 0x02         # reserved: not allowed
    assert _socks_reply(socks, "wraith-anything", 80) == 0x02


def test_unsupported_command_and_atyp(tunnel) -> None:
    _, _, socks = tunnel
    with socket.create_connection(("127.0.0.1", socks), timeout=5) as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50")  # BIND
        assert s.recv(10)[:2] == b"\x05\x07"
    with socket.create_connection(("127.0.0.1", socks), timeout=5) as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x09\x00\x50")  # unknown address type
        assert s.recv(10)[:2] == b"\x05\x08"


async def _greeter_roundtrip(socks: int, host: str, port: int, greeting: bytes) -> bytes:
    from helpers import socks_connect

    reader, writer = await socks_connect(socks, host, port)
    data = await asyncio.wait_for(reader.readexactly(len(greeting)), 10)
    writer.close()
    return data


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])  # connected at once / dialed by name
def test_target_that_speaks_first(tunnel, host: str) -> None:
    """A target that writes on accept (like SSH/SMTP) delivers its greeting every time."""
    _, _, socks = tunnel
    greeting = bytes(range(256)) * 64  # 16 KiB, sent before the client says anything

    async def main() -> None:
        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(greeting)
            await w.drain()
            w.close()

        srv = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        for batch in range(10):
            got = await asyncio.gather(*[_greeter_roundtrip(socks, host, port, greeting) for _ in range(20)])
            assert all(sha(g) == sha(greeting) for g in got), f"batch {batch}"
        srv.close()

    asyncio.run(main())


@pytest.mark.parametrize("size", [5000, 3 << 20])
def test_request_data_and_eof_in_one_go(tunnel, size: int) -> None:
    """A client that pipelines greeting + request + payload + FIN before any reply still gets its
    answer (3 MiB: more than the listener holds before the reply, so reading pauses and resumes)."""
    _, _, socks = tunnel
    import hashlib
    import threading

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    port = lsock.getsockname()[1]

    def target() -> None:
        conn, _ = lsock.accept()
        data = b""
        while part := conn.recv(65536):
            data += part
        conn.sendall(hashlib.sha256(data).digest())
        conn.close()

    threading.Thread(target=target, daemon=True).start()
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    with socket.create_connection(("127.0.0.1", socks), timeout=10) as s:
        s.sendall(b"\x05\x01\x00" + b"\x05\x01\x00\x01\x7f\x00\x00\x01" + struct.pack(">H", port) + payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while part := s.recv(65536):
            got += part
    assert got[:12] == b"\x05\x00" + b"\x05\x00\x00\x01" + bytes(6)
    assert got[12:] == hashlib.sha256(payload).digest()
    lsock.close()


def test_socks5_auth_with_curl(keys: Keys, tmp_path, procs, files: HTTPFiles) -> None:
    """--socks5-auth (RFC 1929): curl with the right user:pass gets through; a wrong password
    or no credentials gets no tunnel; the password is never logged."""
    server, sport = start_server(keys, tmp_path)
    procs.append(server)
    client, socks = start_client(keys, tmp_path, sport, "--socks5-auth", "alice:s3cret-pw")
    procs.append(client)
    r = curl("--socks5-hostname", f"127.0.0.1:{socks}", "--proxy-user", "alice:s3cret-pw",
             files.url("small.bin", "localhost"))
    assert r.returncode == 0, r.stderr
    assert sha(r.stdout) == files.hashes["small.bin"]
    for extra in (["--proxy-user", "alice:wrong"], ["--proxy-user", "bob:s3cret-pw"], []):
        r = curl("--socks5-hostname", f"127.0.0.1:{socks}", *extra, files.url("small.bin", "localhost"))
        assert r.returncode != 0 and not r.stdout, (extra, r.stderr)
    # the listener still works after the refusals
    r = curl("--socks5-hostname", f"127.0.0.1:{socks}", "--proxy-user", "alice:s3cret-pw",
             files.url("small.bin", "localhost"))
    assert sha(r.stdout) == files.hashes["small.bin"]
    assert "s3cret" not in client.log() and "s3cret" not in server.log()
