"""The in-process API: open_stream() over a real server process, and its errors."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from helpers import Keys, free_port, start_server
from wraith_core import ConnectOptions, open_stream
from wraith_core.errors import AuthError, ChannelError, HostKeyError, UsageError


@pytest.fixture
def server(keys: Keys, tmp_path, procs):
    p, port = start_server(keys, tmp_path)
    procs.append(p)
    return port


def opts(keys: Keys, port: int, **kw) -> ConnectOptions:
    return ConnectOptions(server=f"127.0.0.1:{port}", identity=str(keys.client), host_key=str(keys.host_pub), **kw)


async def test_stream_api_roundtrip(keys: Keys, server: int) -> None:
    async def target(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HELLO")  # speaks first
        data = await r.read()  # until our EOF
        w.write(hashlib.sha256(data).digest())
        w.close()

    srv = await asyncio.start_server(target, "127.0.0.1", 0)
    tport = srv.sockets[0].getsockname()[1]
    payload = os.urandom(3 * 1024 * 1024)
    async with await open_stream(opts(keys, server), target=f"127.0.0.1:{tport}") as s:
        assert await s.readexactly(5) == b"HELLO"
        for i in range(0, len(payload), 100_000):
            s.write(payload[i : i + 100_000])
            await s.drain()
        s.write_eof()
        assert await s.read(-1) == hashlib.sha256(payload).digest()
        assert s.at_eof()
    await s.wait_closed()
    srv.close()


async def test_stream_errors_have_codes(keys: Keys, server: int, tmp_path) -> None:
    with pytest.raises(ChannelError) as e:
        await open_stream(opts(keys, server), target=f"127.0.0.1:{free_port()}")
    assert e.value.code == "ECONNREFUSED"
    with pytest.raises(ChannelError) as e:
        await open_stream(opts(keys, server), target="wraith-nope:1")
    assert e.value.code == "EPROHIBITED"
    from wraith_core.keys import generate_ed25519

    other, other_pub = generate_ed25519(tmp_path / "other", "x")
    with pytest.raises(HostKeyError) as e:
        await open_stream(ConnectOptions(server=f"127.0.0.1:{server}", identity=str(keys.client),
                                         host_key=str(other_pub)), target="127.0.0.1:1")
    assert e.value.code == "EHOSTKEY"
    with pytest.raises(AuthError) as e:
        await open_stream(ConnectOptions(server=f"127.0.0.1:{server}", identity=str(other),
                                         host_key=str(keys.host_pub)), target="127.0.0.1:1")
    assert e.value.code == "EAUTH"
    with pytest.raises(UsageError):
        await open_stream(ConnectOptions(server=f"127.0.0.1:{server}", identity=str(keys.client)),
                          target="127.0.0.1:1")  # no host key verification configured


async def test_key_bytes_and_env_defaults(keys: Keys, server: int, monkeypatch) -> None:
    monkeypatch.setenv("WRAITH_SERVER", f"127.0.0.1:{server}")
    monkeypatch.setenv("WRAITH_IDENTITY", str(keys.client))
    o = ConnectOptions(host_key=keys.host_pub.read_bytes())
    assert o.server == f"127.0.0.1:{server}"
    o.identity = keys.client.read_bytes()  # the key itself instead of a path
    with pytest.raises(ChannelError) as e:
        await open_stream(o, target=f"127.0.0.1:{free_port()}")
    assert e.value.code == "ECONNREFUSED"


async def test_streamlocal_channel_against_sshd(keys: Keys, tmp_path, procs) -> None:
    """The channel manager's streamlocal channels, against OpenSSH (which serves them)."""
    from openssh import start_sshd

    sshd, port = await asyncio.to_thread(start_sshd, keys, tmp_path)
    procs.append(sshd)
    kh = tmp_path / "kh"
    kh.write_text(f"[127.0.0.1]:{port} {keys.host_pub.read_text()}")
    path = str(tmp_path / "app.sock")

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(await r.read())
        w.close()

    srv = await asyncio.start_unix_server(echo, path)
    s = await open_stream(ConnectOptions(server=f"root@127.0.0.1:{port}", identity=str(keys.client),
                                         known_hosts=str(kh)), target=f"unix:{path}")
    s.write(b"over a unix socket")
    s.write_eof()
    assert await s.read(-1) == b"over a unix socket"
    s.close()
    srv.close()


async def test_unreachable_server_code(keys: Keys) -> None:
    from wraith_core.errors import ConnectError

    with pytest.raises(ConnectError) as e:
        await open_stream(ConnectOptions(server=f"127.0.0.1:{free_port()}", identity=str(keys.client),
                                         accept_any_host_key=True), target="127.0.0.1:1")
    assert e.value.code == "ECONNREFUSED"


async def test_channel_answered_after_its_opener_gave_up_is_closed(keys: Keys, tmp_path, procs) -> None:
    """A shared session (as the daemon's pool and the SOCKS listener use) whose channel open is
    cancelled while the server is slow: when the confirmation does come, the channel is closed
    at once rather than left open with nobody reading it."""
    import signal

    from wraith_core.duplex import DuplexStream
    from wraith_core.ssh.channels import ChannelManager
    from wraith_core.ssh.client import Session

    p, port = start_server(keys, tmp_path)
    procs.append(p)
    accepted: list[asyncio.StreamReader] = []
    ended = asyncio.Event()

    async def target(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(r)
        try:
            await r.read()  # until the channel goes away (aborted: a reset)
        except ConnectionResetError:
            pass
        ended.set()
        w.close()

    srv = await asyncio.start_server(target, "127.0.0.1", 0)
    tport = srv.sockets[0].getsockname()[1]
    session = Session(opts(keys, port), reconnect=False)
    await session.start()
    manager = ChannelManager(session)
    try:
        p.signal(signal.SIGSTOP)
        opening = asyncio.ensure_future(manager.open_relay(DuplexStream(), "127.0.0.1", tport))  # type: ignore[arg-type]
        await asyncio.sleep(0.3)
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        p.signal(signal.SIGCONT)
        await asyncio.wait_for(ended.wait(), 10)  # the server dialed, then the channel was closed
        assert len(accepted) == 1
        # the session is still good for the next channel
        s = DuplexStream()
        await manager.open_relay(s, "127.0.0.1", tport)  # type: ignore[arg-type]
        s.close()
    finally:
        p.signal(signal.SIGCONT)
        await session.close()
        srv.close()


async def test_two_concurrent_readers_is_an_error_not_a_hang() -> None:
    """As asyncio's StreamReader: a second read() while one waits raises RuntimeError (it
    overwrote the first reader's waiter, which then never woke, even at EOF)."""
    from wraith_core.duplex import DuplexStream

    s = DuplexStream()
    first = asyncio.create_task(s.read(10))
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError):
        await s.read(10)
    s.data_received(b"hello")
    assert await asyncio.wait_for(first, 5) == b"hello"
    second = asyncio.create_task(s.read(10))
    await asyncio.sleep(0)
    s.eof_received()
    assert await asyncio.wait_for(second, 5) == b""


async def test_a_session_that_drops_is_a_connection_error_on_the_stream(keys: Keys) -> None:
    """The SSH session under an open stream goes away: the stream's reader gets a
    ConnectionError (ECONNRESET), like a socket's — not one of asyncssh's own exceptions."""
    from wraith_core import ServeOptions, serve

    target = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    tport = target.sockets[0].getsockname()[1]
    server = await serve(ServeOptions(key=str(keys.host), authorized_keys=str(keys.authorized),
                                      listen="127.0.0.1:0"))
    opts = ConnectOptions(server=server.addresses()[0], identity=str(keys.client), host_key=str(keys.host_pub),
                          socks5=None)
    try:
        s = await open_stream(opts, target=f"127.0.0.1:{tport}")
        for c in list(server.runner.conns):  # the TCP connection dies, no SSH disconnect
            c._conn._transport.abort()  # type: ignore[union-attr]
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(s.read(), 10)
    finally:
        await server.close()
        target.close()


async def test_drain_waits_for_a_full_connection_send_buffer() -> None:
    """drain() waits not only for the channel's window but also while the SSH connection's
    own send buffer is full (a peer that grants windows and reads slowly, or not at all):
    otherwise a writer that awaits drain() could still fill memory without bound."""
    from wraith_core.duplex import DuplexStream

    class Conn:
        _transport = object()

    class Channel:
        _conn = Conn()

        def write(self, data: bytes) -> None:
            pass

    s = DuplexStream()
    chan = Channel()
    s.connection_made(chan)
    await asyncio.wait_for(s.drain(), 1)  # nothing holds it
    chan._conn.pause_writing()  # the connection's transport: its buffer passed the limit
    s.write(b"x")
    waiting = asyncio.ensure_future(s.drain())
    await asyncio.sleep(0.1)
    assert not waiting.done()
    chan._conn.resume_writing()
    await asyncio.wait_for(waiting, 1)
    s.pause_writing()  # the channel's own window still counts
    waiting = asyncio.ensure_future(s.drain())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    s.resume_writing()
    await asyncio.wait_for(waiting, 1)


async def test_connects_when_the_user_lookup_fails(keys: Keys, server: int, monkeypatch) -> None:
    """Out of descriptors, the passwd lookup behind ``getpass.getuser`` fails. asyncssh does
    it on every connect; the session keeps the name from its start, so a reconnect then
    still works instead of failing with "Unknown local username"."""
    import pwd

    from wraith_core.ssh.client import Session

    for var in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.delenv(var, raising=False)
    session = Session(opts(keys, server))

    def no_passwd(uid: int) -> pwd.struct_passwd:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_passwd)
    conn = await session.connect_once()
    conn.close()
    await conn.wait_closed()
