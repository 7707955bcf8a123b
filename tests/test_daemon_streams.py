"""wraith daemon, real processes: bytes intact, half-close, pooling, concurrency, errors, events, serve."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import time

import msgpack
import pytest
import wraith_client
from wraith_client import WraithError

from helpers import Keys
from test_daemon_support import expected_sha, start_daemon, start_env


@pytest.fixture
def env(keys: Keys, tmp_path, procs):
    return start_env(keys, tmp_path, procs)


async def _open(env, mode: str, **over):
    opts = dict(env["opts"], target=f"127.0.0.1:{env['tport']}", **over)
    s = await wraith_client.connect(**opts)
    s.write(mode.encode() + b"\n")
    return s


async def test_bytes_intact_both_directions(env) -> None:
    # upload: 24 MiB random, the target answers the hash
    up = os.urandom(24 * 1024 * 1024 + 17)
    s = await _open(env, "HASH")
    for i in range(0, len(up), 300_000):
        s.write(up[i:i + 300_000])
        await s.drain()
    s.write_eof()
    assert (await s.read()).decode() == hashlib.sha256(up).hexdigest()
    await s.wait_closed()
    # download: 64 MiB from the target
    n = 64 * 1024 * 1024 + 5
    s = await _open(env, f"SEND {n} 7")
    h = hashlib.sha256()
    got = 0
    async for chunk in s:
        h.update(chunk)
        got += len(chunk)
    assert got == n and h.hexdigest() == expected_sha(n, 7)
    s.write_eof()
    await s.wait_closed()
    # both at once: echo
    data = os.urandom(8 * 1024 * 1024)
    s = await _open(env, "ECHO")

    async def writer() -> None:
        for i in range(0, len(data), 65536):
            s.write(data[i:i + 65536])
            await s.drain()

    wt = asyncio.create_task(writer())
    back = await s.readexactly(len(data))
    await wt
    assert hashlib.sha256(back).hexdigest() == hashlib.sha256(data).hexdigest()
    # EOF only once everything came back: wraith serve's relay closes the channel as soon as EOF
    # passed both ways, and asyncssh then drops a still-pending EOF (see test_half_close_*)
    s.write_eof()
    assert await s.read() == b""
    await s.wait_closed()
    # a clean end is a WebSocket close 1000 after the daemon's eof
    assert s._ws.close_code == 1000


async def test_half_close_client_first(env) -> None:
    s = await _open(env, "ECHO")
    s.write(b"ping " * 1000)
    await s.drain()
    s.write_eof()
    assert await s.read() == b"ping " * 1000  # the other direction still flowed after our EOF
    assert await s.read() == b""
    await s.wait_closed()
    assert s._ws.close_code == 1000


async def test_half_close_target_first(env) -> None:
    n = 3 * 1024 * 1024
    s = await _open(env, f"SEND {n} 3 {8 * 1024 * 1024}")  # reads back slowly: our bytes queue up
    data = await s.read()  # until the target's EOF
    assert len(data) == n and hashlib.sha256(data).hexdigest() == expected_sha(n, 3)
    # the target half-closed; we can still send, and it receives every byte
    late = os.urandom(12 * 1024 * 1024)  # three SSH windows: still in flight when our EOF comes
    s.write(late)
    await s.drain()
    s.write_eof()
    await s.wait_closed()
    m = env["target"].wait_line(r"received ([0-9a-f]+)", 15)
    assert m.group(1) == hashlib.sha256(late).hexdigest()


async def test_far_end_reset_is_an_error(env) -> None:
    s = await _open(env, "RESET")
    with pytest.raises(WraithError) as ei:
        while await s.read(65536):
            pass
    assert ei.value.code == "ECONNRESET"


async def test_client_abort_resets_channel(env) -> None:
    s = await _open(env, "HASH")
    s.write(b"partial")
    await s.drain()
    s.abort()
    await s.wait_closed()
    # the daemon keeps serving, and no hash of a truncated upload was ever produced
    s2 = await _open(env, "HASH")
    s2.write_eof()
    assert await s2.read() == hashlib.sha256(b"").hexdigest().encode()


async def test_pooling_second_stream_is_a_channel_not_a_session(env) -> None:
    server = env["server"]
    s1 = await _open(env, "ECHO")
    assert s1.opened["pooled"] is False
    s2 = await _open(env, "ECHO")
    assert s2.opened["pooled"] is True and s2.opened["session"] == s1.opened["session"]
    for s in (s1, s2):
        s.write(b"x")
        await s.drain()
        s.write_eof()
        assert await s.read() == b"x"
        await s.wait_closed()
    assert server.log().count("connection opened") == 1
    # a different identity is a different session
    other = env["keys"].dir / "other_key"
    from wraith_core.keys import generate_ed25519

    generate_ed25519(other, "other")
    with pytest.raises(WraithError) as ei:
        await _open(env, "ECHO", identity=str(other))
    assert ei.value.code == "EAUTH"
    assert server.log().count("connection opened") == 2
    # after the linger (1 s here) the idle session is closed; the next stream makes a new one
    await asyncio.sleep(2.0)
    s3 = await _open(env, "ECHO")
    assert s3.opened["pooled"] is False
    await s3.aclose()
    assert server.log().count("connection opened") == 3


async def test_many_concurrent_streams(env) -> None:
    blobs = [os.urandom(100_000 + i) for i in range(100)]

    async def one(b: bytes) -> str:
        s = await _open(env, "HASH")
        s.write(b)
        await s.drain()
        s.write_eof()
        out = (await s.read()).decode()
        await s.wait_closed()
        return out

    t0 = time.monotonic()
    results = await asyncio.gather(*(one(b) for b in blobs))
    assert results == [hashlib.sha256(b).hexdigest() for b in blobs]
    assert time.monotonic() - t0 < 40
    assert env["server"].log().count("connection opened") == 1


async def test_error_codes(env, tmp_path) -> None:
    keys = env["keys"]

    async def code(**over) -> str:
        with pytest.raises(WraithError) as ei:
            s = await wraith_client.connect(**dict(env["opts"], **over))
            await s.aclose()
        return ei.value.code

    from helpers import free_port

    closed = free_port()
    assert await code(target=f"127.0.0.1:{closed}") == "ECONNREFUSED"
    assert await code(target="wraith-secret:1") == "EPROHIBITED"
    assert await code(server=f"127.0.0.1:{closed}") == "ECONNREFUSED"
    assert await code(identity=str(keys.host)) == "EAUTH"
    assert await code(host_key=str(keys.client_pub)) == "EHOSTKEY"
    assert await code(identity=str(tmp_path / "missing")) == "EKEY"
    assert await code(no_such_option=1) == "EUSAGE"
    assert await code(host_key=None) == "EUSAGE"        # no host key verification at all
    assert await code(window="big") == "EUSAGE"
    assert await code(target="nonsense") == "EUSAGE"
    # key material as bytes works too
    s = await wraith_client.connect(**dict(env["opts"], identity=keys.client.read_bytes(),
                                           host_key=keys.host_pub.read_bytes(),
                                           target=f"127.0.0.1:{env['tport']}"))
    s.write(b"HASH\n")
    s.write_eof()
    assert await s.read() == hashlib.sha256(b"").hexdigest().encode()
    assert env["daemon"].p.poll() is None


async def test_events_on_zmq_and_websocket(env) -> None:
    import zmq
    import zmq.asyncio

    info = env["info"]
    assert info["events"].startswith("ipc://")
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"session.")
    sub.setsockopt(zmq.SUBSCRIBE, b"stream.")
    sub.connect(info["events"])
    feed_events: list[str] = []

    async def feed() -> None:
        async for ev in wraith_client.events(daemon=info["ws"]):
            feed_events.append(ev["event"])

    ft = asyncio.create_task(feed())
    await asyncio.sleep(0.5)  # PUB/SUB and the feed join before anything is published
    try:
        s = await _open(env, "ECHO")
        s.write_eof()
        await s.read()
        await s.wait_closed()
        seen: list[tuple[str, dict]] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                topic, payload = await asyncio.wait_for(sub.recv_multipart(), 1)
            except asyncio.TimeoutError:
                continue
            msg = msgpack.unpackb(payload)
            assert msg["event"] == topic.decode()
            seen.append((msg["event"], msg["data"]))
            if msg["event"] == "session.closed":
                break
        names = [e for e, _ in seen]
        for want in ("session.connecting", "session.up", "stream.opened", "stream.closed", "session.closed"):
            assert want in names, names
        assert names.index("session.up") < names.index("stream.opened") < names.index("stream.closed")
        closed = dict(seen)["stream.closed"]
        assert closed["clean"] is True
        # no target ever appears in an event
        assert str(env["tport"]) not in repr(seen)
        deadline = time.monotonic() + 5  # the WebSocket feed may trail the ZeroMQ socket a little
        while "session.closed" not in feed_events and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for want in ("session.up", "stream.opened", "stream.closed", "session.closed"):
            assert want in feed_events, feed_events
    finally:
        ft.cancel()
        sub.close(0)
        ctx.term()


async def test_serve_through_daemon(env, tmp_path) -> None:
    keys = env["keys"]
    info = env["info"]
    srv = await wraith_client.serve(host_key=str(keys.host), authorized_keys=str(keys.authorized),
                                    listen="127.0.0.1:0", daemon=info["ws"])
    assert srv.addresses and srv.addresses[0].startswith("127.0.0.1:")
    port = int(srv.addresses[0].rsplit(":", 1)[1])
    # a client connects to that server's control channel (default target), through the daemon too
    client = await wraith_client.connect(**dict(env["opts"], server=f"127.0.0.1:{port}"))
    stream, cinfo = await asyncio.wait_for(srv.__aiter__().__anext__(), 10)
    assert cinfo.key_fingerprint.startswith("SHA256:") and cinfo.transport == "tcp"
    assert cinfo.remote_address.startswith("127.0.0.1")
    payload = os.urandom(3 * 1024 * 1024)
    client.write(payload)
    await client.drain()
    client.write_eof()
    got = await stream.read()
    assert got == payload
    stream.write(b"answer")
    stream.write_eof()
    assert await client.read() == b"answer"
    await asyncio.gather(client.wait_closed(), stream.wait_closed())
    # callbacks work too
    seen: asyncio.Future = asyncio.get_running_loop().create_future()
    srv.on_connection(lambda st, i: seen.set_result((st, i)))
    c2 = await wraith_client.connect(**dict(env["opts"], server=f"127.0.0.1:{port}"))
    st2, _ = await asyncio.wait_for(seen, 10)
    c2.write(b"hi")
    await c2.drain()
    assert await st2.read(2) == b"hi"
    await srv.close()
    # closing the server ends its sessions and its listener
    with pytest.raises(WraithError):
        while await st2.read(100):
            pass
    await asyncio.sleep(0.3)
    with pytest.raises(WraithError) as ei:
        await wraith_client.connect(**dict(env["opts"], server=f"127.0.0.1:{port}"))
    assert ei.value.code == "ECONNREFUSED"
    # a serve with bad options is an error with a code, and the daemon goes on
    with pytest.raises(WraithError) as ei:
        await wraith_client.serve(host_key=str(keys.host), daemon=info["ws"])
    assert ei.value.code == "EUSAGE"
    with pytest.raises(WraithError) as ei:
        await wraith_client.serve(host_key=str(keys.host), authorized_keys=str(keys.authorized),
                                  listen=f"127.0.0.1:{env['sport']}", daemon=info["ws"])
    assert ei.value.code == "EADDRINUSE"


async def test_session_lost_is_visible(env) -> None:
    feed_events: list[tuple[str, dict]] = []

    async def feed() -> None:
        async for ev in wraith_client.events(topics=["session."], daemon=env["info"]["ws"]):
            feed_events.append((ev["event"], ev["data"]))

    ft = asyncio.create_task(feed())
    await asyncio.sleep(0.3)
    try:
        s = await _open(env, "ECHO")
        s.write(b"abc")
        await s.drain()
        assert await s.readexactly(3) == b"abc"
        env["server"].signal(9)  # the SSH server vanishes mid-stream
        with pytest.raises(WraithError) as ei:
            while await s.read(100):
                pass
        assert ei.value.code in ("ECONNRESET", "ESESSION")
        deadline = time.monotonic() + 10
        while "session.lost" not in [e for e, _ in feed_events] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert "session.lost" in [e for e, _ in feed_events], feed_events
        # the dead session left the pool: the next stream tries a new one (and the server is gone)
        with pytest.raises(WraithError) as ei:
            await _open(env, "ECHO")
        assert ei.value.code == "ECONNREFUSED"
        assert env["daemon"].p.poll() is None
    finally:
        ft.cancel()


def test_a_burst_of_connects_finds_room_in_the_accept_queue(tmp_path, procs) -> None:
    """A program opening many streams at once: a full Unix socket accept queue fails a
    connect at once (EAGAIN), so the daemon keeps a deep one."""
    daemon, info = start_daemon(tmp_path)
    procs.append(daemon)
    assert info["ws"].startswith("unix:")
    daemon.signal(signal.SIGSTOP)  # nothing is accepted meanwhile
    socks, refused = [], 0
    try:
        for _ in range(1000):
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(info["ws"][5:])
            except (BlockingIOError, InterruptedError):
                refused += 1
            socks.append(s)
    finally:
        daemon.signal(signal.SIGCONT)
        for s in socks:
            s.close()
    assert refused == 0
