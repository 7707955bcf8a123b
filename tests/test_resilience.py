"""Reconnection, keepalive detection, limits, half-open timeout, shutdown under load."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import asyncssh
import pytest

from helpers import Keys, curl, free_port, sha, socks_connect, start_client, start_server, wait_for_log


def _fetch_ok(socks: int, files, name: str = "small.bin") -> bool:
    r = curl("--socks5-hostname", f"127.0.0.1:{socks}", files.url(name, "localhost"), timeout=10)
    return r.returncode == 0 and sha(r.stdout) == files.hashes[name]


def _restart_and_wait(keys: Keys, tmp_path, procs, port: int, client, socks: int, files) -> None:
    """Start the server again on ``port`` and wait until a fetch through the client works."""
    server2, _ = start_server(keys, tmp_path, listen=f"127.0.0.1:{port}", name="serve2")
    procs.append(server2)
    deadline = time.monotonic() + 40
    while not _fetch_ok(socks, files):
        assert time.monotonic() < deadline, client.log()[-2000:]
        time.sleep(0.2)


def test_server_crash_and_restart_recovers(keys: Keys, tmp_path, procs, files) -> None:
    port = free_port()
    server, _ = start_server(keys, tmp_path, listen=f"127.0.0.1:{port}")
    procs.append(server)
    rport = free_port()
    client, socks = start_client(keys, tmp_path, port, "--remote-forward", f"{rport}:127.0.0.1:{files.port}")
    procs.append(client)
    wait_for_log(client, "remote forward up")
    assert _fetch_ok(socks, files)
    server.signal(signal.SIGKILL)
    server.p.wait(5)
    wait_for_log(client, "session lost")
    # during the outage a SOCKS request waits a few seconds, then gets a proper failure reply
    t0 = time.monotonic()
    r = curl("--socks5-hostname", f"127.0.0.1:{socks}", files.url("small.bin", "localhost"), timeout=20)
    assert r.returncode == 97 and 2 < time.monotonic() - t0 < 15, (r.returncode, r.stderr)
    # the listeners stayed open throughout
    with socket.create_connection(("127.0.0.1", socks), timeout=2):
        pass
    restarted = time.monotonic()
    _restart_and_wait(keys, tmp_path, procs, port, client, socks, files)
    print(f"time to recover after restart: {time.monotonic() - restarted:.1f}s")
    wait_for_log(client, "remote forward up", count=2)
    r = curl(f"http://127.0.0.1:{rport}/big.bin")
    assert r.returncode == 0 and sha(r.stdout) == files.hashes["big.bin"]
    assert "retry in" in client.log() and "Traceback" not in client.log()


def test_session_lost_while_channels_open(keys: Keys, tmp_path, procs, files) -> None:
    """SOCKS requests whose channels are still opening when the session dies get a
    failure reply (not a hang, not a success), and the client carries on."""
    port = free_port()
    server, _ = start_server(keys, tmp_path, listen=f"127.0.0.1:{port}")
    procs.append(server)
    client, socks = start_client(keys, tmp_path, port)
    procs.append(client)
    assert _fetch_ok(socks, files)
    server.signal(signal.SIGSTOP)  # CHANNEL_OPENs now go unanswered
    pending = []
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", socks), timeout=10)
        s.sendall(b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01" + files.port.to_bytes(2, "big"))
        assert s.recv(2) == b"\x05\x00"
        pending.append(s)
    time.sleep(0.5)
    server.signal(signal.SIGKILL)
    server.p.wait(5)
    for s in pending:
        reply = s.recv(10)
        assert reply[:2] == b"\x05\x01", reply  # general failure, from the session's end
        assert s.recv(10) == b""
        s.close()
    _restart_and_wait(keys, tmp_path, procs, port, client, socks, files)
    assert "Traceback" not in client.log()


def test_stopped_server_detected_by_keepalive(keys: Keys, tmp_path, procs, files) -> None:
    """SIGSTOP = connected but dead: default keepalives (every 5 s, dropped after 3 silent intervals) notice within ~15 s; SIGCONT recovers."""
    server, port = start_server(keys, tmp_path)
    procs.append(server)
    client, socks = start_client(keys, tmp_path, port)
    procs.append(client)
    assert _fetch_ok(socks, files)
    server.signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        wait_for_log(client, "session lost", timeout=25)
        detected = time.monotonic() - t0
    finally:
        server.signal(signal.SIGCONT)
    print(f"dead server detected after {detected:.1f}s")
    assert detected < 19
    wait_for_log(client, "session up", count=2, timeout=40)
    assert _fetch_ok(socks, files)


def test_half_open_idle_relay_times_out(keys: Keys, tmp_path, procs) -> None:
    server, port = start_server(keys, tmp_path, "--half-open-timeout", "1.5")
    procs.append(server)
    client, socks = start_client(keys, tmp_path, port)
    procs.append(client)
    import threading

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    tport = lsock.getsockname()[1]
    held: list[socket.socket] = []

    def target() -> None:
        conn, _ = lsock.accept()
        conn.sendall(b"bye")
        conn.shutdown(socket.SHUT_WR)  # half-close, then idle (never closes)
        held.append(conn)

    threading.Thread(target=target, daemon=True).start()
    from bench_socks import raw_socks_connect

    s = raw_socks_connect(socks, "127.0.0.1", tport)
    t0 = time.monotonic()
    got = b""
    while (part := s.recv(10)):
        got += part
    assert got == b"bye"  # the target's EOF arrived; our direction is still open, and idle
    s.settimeout(0.2)
    closed_after = None
    while time.monotonic() - t0 < 10:
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            closed_after = time.monotonic() - t0
            break
        time.sleep(0.1)
    assert closed_after is not None and 1.0 < closed_after < 8, closed_after
    s.close()
    for c in held:
        c.close()
    lsock.close()


def test_max_auth_attempts(keys: Keys, tmp_path, procs) -> None:
    server, port = start_server(keys, tmp_path, "--max-auth-attempts", "2")
    procs.append(server)
    wrong = [asyncssh.generate_private_key("ssh-ed25519") for _ in range(3)]
    right = asyncssh.read_private_key(str(keys.client))

    async def attempt(client_keys: list) -> None:
        conn = await asyncssh.connect("127.0.0.1", port, username="root", client_keys=client_keys,
                                      known_hosts=None, agent_path=None, config=None)
        conn.close()

    with pytest.raises((asyncssh.PermissionDenied, asyncssh.DisconnectError, ConnectionError)):
        asyncio.run(attempt(wrong + [right]))
    wait_for_log(server, "auth limit reached remote_addr=127.0.0.1")
    assert server.log().count("result=reject") == 2
    asyncio.run(attempt([wrong[0], right]))  # within the limit: the right key still gets in


def test_max_connections_per_ip(keys: Keys, tmp_path, procs) -> None:
    server, port = start_server(keys, tmp_path, "--max-connections-per-ip", "2")
    procs.append(server)
    a, _ = start_client(keys, tmp_path, port, name="a")
    b, _ = start_client(keys, tmp_path, port, name="b")
    procs += [a, b]
    c, _ = start_client(keys, tmp_path, port, name="c", wait_up=False)
    procs.append(c)
    wait_for_log(server, "connection refused remote_addr=127.0.0.1 reason=max-connections-per-ip")
    time.sleep(1)
    assert "session up" not in c.log()
    a.stop()
    wait_for_log(c, "session up", timeout=40)  # a slot freed up; the third client's retry gets in


def test_login_grace_time(keys: Keys, tmp_path, procs) -> None:
    server, port = start_server(keys, tmp_path, "--login-grace-time", "1")
    procs.append(server)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert s.recv(100).startswith(b"SSH-2.0-")
        t0 = time.monotonic()
        while s.recv(4096):
            pass
        assert 0.5 < time.monotonic() - t0 < 6


def test_sigterm_with_100_active_streams(keys: Keys, tmp_path, procs) -> None:
    server, port = start_server(keys, tmp_path)
    procs.append(server)
    client, socks = start_client(keys, tmp_path, port)
    procs.append(client)

    async def main() -> None:
        async def target(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except ConnectionError:
                pass

        srv = await asyncio.start_server(target, "127.0.0.1", 0)
        tport = srv.sockets[0].getsockname()[1]
        streams = await asyncio.gather(*[socks_connect(socks, "127.0.0.1", tport) for _ in range(100)])
        for r, w in streams:
            w.write(os.urandom(1000))
        for r, w in streams:
            await r.readexactly(1000)
        # keep them busy while the server is told to stop
        for sig_target in (server, client):
            t0 = time.monotonic()
            sig_target.signal(signal.SIGTERM)
            code = await asyncio.to_thread(sig_target.p.wait, 10)
            assert code == 0
            assert time.monotonic() - t0 < 4
            assert "Traceback" not in sig_target.log()
        srv.close()

    asyncio.run(main())


async def test_a_connection_lost_right_after_login_is_retried_not_installed(keys: Keys) -> None:
    """The connection drops between authentication and the session taking it: the session
    must not keep the dead connection as current (it then waited forever); it retries."""
    from wraith_core import ConnectOptions, ServeOptions, serve
    from wraith_core.errors import ConnectError
    from wraith_core.ssh.client import Session

    server = await serve(ServeOptions(key=str(keys.host), authorized_keys=str(keys.authorized),
                                      listen="127.0.0.1:0"))
    opts = ConnectOptions(server=server.addresses()[0], identity=str(keys.client), host_key=str(keys.host_pub),
                          socks5=None)
    drops = [1]

    def dropping(session: Session) -> None:
        original = session.connect_once

        async def connect_once() -> asyncssh.SSHClientConnection:
            conn = await original()
            if drops[0]:
                drops[0] -= 1
                conn.abort()
                await conn.wait_closed()  # connection_lost has run
            return conn

        session.connect_once = connect_once  # type: ignore[method-assign]

    try:
        once = Session(opts, reconnect=False)
        dropping(once)
        with pytest.raises(ConnectError):
            await once.start()
        drops[0] = 1
        s = Session(opts)
        dropping(s)
        await s.start()
        conn = await s.connection(timeout=10)  # the second attempt, after the first backoff step
        assert not conn.is_closed() and s.connects == 1 and drops[0] == 0
        await s.close()
    finally:
        await server.close()


async def test_a_channel_open_the_server_never_answers_times_out(keys: Keys, monkeypatch) -> None:
    """A server that keeps the session alive but never answers a CHANNEL_OPEN: open_stream
    fails with ETIMEDOUT after the connect timeout (plus slack), a SOCKS client gets a
    failure reply within the handshake timeout — neither waits forever."""
    from wraith_core import ConnectOptions
    from wraith_core.addr import ForwardSpec
    from wraith_core.errors import ChannelError
    from wraith_core.forward import LocalForwarder
    from wraith_core.socks import Socks5Listener
    from wraith_core.ssh import channels
    from wraith_core.ssh.client import Session

    class Silent(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            return False  # no auth needed: this server only has to hold channel opens

        def connection_requested(self, *args: object) -> object:
            return asyncio.Event().wait()  # an answer that never comes

    port = free_port()
    server = await asyncssh.create_server(Silent, "127.0.0.1", port, server_host_keys=[str(keys.host)])
    monkeypatch.setattr(channels, "OPEN_SLACK", 0.5)
    session = Session(ConnectOptions(server=f"127.0.0.1:{port}", identity=str(keys.client),
                                     accept_any_host_key=True, socks5=None, connect_timeout=0.5))
    try:
        await session.start()
        await session.connection(timeout=10)
        manager = channels.ChannelManager(session)
        t0 = time.monotonic()
        with pytest.raises(ChannelError) as info:
            await manager.open_stream("127.0.0.1", 9)
        assert info.value.code == "ETIMEDOUT" and time.monotonic() - t0 < 5
        socks = Socks5Listener(manager, "127.0.0.1", 0, handshake_timeout=1.0)
        await socks.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", socks.port)
        writer.write(b"\x05\x01\x00")
        assert await reader.readexactly(2) == b"\x05\x00"
        writer.write(b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x09")
        reply = await asyncio.wait_for(reader.readexactly(10), 5)
        assert reply[1] == 0x01 and await reader.read() == b""
        writer.close()
        socks.close()
        forward = LocalForwarder(manager, ForwardSpec("127.0.0.1", 0, "127.0.0.1", 9))
        await forward.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", forward.port)
        writer.write(b"waiting for a channel that never opens")
        t0 = time.monotonic()
        with pytest.raises(ConnectionResetError):  # -L: reset, not an empty stream or a hang
            await asyncio.wait_for(reader.read(), 5)
        assert time.monotonic() - t0 < 4
        writer.close()
        forward.close()
    finally:
        await session.close()
        server.close()


async def test_an_unexpected_error_in_a_connect_attempt_is_retried(keys: Keys, monkeypatch) -> None:
    """Whatever a connect attempt raises (here EOFError from deep in a transport) is one failed
    attempt: the session retries instead of its reconnect task dying silently."""
    from wraith_core import ConnectOptions, ServeOptions, serve
    from wraith_core.ssh import client as ssh_client

    server = await serve(ServeOptions(key=str(keys.host), authorized_keys=str(keys.authorized),
                                      listen="127.0.0.1:0"))
    real = ssh_client.asyncssh.connect
    calls = []

    async def flaky(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise EOFError("transport went away oddly")
        return await real(*args, **kwargs)

    monkeypatch.setattr(ssh_client.asyncssh, "connect", flaky)
    s = ssh_client.Session(ConnectOptions(server=server.addresses()[0], identity=str(keys.client),
                                          host_key=str(keys.host_pub), socks5=None))
    try:
        await s.start()
        conn = await s.connection(timeout=10)
        assert not conn.is_closed() and len(calls) == 2
        assert s.last_error is None
    finally:
        await s.close()
        await server.close()


async def test_a_socks_request_made_while_the_session_is_down_opens_once_it_is_back(keys: Keys) -> None:
    """SOCKS5 and -L connections made while the session is down wait for it (within their
    timers) and then open their channel; their early bytes and EOF arrive intact."""
    from wraith_core import ConnectOptions, ServeOptions, serve
    from wraith_core.addr import ForwardSpec
    from wraith_core.forward import LocalForwarder
    from wraith_core.socks import Socks5Listener
    from wraith_core.ssh import channels
    from wraith_core.ssh.client import Session

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(await r.read())  # everything, once the client half-closes
        w.close()

    target = await asyncio.start_server(echo, "127.0.0.1", 0)
    tport = target.sockets[0].getsockname()[1]
    port = free_port()
    session = Session(ConnectOptions(server=f"127.0.0.1:{port}", identity=str(keys.client),
                                     host_key=str(keys.host_pub), socks5=None))
    server = None
    try:
        await session.start()  # nothing listens yet: the session retries (1 s, 2 s, ...)
        manager = channels.ChannelManager(session)
        socks = Socks5Listener(manager, "127.0.0.1", 0)
        await socks.start()
        forward = LocalForwarder(manager, ForwardSpec("127.0.0.1", 0, "127.0.0.1", tport))
        await forward.start()
        r1, w1 = await asyncio.open_connection("127.0.0.1", socks.port)
        w1.write(b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01" + tport.to_bytes(2, "big") + b"early socks")
        w1.write_eof()
        r2, w2 = await asyncio.open_connection("127.0.0.1", forward.port)
        w2.write(b"early forward")
        w2.write_eof()
        await asyncio.sleep(0.3)
        assert session.conn is None
        server = await serve(ServeOptions(key=str(keys.host), authorized_keys=str(keys.authorized),
                                          listen=f"127.0.0.1:{port}"))
        assert await asyncio.wait_for(r1.readexactly(12), 15) == b"\x05\x00\x05\x00\x00\x01" + bytes(6)
        assert await asyncio.wait_for(r1.read(), 10) == b"early socks"
        assert await asyncio.wait_for(r2.read(), 10) == b"early forward"
        for w in (w1, w2):
            w.close()
        socks.close()
        forward.close()
    finally:
        await session.close()
        if server is not None:
            await server.close()
        target.close()


def test_sigterm_while_socks_requests_wait_for_the_session(keys: Keys, tmp_path, procs) -> None:
    """SOCKS requests waiting for a session that is down get a failure reply when the client
    shuts down, and the shutdown reports nothing but itself (no pending-task noise)."""
    port = free_port()  # nothing listens: the session stays down
    client, socks = start_client(keys, tmp_path, port, wait_up=False)
    procs.append(client)
    wait_for_log(client, "session failed")
    waiting = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", socks), timeout=5)
        s.sendall(b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50")
        waiting.append(s)
    for s in waiting:
        assert s.recv(2) == b"\x05\x00"
    time.sleep(0.3)
    before = len(client.log())
    client.signal(signal.SIGTERM)
    assert client.p.wait(10) == 0
    for s in waiting:
        s.settimeout(5)
        reply = s.recv(10)
        assert reply[:2] == b"\x05\x01", reply  # general failure, not a bare close
        s.close()
    after = client.log()[before:]
    assert "shutting down" in after and "ERROR" not in after and "Task" not in after, after


async def test_reconnect_waits_are_jittered(keys: Keys) -> None:
    """Clients that lost the same server do not retry in lockstep: each wait is drawn between
    half and all of its backoff step."""
    from wraith_core import ConnectOptions
    from wraith_core.ssh.client import Session

    port = free_port()  # nothing listens
    waits: list[float] = []

    def on_state(state: str, extra: dict) -> None:
        if state == "reconnecting":
            waits.append(extra["delay"])

    sessions = [Session(ConnectOptions(server=f"127.0.0.1:{port}", identity=str(keys.client),
                                       host_key=str(keys.host_pub), socks5=None), on_state=on_state)
                for _ in range(6)]
    try:
        for s in sessions:
            await s.start()
        deadline = time.monotonic() + 10
        while len(waits) < 6:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        for s in sessions:
            await s.close()
    first = waits[:6]  # each session's first wait: its step is 1 s
    assert all(0.5 <= w <= 1.0 for w in first), first
    assert max(first) - min(first) > 0.01, first



def test_a_refused_remote_forward_is_asked_for_again(keys: Keys, tmp_path, procs, files) -> None:
    """A remote forward the server refuses (here its port is taken, as by the old session
    after a reconnect) is requested again while the session lasts, and works once the port
    is free."""
    server, sport = start_server(keys, tmp_path)
    procs.append(server)
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    rport = holder.getsockname()[1]
    client, _ = start_client(keys, tmp_path, sport, "--remote-forward",
                             f"127.0.0.1:{rport}:127.0.0.1:{files.port}")
    procs.append(client)
    wait_for_log(client, "remote forward refused by server")
    time.sleep(1.5)  # one more refusal at least
    holder.close()
    wait_for_log(client, "remote forward up", timeout=15)
    r = curl(f"http://127.0.0.1:{rport}/big.bin")
    assert r.returncode == 0 and sha(r.stdout) == files.hashes["big.bin"]
    assert client.log().count("remote forward refused by server") == 1  # the retries are quiet
