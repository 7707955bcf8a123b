"""Server policy a raw SSH client can probe: remote-forward lifetime, key options asyncssh
does not enforce (restrict, port-forwarding, permitlisten), destinations that are not host
names, out-of-range ports. In process, real sockets on loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import asyncssh
import pytest
from asyncssh.packet import Boolean, String, UInt32

from helpers import Keys, free_port
from wraith_core.options import ServeOptions
from wraith_core.server_api import WraithServer


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
async def server(keys: Keys) -> AsyncIterator[tuple[WraithServer, int]]:
    port = free_port()
    srv = await WraithServer(ServeOptions(key=str(keys.host), authorized_keys=str(keys.authorized),
                                          listen=f"127.0.0.1:{port}"), use_hub=False).start()
    yield srv, port
    await srv.close()


async def _connect(keys: Keys, port: int) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect("127.0.0.1", port, username="u", client_keys=[str(keys.client)],
                                  known_hosts=None, agent_path=None, config=None)


async def test_a_remote_forward_never_outlives_its_session(keys: Keys, server: tuple[WraithServer, int]) -> None:
    """The forward request and the connection's end in one breath: the listener bound after
    the session was gone is closed at once, so the port is free for the next session."""
    srv, port = server
    for _ in range(3):
        fport = free_port()
        conn = await _connect(keys, port)
        conn.send_packet(80, String(b"tcpip-forward"), Boolean(True), String(b"127.0.0.1"), UInt32(fport))
        conn._transport.abort()  # type: ignore[attr-defined]
        for _ in range(50):
            if not srv.runner.conns:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        assert not listening(fport)
        again = await _connect(keys, port)
        listener = await again.forward_remote_port("127.0.0.1", fport, "127.0.0.1", 9)
        assert listening(fport)
        again.close()
        await again.wait_closed()
        for _ in range(50):
            if not listening(fport):
                break
            await asyncio.sleep(0.05)
        assert not listening(fport)  # closed with the session that asked for it
        listener.close()


@pytest.mark.parametrize("options,direct,listen_ok,listen_refused", [
    ("restrict", False, [], ["127.0.0.1:{p}"]),
    ("restrict,port-forwarding", True, ["127.0.0.1:{p}"], []),
    ('permitlisten="{p}"', True, ["127.0.0.1:{p}", "localhost:{p}"], ["127.0.0.1:{q}"]),
    ('permitlisten="127.0.0.1:*"', True, ["127.0.0.1:{p}", "127.0.0.1:{q}"], ["::1:{p}"]),
    ('restrict,port-forwarding,permitlisten="localhost:{q}"', True, ["localhost:{q}"], ["127.0.0.1:{p}"]),
])
async def test_key_options_for_forwarding(keys: Keys, tmp_path, options: str, direct: bool,
                                          listen_ok: list[str], listen_refused: list[str]) -> None:
    p, q = free_port(), free_port()
    keys.authorized.write_text(f"{options.format(p=p, q=q)} {keys.client_pub.read_text()}")
    port = free_port()
    srv = await WraithServer(ServeOptions(key=str(keys.host), authorized_keys=str(keys.authorized),
                                          listen=f"127.0.0.1:{port}"), use_hub=False).start()
    target = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    tport = target.sockets[0].getsockname()[1]
    try:
        async with await _connect(keys, port) as conn:
            if direct:
                _, session = await conn.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", tport)
            else:
                with pytest.raises(asyncssh.ChannelOpenError) as info:
                    await conn.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", tport)
                assert info.value.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
            for spec in listen_ok:
                host, fport = spec.format(p=p, q=q).rsplit(":", 1)
                listener = await conn.forward_remote_port(host, int(fport), "127.0.0.1", 9)
                listener.close()
                await listener.wait_closed()
            for spec in listen_refused:
                host, fport = spec.format(p=p, q=q).rsplit(":", 1)
                with pytest.raises(asyncssh.ChannelListenError):
                    await conn.forward_remote_port(host, int(fport), "127.0.0.1", 9)
    finally:
        target.close()
        await srv.close()


@pytest.mark.parametrize("host", ["evil.test:80 HTTP/1.1\r\nX: y", "a\nb", "tab\there", "sp ace", "x" * 256, ""])
async def test_destinations_that_are_not_host_names_are_refused(keys: Keys, server: tuple[WraithServer, int],
                                                                host: str) -> None:
    """CR/LF in a destination would smuggle requests into the HTTP CONNECT sent to --proxy."""
    _, port = server
    async with await _connect(keys, port) as conn:
        with pytest.raises(asyncssh.ChannelOpenError) as info:
            await conn.create_connection(asyncssh.SSHTCPSession, host, 80)
        assert info.value.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED


async def test_a_forward_port_out_of_range_is_refused_and_the_session_lives(
        keys: Keys, server: tuple[WraithServer, int]) -> None:
    srv, port = server
    async with await _connect(keys, port) as conn:
        for bad in (70000, 0xFFFFFFFF):
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("127.0.0.1", bad, "127.0.0.1", 9)
        listener = await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 9)  # still usable
        assert listener.get_port() > 0 and len(srv.runner.conns) == 1
