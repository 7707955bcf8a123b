"""The server's callback open of IP-address targets (ssh/target_open.py): a connect that
completes at once (loopback), one that completes later, one that times out, and a session
that goes away while the connect is in flight. serve() in process, open_stream() clients.

A target whose accept queue is full drops our SYN, so the connect stays in progress until
the kernel retransmits it (after 1 s) — a slow target on loopback, without a netem."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator

import pytest
from asyncssh.packet import SSHPacket, String, UInt32
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import Keys
from wraith_core import ConnectOptions, ServeOptions, open_stream, serve
from wraith_core.errors import ChannelError
from wraith_core.server_api import WraithServer
from wraith_core.ssh import target_open


@pytest.fixture
async def server(keys: Keys) -> AsyncIterator[WraithServer]:
    srv = await serve(ServeOptions(key=str(keys.host), authorized_keys=str(keys.authorized),
                                   listen="127.0.0.1:0", connect_timeout=2.5))
    errors: list[dict] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    yield srv
    await srv.close()
    loop.set_exception_handler(None)
    assert errors == []  # nothing escaped into the event loop


def opts(keys: Keys, srv: WraithServer) -> ConnectOptions:
    return ConnectOptions(server=srv.addresses()[0], identity=str(keys.client), host_key=str(keys.host_pub),
                          socks5=None)


def full_listener() -> tuple[socket.socket, socket.socket]:
    """A listener whose accept queue is full: further SYNs are dropped."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    filler = socket.create_connection(lst.getsockname())
    return lst, filler


def test_numeric_address() -> None:
    assert target_open.numeric_address("127.0.0.1", 80) == (socket.AF_INET, ("127.0.0.1", 80))
    assert target_open.numeric_address("::1", 443) == (socket.AF_INET6, ("::1", 443, 0, 0))
    for host in ("localhost", "example.com", "127.1", "1.2.3", "", "fe80::1%lo", "\x00", "wraith-control"):
        assert target_open.numeric_address(host, 80) is None, host
    assert target_open.numeric_address("127.0.0.1", 0) is None
    assert target_open.numeric_address("127.0.0.1", 70000) is None


async def test_loopback_target_ipv4_and_ipv6(keys: Keys, server: WraithServer) -> None:
    async def echo_digest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"hi")  # speaks first
        w.write(hashlib.sha256(await r.read()).digest())
        w.close()

    for host in ("127.0.0.1", "::1"):
        srv = await asyncio.start_server(echo_digest, host, 0)
        port = srv.sockets[0].getsockname()[1]
        payload = os.urandom(300_000)
        for _ in range(20):
            s = await open_stream(opts(keys, server), target=f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            s.write(payload)
            s.write_eof()
            assert await s.read(-1) == b"hi" + hashlib.sha256(payload).digest()
            s.close()
        srv.close()


async def test_slow_connect_is_confirmed_when_it_completes(keys: Keys, server: WraithServer) -> None:
    lst, filler = full_listener()
    port = lst.getsockname()[1]
    try:
        opening = asyncio.ensure_future(open_stream(opts(keys, server), target=f"127.0.0.1:{port}"))
        await asyncio.sleep(0.5)
        assert not opening.done()  # not confirmed before the target answered
        lst.accept()[0].close()  # room in the queue: the retransmitted SYN gets through
        filler.close()
        stream = await asyncio.wait_for(opening, 10)
        lst.setblocking(False)
        conn, _ = await asyncio.wait_for(asyncio.get_running_loop().sock_accept(lst), 10)
        stream.write(b"ping")
        await stream.drain()
        loop = asyncio.get_running_loop()
        assert await asyncio.wait_for(loop.sock_recv(conn, 4), 5) == b"ping"
        await loop.sock_sendall(conn, b"pong")
        assert await stream.readexactly(4) == b"pong"
        conn.close()
        assert await stream.read(-1) == b""
        stream.close()
    finally:
        lst.close()
        filler.close()


async def test_connect_timeout_is_an_open_failure(keys: Keys, server: WraithServer) -> None:
    lst, filler = full_listener()
    try:
        with pytest.raises(ChannelError) as e:
            await asyncio.wait_for(open_stream(opts(keys, server), target=f"127.0.0.1:{lst.getsockname()[1]}"), 15)
        assert e.value.code == "EHOSTUNREACH"  # "Connection timed out" → SOCKS 0x04
        assert "timed out" in str(e.value)
    finally:
        lst.close()
        filler.close()
    # the session is fine afterwards
    srv = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    s = await open_stream(opts(keys, server), target=f"127.0.0.1:{srv.sockets[0].getsockname()[1]}")
    assert await s.read(-1) == b""
    srv.close()


async def test_session_gone_while_connecting(keys: Keys, server: WraithServer) -> None:
    lst, filler = full_listener()
    try:
        opening = asyncio.ensure_future(open_stream(opts(keys, server), target=f"127.0.0.1:{lst.getsockname()[1]}"))
        await asyncio.sleep(0.3)
        opening.cancel()  # the client gives up: its one-off session closes
        with pytest.raises(asyncio.CancelledError):
            await opening
        await asyncio.sleep(0.2)
        lst.accept()[0].close()
        filler.close()
        # the SYN retransmit connects; the server finds the session gone and drops the socket
        loop = asyncio.get_running_loop()
        lst.setblocking(False)
        conn, _ = await asyncio.wait_for(loop.sock_accept(lst), 10)
        assert await asyncio.wait_for(loop.sock_recv(conn, 1), 5) == b""
        conn.close()
    finally:
        lst.close()
        filler.close()


async def test_refused_targets_leave_no_channels_behind(keys: Keys, server: WraithServer) -> None:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    port = lst.getsockname()[1]
    lst.close()  # nothing listens there: refused at once
    from wraith_core.client import WraithClient

    client = WraithClient(opts(keys, server))  # one session for all the opens
    await client.start()
    try:
        for _ in range(30):
            with pytest.raises(ChannelError) as e:
                await client.channels.open_stream("127.0.0.1", port)
            assert e.value.code == "ECONNREFUSED"
        (conn,) = [c._conn for c in server.runner.conns]
        assert conn._channels == {}  # a failed connect never built an asyncssh channel
    finally:
        await client.close()


def _open_packet(chantype: bytes, host: bytes, port: int, orig: bytes = b"10.0.0.9", pktsize: int = 32768) -> bytes:
    body = (bytes((4, 90)) + String(chantype) + UInt32(5) + UInt32(1 << 20) + UInt32(pktsize) + String(host)
            + UInt32(port) + String(orig) + UInt32(4242))
    return body + b"\x00" * 4  # padding after the payload


def test_parse_direct_open() -> None:
    plain = _open_packet(b"direct-tcpip", b"127.0.0.1", 8080)
    assert target_open.parse_direct_open(plain, len(plain) - 4) == (5, 1 << 20, 32768, "127.0.0.1", 8080)
    # anything else or anything unusual: None, and asyncssh's own path decides
    for bad in (_open_packet(b"session", b"127.0.0.1", 80), _open_packet(b"direct-tcpip", b"\xff", 80),
                _open_packet(b"direct-tcpip", b"127.0.0.1", 80, orig=b"\xc3"),
                _open_packet(b"direct-tcpip", b"127.0.0.1", 80, pktsize=0)):
        assert target_open.parse_direct_open(bad, len(bad) - 4) is None
    forwarded = _open_packet(b"forwarded-tcpip", b"127.0.0.1", 2222)  # a remote forward's (client side)
    assert target_open.parse_direct_open(forwarded, len(forwarded) - 4) is None
    assert target_open.parse_open(forwarded, len(forwarded) - 4, b"forwarded-tcpip") == (5, 1 << 20, 32768,
                                                                                         "127.0.0.1", 2222)
    assert target_open.parse_direct_open(plain, len(plain) - 5) is None  # truncated
    assert target_open.parse_direct_open(plain, len(plain)) is None  # trailing bytes


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120))
def test_parse_direct_open_never_raises(junk: bytes) -> None:
    plain = bytes((4, 90)) + junk
    result = target_open.parse_direct_open(plain, len(plain))
    if result is not None:  # whatever it accepts, asyncssh's decoding accepts the same way
        packet = SSHPacket(plain[2:])
        assert packet.get_string() == b"direct-tcpip"
        fields = (packet.get_uint32(), packet.get_uint32(), packet.get_uint32(), packet.get_string().decode(),
                  packet.get_uint32())
        packet.get_string().decode()
        packet.get_uint32()
        packet.check_end()
        assert fields == result
