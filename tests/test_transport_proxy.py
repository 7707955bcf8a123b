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
import subprocess
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from helpers import Keys, curl, free_port, sha, start_client, start_server, wait_for_log, wraith
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


@pytest.mark.parametrize("code,want", [(5, 5), (4, 4), (3, 3), (2, 2), (6, 4), (1, 1)])
async def test_socks_proxy_failure_codes_reach_the_client(code: int, want: int) -> None:
    """The proxy's SOCKS5 reply for the target becomes the reason text (and for "not allowed"
    the prohibited open failure) that the client maps back to the same reply code (refused,
    host and network unreachable, not allowed; TTL expired: host unreachable); others: general."""
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
        assert reply_for_reason(info.value.reason, info.value.prohibited) == want, info.value.reason


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


def _reply_then_close(reply: bytes) -> Any:
    async def fake(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(reply)
        await w.drain()
        w.close()
    return fake


async def test_http_connect_403_is_not_allowed() -> None:
    from wraith_core.addr import parse_proxy
    from wraith_core.dial import DialError, dial, reply_for_reason
    from wraith_core.protocol.socks5 import Reply

    async with _serving(_reply_then_close(b"HTTP/1.1 403 Forbidden\r\n\r\n")) as port:
        with pytest.raises(DialError) as info:
            await dial(asyncio.Protocol(), "db.internal", 5432, 5, parse_proxy(f"http://127.0.0.1:{port}"))
    assert info.value.prohibited
    assert reply_for_reason(info.value.reason, info.value.prohibited) == Reply.NOT_ALLOWED


def test_server_proxy_not_allowed_reaches_the_socks_client(keys, tmp_path, procs) -> None:
    """Server --proxy answering SOCKS5 "not allowed": the channel open fails as administratively
    prohibited, which the client's SOCKS5 listener answers with reply 2."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)

    def proxy() -> None:
        with contextlib.suppress(OSError):
            while True:
                c, _ = lsock.accept()
                with c:
                    c.recv(3)
                    c.sendall(b"\x05\x00")
                    c.recv(300)  # the CONNECT request
                    c.sendall(b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00")

    threading.Thread(target=proxy, daemon=True).start()
    try:
        _, sport, _ = _server(keys, tmp_path, "tcp", procs, "--proxy", f"socks5://127.0.0.1:{lsock.getsockname()[1]}")
        client, socks = start_client(keys, tmp_path, sport)
        procs.append(client)
        with socket.create_connection(("127.0.0.1", socks), timeout=15) as s:
            s.sendall(b"\x05\x01\x00")
            assert s.recv(2) == b"\x05\x00"
            s.sendall(b"\x05\x01\x00\x03\x0bdb.internal\x00\x50")
            assert s.recv(10)[1] == 2
    finally:
        lsock.close()


async def test_hostile_http_reason_phrase_is_escaped() -> None:
    """The proxy's reason phrase reaches logs and daemon events: no terminal escapes, no bare CR."""
    from wraith_core.addr import parse_proxy
    from wraith_core.transport.proxy import ProxyDialError, dial_via_proxy

    reply = b"HTTP/1.1 407 \x1b[2J\x1b[31mFAKE: session up\x1b[0m\rOVERWRITTEN\r\n\r\n"
    async with _serving(_reply_then_close(reply)) as port:
        with pytest.raises(ProxyDialError) as info:
            await dial_via_proxy(parse_proxy(f"http://127.0.0.1:{port}"), "x", 1, 5)
    text = str(info.value)
    assert "407" in text and "FAKE" in text and "\x1b" not in text and "\r" not in text


async def test_hostile_replies_stay_proxy_dial_errors() -> None:
    """Odd status digits, undecodable SOCKS5 bound addresses: ProxyDialError, not ValueError."""
    from wraith_core.addr import parse_proxy
    from wraith_core.transport.proxy import ProxyDialError, dial_via_proxy

    async def socks_bad_domain(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readexactly(3)
        w.write(b"\x05\x00")
        head = await r.readexactly(5)
        await r.readexactly(head[4] + 2)
        w.write(b"\x05\x00\x00\x03\x04\xff\xfe\xfd\xfc\x00\x50")
        await w.drain()
        w.close()

    for scheme, fake in (("http", _reply_then_close("HTTP/1.1 ²²² OK\r\n\r\n".encode("latin-1"))),
                         ("http", _reply_then_close("HTTP/1.1 ２００ OK\r\n\r\n".encode())),
                         ("socks5", socks_bad_domain)):
        async with _serving(fake) as port:
            with pytest.raises(ProxyDialError):
                await dial_via_proxy(parse_proxy(f"{scheme}://127.0.0.1:{port}"), "x", 1, 5)


SECRET = "S3cretPass"


@pytest.mark.parametrize("url", [f"socks5://alice:{SECRET}@proxy.example:99999", f"http://alice:{SECRET}@[::1:8080",
                                 f"socks5://alice:{SECRET}@:1080", f"socks5://alice:pa/{SECRET}@h:x"])
def test_proxy_url_errors_hide_the_password(url: str) -> None:
    from wraith_core.addr import parse_proxy
    from wraith_core.errors import UsageError

    with pytest.raises(UsageError) as info:
        parse_proxy(url)
    assert SECRET not in str(info.value) and "alice:***@" in str(info.value)


@pytest.mark.parametrize("url", ["socks5://alice:pw@h:0", "http://h:0", "socks5://al:p%C3%A4ss@h:1",
                                 "socks5://b%C3%A4r@h:1", f"socks5://alice:{'x' * 256}@h:1"])
def test_proxy_url_refused(keys, url: str) -> None:
    """An explicit port 0 (it meant the default), SOCKS5 credentials that are not ASCII or
    longer than 255 bytes (RFC 1929): a one-line usage error."""
    from wraith_core.addr import parse_proxy
    from wraith_core.errors import UsageError

    with pytest.raises(UsageError):
        parse_proxy(url)
    out = subprocess.run(wraith("connect", "--server", "127.0.0.1:9", "--identity", str(keys.client),
                                "--accept-any-host-key", "--proxy", url), capture_output=True, timeout=30)
    err = out.stderr.decode()
    assert out.returncode != 0 and len(err.strip().splitlines()) == 1 and "--proxy" in err, err
    assert "Traceback" not in err and "pw" not in err


def test_reprs_hide_proxy_and_key_secrets() -> None:
    from wraith_core.addr import parse_proxy
    from wraith_core.options import ConnectOptions, ServeOptions

    url = f"socks5://alice:{SECRET}@proxy.example:1080"
    shown = [repr(parse_proxy(url)),
             repr(ConnectOptions(proxy=url, socks5_auth=f"bob:{SECRET}", identity=SECRET.encode())),
             repr(ServeOptions(proxy=url, key=SECRET.encode(), tls_key=SECRET.encode()))]
    for text in shown:
        assert SECRET not in text, text
    assert "proxy.example" in shown[0]
