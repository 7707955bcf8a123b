"""bindings/python (wraith_client) end to end: real wraith serve, real daemon, autostart, shutdown, pubsub."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import wraith_client
from wraith_client import WraithError

from helpers import PY, Keys, start_server
from test_daemon_support import conn_opts, start_daemon, start_target


@pytest.fixture
def env(keys: Keys, tmp_path, procs):
    server, sport = start_server(keys, tmp_path)
    procs.append(server)
    target, tport = start_target(tmp_path)
    procs.append(target)
    return {"server": server, "sport": sport, "tport": tport, "keys": keys}


def _client_script(tmp: Path, body: str) -> Path:
    p = tmp / "client.py"
    p.write_text(textwrap.dedent("""
        import asyncio, hashlib, json, os, sys, time
        import wraith_client
        OPTS = json.loads(sys.argv[1])
        async def main():
        """) + textwrap.indent(textwrap.dedent(body), "    ") + "\nasyncio.run(main())\n")
    return p


def _env_without_daemon(tmp: Path, **extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("WRAITH_DAEMON", "WRAITH_DAEMON_TOKEN")}
    xdg = tmp / "xdg-empty"
    xdg.mkdir(exist_ok=True)
    e["XDG_RUNTIME_DIR"] = str(xdg)  # no daemon.json here: the client must start its own
    e.update(extra)
    return e


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie of an already-exited child counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_autostart_and_clean_shutdown_at_exit(env, tmp_path) -> None:
    opts = dict(conn_opts(env["keys"], env["sport"]), target=f"127.0.0.1:{env['tport']}")
    script = _client_script(tmp_path, """
        s = await wraith_client.connect(**OPTS)
        child = wraith_client.child_daemon()
        print("child", child.proc.pid, child.dir, flush=True)
        blob = os.urandom(2_000_000)
        s.write(b"HASH\\n" + blob); s.write_eof()
        print("hash-ok", (await s.read()).decode() == hashlib.sha256(blob).hexdigest(), flush=True)
        s2 = await wraith_client.connect(**OPTS)
        print("pooled", s2.opened["pooled"], flush=True)
        s2.abort()
        # leave without calling shutdown(): the atexit hook must stop the child
    """)
    r = subprocess.run([PY, str(script), json.dumps(opts)], env=_env_without_daemon(tmp_path),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert lines["hash-ok"] == "True" and lines["pooled"] == "True"
    pid, cdir = lines["child"].split()
    assert _wait_gone(int(pid), 10), "the child daemon outlived its client"
    assert not Path(cdir).exists(), "the child daemon's temp dir was left behind"
    # nothing was published for other clients to find
    assert not (tmp_path / "xdg-empty" / "wraith").exists()


def test_child_daemon_dies_with_a_killed_client(env, tmp_path) -> None:
    opts = dict(conn_opts(env["keys"], env["sport"]), target=f"127.0.0.1:{env['tport']}")
    script = _client_script(tmp_path, """
        s = await wraith_client.connect(**OPTS)
        print("child", wraith_client.child_daemon().proc.pid, wraith_client.child_daemon().dir, flush=True)
        await asyncio.sleep(60)
    """)
    p = subprocess.Popen([PY, str(script), json.dumps(opts)], env=_env_without_daemon(tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.startswith("child "), p.stderr.read() if p.poll() is not None else line
        pid = int(line.split()[1])
        cdir = Path(line.split()[2])
        assert _alive(pid)
        os.kill(p.pid, signal.SIGKILL)  # no atexit, no cleanup: only the stdin lifeline is left
        p.wait(5)
        assert _wait_gone(pid, 10), "the child daemon survived its SIGKILLed client"
        # nobody removes the client's temp dir now; at least it holds no log (and the daemon
        # removed its own files on the way out)
        left = sorted(str(f.relative_to(cdir)) for f in cdir.rglob("*"))
        assert left == ["d"], left
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


async def test_shutdown_stops_the_child(env, tmp_path, monkeypatch) -> None:
    for k, v in _env_without_daemon(tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WRAITH_DAEMON", raising=False)
    opts = conn_opts(env["keys"], env["sport"])
    s = await wraith_client.connect(**opts, target=f"127.0.0.1:{env['tport']}")
    child = wraith_client.child_daemon()
    assert child is not None and child.proc.poll() is None
    ep = await wraith_client.resolve()
    assert ep.source == "child daemon"
    # the same child serves the next stream (no second daemon)
    s2 = await wraith_client.connect(**opts, target=f"127.0.0.1:{env['tport']}")
    assert wraith_client.child_daemon() is child and s2.opened["pooled"] is True
    s.abort()
    s2.abort()
    await wraith_client.shutdown()
    assert child.proc.poll() == 0  # exited by itself on stdin EOF, cleanly
    assert wraith_client.child_daemon() is None and not Path(child.dir).exists()


def test_missing_python_or_wraith_core_says_what_to_install(env, tmp_path) -> None:
    opts = conn_opts(env["keys"], env["sport"])
    script = _client_script(tmp_path, """
        try:
            await wraith_client.connect(**OPTS)
        except wraith_client.WraithError as e:
            print(e.code, str(e).replace("\\n", " "), flush=True)
    """)
    r = subprocess.run([PY, str(script), json.dumps(opts)], capture_output=True, text=True, timeout=60,
                       env=_env_without_daemon(tmp_path, WRAITH_PYTHON="/nonexistent/python3"))
    assert r.stdout.startswith("EDAEMON ") and "WRAITH_PYTHON" in r.stdout and "pip install" in r.stdout, r
    fake = tmp_path / "python-without-wraith"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -S -I \"$@\"\n")  # no site-packages
    fake.chmod(0o755)
    r = subprocess.run([PY, str(script), json.dumps(opts)], capture_output=True, text=True, timeout=60,
                       env=_env_without_daemon(tmp_path, WRAITH_PYTHON=str(fake)))
    assert r.stdout.startswith("EDAEMON ") and "wraith_core is not installed" in r.stdout, r
    assert "pip install 'wraith[daemon]'" in r.stdout


async def test_discovery_via_daemon_json_and_env(env, tmp_path, procs, monkeypatch) -> None:
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    d = subprocess.Popen([PY, "-m", "wraith_core", "daemon"], env=dict(os.environ, XDG_RUNTIME_DIR=str(xdg)),
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert d.stdout is not None
        for line in d.stdout:
            if line.startswith("wraith daemon: ready"):
                break
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
        monkeypatch.delenv("WRAITH_DAEMON", raising=False)
        ep = await wraith_client.resolve(autostart=False)
        assert ep.source == "daemon.json" and ep.ws == f"unix:{xdg}/wraith/daemon.sock"
        assert ep.events == f"ipc://{xdg}/wraith/events.sock"
        s = await wraith_client.connect(**conn_opts(env["keys"], env["sport"]),
                                        target=f"127.0.0.1:{env['tport']}")
        assert wraith_client.child_daemon() is None
        s.write(b"HASH\n")
        s.write_eof()
        assert len(await s.read()) == 64
        # events over ZeroMQ found through daemon.json
        agen = wraith_client.zmq_events(["stream."])
        nxt = asyncio.ensure_future(agen.__anext__())
        await asyncio.sleep(0.5)
        s2 = await wraith_client.connect(**conn_opts(env["keys"], env["sport"]),
                                         target=f"127.0.0.1:{env['tport']}")
        ev = await asyncio.wait_for(nxt, 10)
        while ev["event"] != "stream.opened":  # the first stream's close may come first
            ev = await asyncio.wait_for(agen.__anext__(), 10)
        assert ev["data"]["kind"] == "connect" and ev["data"]["session"]
        s2.abort()
        await agen.aclose()
        # a stale daemon.json (dead pid) is ignored
        d.terminate()
        d.wait(10)
        info = {"version": 1, "pid": 999999, "ws": "unix:/nonexistent.sock", "events": None}
        (xdg / "wraith" / "daemon.json").write_text(json.dumps(info))
        with pytest.raises(wraith_client.DaemonError):
            await wraith_client.resolve(autostart=False)
    finally:
        if d.poll() is None:
            d.terminate()
            d.wait(10)
    # WRAITH_DAEMON + WRAITH_DAEMON_TOKEN for a TCP daemon
    p, info = start_daemon(tmp_path, "--ws", "tcp:127.0.0.1:0", name="tcpd")
    procs.append(p)
    monkeypatch.setenv("WRAITH_DAEMON", info["ws"])
    monkeypatch.setenv("WRAITH_DAEMON_TOKEN", Path(info["tokenFile"]).read_text().strip())
    s = await wraith_client.connect(**conn_opts(env["keys"], env["sport"]), target=f"127.0.0.1:{env['tport']}")
    s.write(b"HASH\n")
    s.write_eof()
    assert len(await s.read()) == 64
    monkeypatch.setenv("WRAITH_DAEMON_TOKEN", "wrong")
    with pytest.raises(wraith_client.DaemonError, match="401"):
        await wraith_client.connect(**conn_opts(env["keys"], env["sport"]))


async def test_pubsub_through_the_hub_and_point_to_point(env, tmp_path, procs) -> None:
    p, info = start_daemon(tmp_path)
    procs.append(p)
    opts = dict(conn_opts(env["keys"], env["sport"], info))
    # two clients on wraith serve's hub (default target = wraith-control:0)
    a = wraith_client.create_event_target(await wraith_client.connect(**opts))
    b = wraith_client.create_event_target(await wraith_client.connect(**opts))
    got: asyncio.Queue = asyncio.Queue()
    a.add_event_listener("chat", lambda ev: got.put_nowait(ev.detail))
    await asyncio.wait_for(b.wait_subscribed("chat"), 10)
    assert b.dispatch_event(wraith_client.Event("chat", {"text": "hi", "n": 1}))
    assert await asyncio.wait_for(got.get(), 10) == {"text": "hi", "n": 1}
    a.close()
    b.close()
    await asyncio.gather(a.wait_closed(), b.wait_closed())

    # serve() in the daemon + connect() to it: events both ways, point to point
    srv = await wraith_client.serve(host_key=str(env["keys"].host), authorized_keys=str(env["keys"].authorized),
                                    listen="127.0.0.1:0", daemon=info["ws"])
    incoming: asyncio.Queue = asyncio.Queue()
    srv.on_connection(lambda st, i: incoming.put_nowait((st, i)))
    c = wraith_client.create_event_target(await wraith_client.connect(**dict(opts, server=srv.addresses[0])))
    st, cinfo = await asyncio.wait_for(incoming.get(), 10)
    assert cinfo.user and cinfo.key_fingerprint.startswith("SHA256:")
    s = wraith_client.create_event_target(st)
    to_server: asyncio.Queue = asyncio.Queue()
    to_client: asyncio.Queue = asyncio.Queue()
    s.add_event_listener("ping", lambda ev: to_server.put_nowait(ev.detail))
    c.add_event_listener("pong", lambda ev: to_client.put_nowait(ev.detail))
    await asyncio.wait_for(c.wait_subscribed("ping"), 10)
    await asyncio.wait_for(s.wait_subscribed("pong"), 10)
    assert not c.dispatch_event(wraith_client.Event("unwanted", 1))  # the peer did not subscribe
    assert c.dispatch_event(wraith_client.Event("ping", [1, 2, 3]))
    assert await asyncio.wait_for(to_server.get(), 10) == [1, 2, 3]
    assert s.dispatch_event(wraith_client.Event("pong", {"ok": True}))
    assert await asyncio.wait_for(to_client.get(), 10) == {"ok": True}
    c.close()
    await c.wait_closed()
    await srv.close()


async def test_client_never_imports_the_ssh_stack(tmp_path) -> None:
    code = ("import sys, wraith_client; wraith_client.create_event_target; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('asyncssh', 'wraith_core', 'cryptography')))")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


async def test_errors_carry_codes(env, tmp_path, procs) -> None:
    p, info = start_daemon(tmp_path)
    procs.append(p)
    opts = conn_opts(env["keys"], env["sport"], info)
    with pytest.raises(WraithError) as ei:
        await wraith_client.connect(**dict(opts, identity=str(env["keys"].host)))
    assert ei.value.code == "EAUTH"
    with pytest.raises(WraithError) as ei:
        await wraith_client.connect(**dict(opts, host_key=str(env["keys"].client_pub)))
    assert ei.value.code == "EHOSTKEY"
    with pytest.raises(WraithError) as ei:
        await wraith_client.connect(**dict(opts, daemon="unix:/nonexistent/daemon.sock"))
    assert ei.value.code == "EDAEMON"
    # relative key paths are resolved against the client's working directory, not the daemon's
    old = os.getcwd()
    os.chdir(env["keys"].dir)
    try:
        s = await wraith_client.connect(**dict(opts, identity="client_key", host_key="host_key.pub",
                                               target=f"127.0.0.1:{env['tport']}"))
        s.write(b"HASH\n")
        s.write_eof()
        assert len(await s.read()) == 64
        await s.wait_closed()
    finally:
        os.chdir(old)


def test_discovery_trusts_only_a_private_daemon_json(tmp_path, monkeypatch) -> None:
    """daemon.json and the token are read only from a directory that is ours and 0700, and
    only if they are small regular files of ours; the tokenFile must sit beside daemon.json.
    (In /tmp another user could create the directory first and point us at their listener,
    with a tokenFile naming one of our secrets.)"""
    import json
    import os

    from wraith_client import daemon as d

    monkeypatch.delenv("WRAITH_DAEMON", raising=False)
    monkeypatch.delenv("WRAITH_DAEMON_TOKEN", raising=False)
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    home = xdg / "wraith"
    home.mkdir(mode=0o700)
    secret = tmp_path / "secret"
    secret.write_text("victim-api-token\n")

    def write(info: dict, token_file: str | None = None) -> None:
        (home / "daemon.json").write_text(json.dumps({"version": 1, "pid": os.getpid(), "ws": "tcp:127.0.0.1:9",
                                                      "events": None, "tokenFile": token_file, **info}))

    (home / "token").write_text("good-token\n")
    write({}, str(home / "token"))
    ep = d.discover()
    assert ep is not None and ep.source == "daemon.json" and ep.token == "good-token"
    write({}, str(secret))  # a token file elsewhere: daemon.json is not trusted at all
    assert d.discover() is None
    write({"ws": 5})
    assert d.discover() is None
    write({}, str(home / "token"))
    os.chmod(home, 0o755)  # a directory others can use
    assert d.discover() is None
    os.chmod(home, 0o700)
    os.chown(home / "daemon.json", 65534, 65534)  # a file someone else wrote
    assert d.discover() is None
    os.chown(home / "daemon.json", 0, 0)
    os.chown(home, 65534, 65534)  # a directory someone else made
    assert d.discover() is None
    os.chown(home, 0, 0)
    (home / "daemon.json").unlink()
    os.mkfifo(home / "daemon.json")  # never blocks on a FIFO
    assert d.discover() is None
    monkeypatch.setenv("WRAITH_DAEMON", "tcp:127.0.0.1:9")  # explicit endpoint: token from the private dir
    assert d.discover() is not None and d.discover().token == "good-token"  # type: ignore[union-attr]
    for elsewhere in ("tcp:198.51.100.7:9", "tcp:example.com:80", "tcp:[2001:db8::1]:9"):
        monkeypatch.setenv("WRAITH_DAEMON", elsewhere)  # the local token file goes to no other host
        assert d.discover().token is None, elsewhere  # type: ignore[union-attr]
    monkeypatch.setenv("WRAITH_DAEMON", "tcp:[::1]:9")
    assert d.discover().token == "good-token"  # type: ignore[union-attr]
    os.chmod(home / "token", 0o644)
    os.chown(home / "token", 65534, 65534)
    assert d.discover().token is None  # type: ignore[union-attr]


async def _fake_daemon(tmp_path, script) -> tuple[object, str]:
    """A scripted daemon on a Unix socket: ``script(ws, first_message)`` plays its part."""
    import msgpack
    from websockets.asyncio.server import unix_serve

    async def handler(ws) -> None:  # type: ignore[no-untyped-def]
        first = msgpack.unpackb(await ws.recv())
        await script(ws, first)
        await ws.wait_closed()

    path = str(tmp_path / f"fake-{len(list(tmp_path.iterdir()))}.sock")
    server = await unix_serve(handler, path)
    return server, f"unix:{path}"


async def test_a_broken_daemon_gives_errors_never_hangs_or_skips(tmp_path) -> None:
    """No answer: a timeout. Truncated or mistyped data on a stream: EPROTO, not a silently
    shorter stream. abort() with a daemon that stopped reading: drain() fails with a stream
    error, wait_closed() returns."""
    import msgpack
    import wraith_client
    from wraith_client.daemon import Endpoint
    from wraith_client.stream import open_stream

    async def silent(ws, first) -> None:  # type: ignore[no-untyped-def]
        await asyncio.sleep(30)

    server, ep = await _fake_daemon(tmp_path, silent)
    ws = await Endpoint(ep).open()
    t0 = time.monotonic()
    with pytest.raises(wraith_client.WraithError) as info:
        await open_stream(ws, {"type": "open", "kind": "connect", "options": {}}, timeout=1)
    assert info.value.code == "ETIMEDOUT" and time.monotonic() - t0 < 5
    server.close()

    opened = msgpack.packb({"type": "opened", "kind": "connect", "id": "s1"})
    good = msgpack.packb({"type": "data", "data": b"AB"}, use_bin_type=True)
    for bad in (good[:-3], msgpack.packb({"type": "data", "data": "C"}), msgpack.packb({"type": "surprise"})):
        async def script(ws, first, bad=bad) -> None:  # type: ignore[no-untyped-def]
            await ws.send(opened)
            await ws.send(good)
            await ws.send(bad)
            await ws.send(msgpack.packb({"type": "eof"}))

        server, ep = await _fake_daemon(tmp_path, script)
        s = await wraith_client.connect(daemon=ep, server="127.0.0.1:1", identity=b"k", host_key="SHA256:x")
        assert await s.read(2) == b"AB"
        with pytest.raises(wraith_client.WraithError) as info:
            await s.read()
        assert info.value.code == "EPROTO", bad
        server.close()

    async def no_reading(ws, first) -> None:  # type: ignore[no-untyped-def]
        await ws.send(opened)
        ws.transport.pause_reading()  # takes nothing more
        await asyncio.sleep(30)

    server, ep = await _fake_daemon(tmp_path, no_reading)
    s = await wraith_client.connect(daemon=ep, server="127.0.0.1:1", identity=b"k", host_key="SHA256:x")
    blob = bytes(1 << 20)

    async def writer() -> None:
        while True:
            s.write(blob)
            await s.drain()

    task = asyncio.create_task(writer())
    await asyncio.sleep(1)
    assert not task.done()  # blocked in drain
    s.abort()
    with pytest.raises(wraith_client.WraithError):
        await asyncio.wait_for(task, 5)
    await asyncio.wait_for(s.wait_closed(), 5)
    server.close()


async def test_a_serve_control_with_a_broken_incoming_message_ends_cleanly(tmp_path, caplog) -> None:
    """An ``incoming`` without an id (or any message a serve control does not get) is a
    protocol error: the server's iteration ends; nothing raises KeyError in a task."""
    import msgpack
    import wraith_client

    async def script(ws, first) -> None:  # type: ignore[no-untyped-def]
        await ws.send(msgpack.packb({"type": "opened", "kind": "serve", "id": "v1", "addresses": ["127.0.0.1:1"]}))
        await ws.send(msgpack.packb({"type": "incoming", "info": {}}))

    server, ep = await _fake_daemon(tmp_path, script)
    srv = await wraith_client.serve(daemon=ep, key=b"k", authorized_keys=b"a")
    got = []

    async def drain_server() -> None:
        async for item in srv:
            got.append(item)

    await asyncio.wait_for(drain_server(), 5)
    assert got == []
    assert any("broke the IPC protocol" in r.getMessage() for r in caplog.records)
    await srv.close()
    server.close()


def test_daemon_messages_are_decoded_within_limits() -> None:
    """What the daemon sends is decoded with the limits the daemon applies to its own input:
    a few bytes of msgpack can stand for millions of empty arrays."""
    import msgpack
    from wraith_client import _ipc

    bomb = b"\x82\xa4type\xa5error\xa4info\xdd" + (4_000_000).to_bytes(4, "big") + b"\x90" * 4_000_000
    with pytest.raises(_ipc.ProtocolViolation):  # over 1 MiB and not a data message
        _ipc.decode(bomb)
    small = msgpack.packb({"type": "error", "info": [[]] * 2000})
    with pytest.raises(_ipc.ProtocolViolation):  # an array longer than any message has
        _ipc.decode(small)
    big = bytes(4 << 20)
    assert _ipc.decode(_ipc.encode_data(big)) == {"type": "data", "data": big}
    assert _ipc.decode(msgpack.packb({"type": "opened", "kind": "connect", "id": "s1"}))["id"] == "s1"


async def test_a_daemon_that_dies_fails_writes_with_a_code(tmp_path) -> None:
    """The daemon's socket reset under a writer: drain() raised a bare ConnectionResetError,
    the next write() was taken silently, and a flusher nobody drained printed "Task
    exception was never retrieved". Now: WraithError ECONNRESET, from drain and write."""
    import gc

    import msgpack
    import wraith_client

    opened = msgpack.packb({"type": "opened", "kind": "connect", "id": "s1"})

    async def reset_later(ws, first) -> None:  # type: ignore[no-untyped-def]
        await ws.send(opened)
        ws.transport.pause_reading()  # the client's bytes pile up unread …
        await asyncio.sleep(1)
        ws.transport.abort()  # … then a close with unread data: the client sees a reset

    loop = asyncio.get_running_loop()
    reported: list[dict] = []
    old_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    server, ep = await _fake_daemon(tmp_path, reset_later)
    try:
        drained = await wraith_client.connect(daemon=ep, server="127.0.0.1:1", identity=b"k", host_key="SHA256:x")
        undrained = await wraith_client.connect(daemon=ep, server="127.0.0.1:1", identity=b"k", host_key="SHA256:x")
        blob = bytes(1 << 20)

        async def writer() -> None:
            while True:
                drained.write(blob)
                await drained.drain()

        task = asyncio.create_task(writer())
        for _ in range(30):
            undrained.write(blob)  # never drained: the flusher's end is nobody's business
        with pytest.raises(WraithError) as err:
            await asyncio.wait_for(task, 10)
        assert err.value.code == "ECONNRESET", err.value
        with pytest.raises(WraithError):
            drained.write(b"z")
        flusher = undrained._flusher
        assert flusher is not None
        for _ in range(100):  # bounded: until the flusher met the reset (not awaited on purpose)
            if flusher.done():
                break
            await asyncio.sleep(0.05)
        assert flusher.done()
        with pytest.raises(WraithError):
            undrained.write(b"z")
        del undrained, flusher
        gc.collect()
        await asyncio.sleep(0)
        assert not reported, reported
    finally:
        loop.set_exception_handler(old_handler)
        server.close()


async def test_the_api_misuses_asyncio_refuses_are_refused(tmp_path) -> None:
    """readexactly(-1) raises ValueError (it returned b""), and a second read() while one
    waits raises the binding's error (it was websockets' ConcurrencyError)."""
    import msgpack
    import wraith_client

    async def quiet(ws, first) -> None:  # type: ignore[no-untyped-def]
        await ws.send(msgpack.packb({"type": "opened", "kind": "connect", "id": "s1"}))
        await asyncio.sleep(30)

    server, ep = await _fake_daemon(tmp_path, quiet)
    try:
        s = await wraith_client.connect(daemon=ep, server="127.0.0.1:1", identity=b"k", host_key="SHA256:x")
        with pytest.raises(ValueError):
            await s.readexactly(-1)
        first = asyncio.create_task(s.read(10))
        await asyncio.sleep(0.05)
        for second in (s.read(10), s.readexactly(1)):
            with pytest.raises(wraith_client.UsageError) as err:
                await second
            assert isinstance(err.value, WraithError) and err.value.code == "EUSAGE"
        assert not first.done()
        first.cancel()
        s.abort()
    finally:
        server.close()


async def test_close_with_unread_data_does_not_wait_out_the_close_timeout(env, tmp_path, procs) -> None:
    """A download nobody reads, then close(): the daemon's answer to our close waited behind
    the unread data until websockets gave up (5 s) and cut the connection. Now what still
    comes is dropped while closing: the closing handshake completes — before our eof
    (an abort for the daemon anyway) and after it (a graceful close)."""
    p, info = start_daemon(tmp_path)
    procs.append(p)
    opts = dict(conn_opts(env["keys"], env["sport"], info), target=f"127.0.0.1:{env['tport']}")
    for eof_first in (False, True):
        s = await wraith_client.connect(**opts)
        s.write(b"SEND 500000000 3\n")
        await s.drain()
        if eof_first:
            s.write_eof()
        await asyncio.sleep(1)  # the download fills every buffer on the way
        await s.aclose()
        assert s._ws.protocol.close_rcvd is not None, "the connection was cut, not closed"


async def test_a_daemon_shutting_down_is_edaemon(env, tmp_path, procs) -> None:
    """SIGTERM: the daemon closes every stream with 1001; the binding said ECONNRESET (as for
    a reset target). docs/ipc.md §5: EDAEMON is the daemon shutting down."""
    p, info = start_daemon(tmp_path)
    procs.append(p)
    keys = env["keys"]
    s = await wraith_client.connect(**conn_opts(keys, env["sport"], info), target=f"127.0.0.1:{env['tport']}")
    s.write(b"ECHO\n")
    await s.drain()
    # and a stream the daemon's own server accepted (its session ends with the server)
    srv = await wraith_client.serve(host_key=str(keys.host), authorized_keys=str(keys.authorized),
                                    listen="127.0.0.1:0", daemon=info["ws"])
    peer = await wraith_client.connect(**dict(conn_opts(keys, env["sport"], info), server=srv.addresses[0]))
    accepted = (await asyncio.wait_for(srv.__aiter__().__anext__(), 20))[0]
    readers = [asyncio.create_task(x.read()) for x in (s, peer, accepted)]
    await asyncio.sleep(0.2)
    p.signal(signal.SIGTERM)
    for reading in readers:
        with pytest.raises(WraithError) as err:
            await asyncio.wait_for(reading, 20)
        assert err.value.code == "EDAEMON", err.value
    with pytest.raises(WraithError) as err:
        s.write(b"more")
        await s.drain()
    assert err.value.code in ("EDAEMON", "EPIPE"), err.value


def test_the_package_ships_its_type_information(tmp_path) -> None:
    """PEP 561: a py.typed marker in the built package (what build_py puts in a wheel)."""
    import shutil

    from helpers import ROOT

    src = tmp_path / "src"
    shutil.copytree(ROOT / "bindings" / "python", src,
                    ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    r = subprocess.run([PY, "-c", "import setuptools; setuptools.setup()", "-q", "build_py", "-d", str(tmp_path / "out")],
                       cwd=src, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    built = tmp_path / "out" / "wraith_client"
    assert (built / "stream.py").exists() and (built / "py.typed").exists()
