"""Proxy chaining through real proxies: Debian's microsocks (SOCKS5) and tinyproxy (HTTP CONNECT).

Client ``--proxy`` carries the tcp/tls transport connection; server ``--proxy``
carries the outbound target connections. The proxies' own logs prove the
traffic went through them; a dead proxy means no tunnel, never a direct one.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

from helpers import Keys, curl, free_port, sha, start_client, start_server, wait_for_log
from transport_helpers import Certs, Microsocks, Tinyproxy, tls_server_args, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def microsocks(tmp_path):
    m = Microsocks(tmp_path)
    yield m
    m.stop()


@pytest.fixture
def tinyproxy(tmp_path):
    t = Tinyproxy(tmp_path)
    yield t
    t.stop()


def _server(keys: Keys, tmp_path, transport: str, procs, *extra: str) -> tuple[object, int, list[str]]:
    client_args: list[str] = ["--transport", transport]
    server_args: list[str] = list(extra)
    if transport == "tls":
        certs = Certs.make(tmp_path / "certs")
        server_args += tls_server_args(certs)
        client_args += ["--tls-ca", str(certs.ca)]
    server, port = start_server(keys, tmp_path, *server_args)
    procs.append(server)
    return server, port, client_args


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_client_via_socks5_proxy(keys, files, tmp_path, procs, microsocks, transport: str) -> None:
    server, sport, cargs = _server(keys, tmp_path, transport, procs)
    client, socks = start_client(keys, tmp_path, sport, *cargs, "--proxy", microsocks.url)
    procs.append(client)
    for name in ("small.bin", "big.bin"):
        r = curl("--socks5-hostname", f"127.0.0.1:{socks}", files.url(name))
        assert sha(r.stdout) == files.hashes[name], r.stderr
    # the transport connection went through microsocks, and only the transport connection
    assert len(microsocks.connections(sport)) == 1, microsocks.connections()
    assert server.log().count("connection opened") == 1

    # the proxy dies: the session drops and is NOT re-established around it
    microsocks.stop()
    wait_for_log(client, "session lost", timeout=20)
    wait_for_log(client, "cannot reach proxy", timeout=20)
    assert "session up" not in client.log().split("session lost", 1)[1]
    assert server.log().count("connection opened") == 1, "a connection bypassed the dead proxy"


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_client_via_http_connect_proxy(keys, files, tmp_path, procs, tinyproxy, transport: str) -> None:
    server, sport, cargs = _server(keys, tmp_path, transport, procs)
    client, socks = start_client(keys, tmp_path, sport, *cargs, "--proxy", tinyproxy.url)
    procs.append(client)
    for name in ("small.bin", "big.bin"):
        r = curl("--socks5-hostname", f"127.0.0.1:{socks}", files.url(name))
        assert sha(r.stdout) == files.hashes[name], r.stderr
    assert wait_until(lambda: len(tinyproxy.connects(sport)) == 1, 5), tinyproxy.connects()
    assert server.log().count("connection opened") == 1


@pytest.mark.parametrize("kind", ["socks5", "http"])
def test_client_proxy_with_credentials(keys, files, tmp_path, procs, kind: str) -> None:
    """socks5://user:pass@ (RFC 1929) and http://user:pass@ (Proxy-Authorization); bad ones: no tunnel."""
    # socks5: a ':' in the password travels URL-encoded (tinyproxy's config cannot hold one)
    auth = ("wraith", "s3cret:x" if kind == "socks5" else "s3cret")
    proxy = Microsocks(tmp_path, auth=auth) if kind == "socks5" else Tinyproxy(tmp_path, auth=auth)
    try:
        server, sport, _ = _server(keys, tmp_path, "tcp", procs)
        base = proxy.url.split("//", 1)
        good = f"{base[0]}//wraith:{auth[1].replace(':', '%3A')}@{base[1]}"
        bad = f"{base[0]}//wraith:wrong@{base[1]}"
        client, socks = start_client(keys, tmp_path, sport, "--proxy", good, name="good")
        procs.append(client)
        r = curl("--socks5-hostname", f"127.0.0.1:{socks}", files.url("big.bin"))
        assert sha(r.stdout) == files.hashes["big.bin"]
        client.stop()
        refused, _ = start_client(keys, tmp_path, sport, "--proxy", bad, name="bad", wait_up=False)
        procs.append(refused)
        wait_for_log(refused, "session failed", timeout=15)
        assert "session up" not in refused.log()
        assert server.log().count("connection opened") == 1
    finally:
        proxy.stop()


def test_dead_client_proxy_means_no_tunnel(keys, files, tmp_path, procs) -> None:
    server, sport, _ = _server(keys, tmp_path, "tcp", procs)
    dead = free_port()
    client, socks = start_client(keys, tmp_path, sport, "--proxy", f"socks5://127.0.0.1:{dead}", wait_up=False)
    procs.append(client)
    wait_for_log(client, "cannot reach proxy", timeout=15)
    wait_for_log(client, "session failed", timeout=15, count=2)  # it retried, through the proxy again
    assert "session up" not in client.log()
    assert "connection opened" not in server.log()
    r = curl("--socks5", f"127.0.0.1:{socks}", files.url("small.bin"), timeout=10)
    assert r.returncode != 0 and r.stdout == b""


async def test_library_client_proxy(keys, files, tmp_path, procs, microsocks) -> None:
    """ConnectOptions(proxy=...) with open_stream, over TLS through SOCKS5."""
    from wraith_core import open_stream
    from wraith_core.errors import ConnectError
    from wraith_core.options import ConnectOptions

    _, sport, _ = _server(keys, tmp_path, "tls", procs)
    opts = ConnectOptions(server=f"127.0.0.1:{sport}", transport="tls", insecure=True, proxy=microsocks.url,
                          identity=str(keys.client), host_key=str(keys.host_pub), socks5=None)
    stream = await open_stream(opts, target=f"127.0.0.1:{files.port}")
    try:
        stream.write(b"GET /big.bin HTTP/1.0\r\nHost: x\r\n\r\n")
        data = await asyncio.wait_for(stream.read(-1), 30)
    finally:
        stream.close()
    assert sha(data.split(b"\r\n\r\n", 1)[1]) == files.hashes["big.bin"]
    assert len(microsocks.connections(sport)) == 1
    with pytest.raises(ConnectError):
        await open_stream(opts.replace(proxy=f"socks5://127.0.0.1:{free_port()}"),
                          target=f"127.0.0.1:{files.port}")


@pytest.mark.parametrize("kind", ["socks5", "http"])
def test_server_outbound_via_proxy(keys, files, tmp_path, procs, kind: str) -> None:
    proxy = Microsocks(tmp_path) if kind == "socks5" else Tinyproxy(tmp_path)
    try:
        _, sport, _ = _server(keys, tmp_path, "tcp", procs, "--proxy", proxy.url)
        client, socks = start_client(keys, tmp_path, sport)
        procs.append(client)
        for name in ("small.bin", "big.bin"):
            r = curl("--socks5-hostname", f"127.0.0.1:{socks}", files.url(name))
            assert sha(r.stdout) == files.hashes[name], r.stderr
        seen = proxy.connections if isinstance(proxy, Microsocks) else proxy.connects
        assert wait_until(lambda: len(seen(files.port)) == 2, 5), seen()
    finally:
        proxy.stop()


def _socks_connect_reply(socks: int, port: int) -> int:
    with socket.create_connection(("127.0.0.1", socks), timeout=15) as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + struct.pack(">H", port))
        return s.recv(10)[1]


def test_server_dead_proxy_refuses_channel(keys, tmp_path, procs) -> None:
    """With its --proxy down, the server refuses the channel; it never dials the target itself."""
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(8)
    target.settimeout(2)
    tport = target.getsockname()[1]
    try:
        _, sport, _ = _server(keys, tmp_path, "tcp", procs, "--proxy", f"socks5://127.0.0.1:{free_port()}")
        client, socks = start_client(keys, tmp_path, sport)
        procs.append(client)
        assert _socks_connect_reply(socks, tport) != 0
        with pytest.raises(socket.timeout):
            target.accept()  # nothing bypassed the proxy
        # the session is still fine for the next request
        assert _socks_connect_reply(socks, tport) != 0
        assert "session lost" not in client.log()
    finally:
        target.close()


@contextlib.asynccontextmanager
async def _serving(handler: Any) -> AsyncIterator[int]:
    """A scripted peer (a fake proxy) on a loopback port for the duration."""
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()


@pytest.mark.parametrize("split", [False, True, "lf"])
async def test_http_connect_keeps_bytes_after_reply(split: bool | str) -> None:
    """A target that speaks first: bytes the proxy sends right behind its reply header belong to
    the stream (python-socks' HTTP CONNECT dropped them), also when the header arrives in pieces."""
    from wraith_core.addr import parse_proxy
    from wraith_core.transport.proxy import dial_via_proxy

    seen: list[bytes] = []

    async def fake_proxy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        seen.append(await r.readuntil(b"\r\n\r\n"))
        if split == "lf":  # bare LF line ends (RFC 9112 allows them)
            w.write(b"HTTP/1.1 200 Connection established\nProxy-agent: x\n\nSSH-2.0-target-speaks-first\r\n")
        elif split:
            w.write(b"HTTP/1.1 200 Connection established\r\n\r")
            await w.drain()
            await asyncio.sleep(0.2)
            w.write(b"\nSSH-2.0-target-speaks-first\r\n")
        else:
            w.write(b"HTTP/1.1 200 Connection established\r\nProxy-agent: x\r\n\r\nSSH-2.0-target-speaks-first\r\n")
        await w.drain()
        await r.read()
        w.close()

    async with _serving(fake_proxy) as port:
        sock = await dial_via_proxy(parse_proxy(f"http://u:p%40ss@127.0.0.1:{port}"), "db.internal", 5432, 5)
        reader, writer = await asyncio.open_connection(sock=sock)
        assert await asyncio.wait_for(reader.readline(), 5) == b"SSH-2.0-target-speaks-first\r\n"
        writer.close()
        assert seen[0].startswith(b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n")
        assert b"Proxy-Authorization: Basic dTpwQHNz\r\n" in seen[0]  # u:p@ss


@pytest.mark.parametrize("code,want", [(5, 5), (4, 4), (3, 3), (2, 1), (1, 1)])
async def test_socks_proxy_failure_codes_reach_the_client(code: int, want: int) -> None:
    """The proxy's SOCKS5 reply for the target becomes the reason text that the client maps
    back to the same reply code (refused, host and network unreachable); others: general."""
    from wraith_core.addr import parse_proxy
    from wraith_core.dial import DialError, dial, reply_for_reason

    async def fake(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readexactly(3)
        w.write(b"\x05\x00")
        head = await r.readexactly(5)
        await r.readexactly(head[4] + 2)
        w.write(bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0]))
        await w.drain()
        w.close()

    async with _serving(fake) as port:
        with pytest.raises(DialError) as info:
            await dial(asyncio.Protocol(), "db.internal", 5432, 5, parse_proxy(f"socks5://127.0.0.1:{port}"))
        assert reply_for_reason(info.value.reason) == want, info.value.reason


async def test_http_connect_failure_replies() -> None:
    from wraith_core.addr import parse_proxy
    from wraith_core.transport.proxy import ProxyDialError, dial_via_proxy

    async def deny(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
        await w.drain()
        w.close()

    async with _serving(deny) as port:
        with pytest.raises(ProxyDialError) as info:
            await dial_via_proxy(parse_proxy(f"http://127.0.0.1:{port}"), "x", 1, 5)
        assert "authentication failed" in str(info.value) and "407" in str(info.value)
    with pytest.raises(ProxyDialError) as info:
        await dial_via_proxy(parse_proxy(f"http://127.0.0.1:{free_port()}"), "x", 1, 5)
    assert "cannot reach proxy" in str(info.value)
