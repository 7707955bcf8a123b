"""Daemon security rules: 0700 dir, 0600 sockets/files, bearer token on TCP, no Origin, no other uid."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from helpers import PY, wraith
from test_daemon_support import raw_ws, start_daemon

UPGRADE = ["-H", "Connection: Upgrade", "-H", "Upgrade: websocket", "-H", "Sec-WebSocket-Version: 13",
           "-H", "Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)).decode()]


def mode(p: Path | str) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


async def _status(info, headers=None) -> int:
    try:
        ws = await raw_ws(info, headers)
    except InvalidStatus as exc:
        return exc.response.status_code
    await ws.close()
    return 101


def test_permissions_and_discovery_file(tmp_path, procs) -> None:
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    p, info = start_daemon(tmp_path, name="perm", env={"XDG_RUNTIME_DIR": str(xdg)})
    procs.append(p)
    # with --dir (what start_daemon passes) …
    d = tmp_path / "perm-dir"
    assert mode(d) == 0o700
    assert info["ws"] == f"unix:{d}/daemon.sock" and info["events"] == f"ipc://{d}/events.sock"
    for f in ("daemon.sock", "events.sock", "daemon.json"):
        assert mode(d / f) == 0o600, f
    assert info["pid"] == p.p.pid and info["tokenFile"] is None
    # … and the default directory $XDG_RUNTIME_DIR/wraith, made 0700 even if it existed wider
    (xdg / "wraith").mkdir(mode=0o755)
    os.chmod(xdg / "wraith", 0o755)
    q = subprocess.Popen(wraith("daemon"), env=dict(os.environ, XDG_RUNTIME_DIR=str(xdg)),
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert q.stdout is not None
        line = q.stdout.readline().decode()
        assert line.startswith(f"wraith daemon: ws unix:{xdg}/wraith/daemon.sock"), line
        assert mode(xdg / "wraith") == 0o700 and mode(xdg / "wraith" / "daemon.sock") == 0o600
    finally:
        q.terminate()
        assert q.wait(10) == 0
    # clean exit removes the discovery file and the sockets
    assert not (xdg / "wraith" / "daemon.json").exists()
    assert not (xdg / "wraith" / "daemon.sock").exists()


def test_a_named_directory_is_never_loosened_or_tightened(tmp_path) -> None:
    """--dir /tmp (or /etc) must not chmod a shared directory: a named directory that
    is not 0700 is refused, and left as it was."""
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o755)
    r = subprocess.run(wraith("daemon", "--dir", str(d)), capture_output=True, timeout=20)
    err = r.stderr.decode()
    assert r.returncode != 0 and "mode 0755, not 0700" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert mode(d) == 0o755 and not list(d.iterdir())


def test_endpoints_never_replace_a_file_or_a_live_socket(tmp_path, procs) -> None:
    """--ws unix:PATH / --events ipc://PATH remove only a dead daemon's socket: a
    regular file is refused and kept, a live daemon's socket is refused."""
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    for flag, value in (("--ws", f"unix:{precious}"), ("--events", f"ipc://{precious}")):
        r = subprocess.run(wraith("daemon", "--dir", str(tmp_path / "d1"), flag, value),
                           capture_output=True, timeout=20)
        err = r.stderr.decode()
        assert r.returncode != 0 and "is not a socket" in err and "Traceback" not in err, err
        assert precious.read_text() == "keep me"
    p, info = start_daemon(tmp_path)
    procs.append(p)
    live = info["events"][len("ipc://"):]
    for flag, value in (("--ws", info["ws"]), ("--events", info["events"])):
        r = subprocess.run(wraith("daemon", "--dir", str(tmp_path / "d2"), flag, value),
                           capture_output=True, timeout=20)
        err = r.stderr.decode()
        assert r.returncode != 0 and "already listening" in err and "Traceback" not in err, err
    assert stat.S_ISSOCK(os.lstat(live).st_mode)
    # a dead daemon's leftover socket is replaced
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))
    s.close()
    q, qinfo = start_daemon(tmp_path, "--events", f"ipc://{dead}", name="q")
    procs.append(q)
    assert qinfo["events"] == f"ipc://{dead}" and stat.S_ISSOCK(os.lstat(dead).st_mode)


def test_refuses_a_directory_of_another_user(tmp_path) -> None:
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    r = subprocess.run(wraith("daemon", "--dir", str(d)), capture_output=True, timeout=20)
    assert r.returncode != 0 and b"belongs to uid 65534" in r.stderr and b"Traceback" not in r.stderr
    r = subprocess.run(wraith("daemon", "--dir", str(tmp_path / "x"), "--ws", "tcp:0.0.0.0:0"),
                       capture_output=True, timeout=20)
    assert r.returncode != 0 and b"loopback" in r.stderr and b"Traceback" not in r.stderr


async def test_origin_refused_on_unix(tmp_path, procs) -> None:
    p, info = start_daemon(tmp_path)
    procs.append(p)
    assert await _status(info) == 101
    assert await _status(info, {"Origin": "http://localhost"}) == 403
    assert await _status(info, {"Origin": "null"}) == 403


async def test_tcp_endpoint_token(tmp_path, procs) -> None:
    p, info = start_daemon(tmp_path, "--ws", "tcp:127.0.0.1:0")
    procs.append(p)
    assert info["ws"].startswith("tcp:127.0.0.1:") and not info["ws"].endswith(":0")
    token_file = Path(info["tokenFile"])
    assert mode(token_file) == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 40
    assert await _status(info) == 401
    assert await _status(info, {"Authorization": "Bearer wrong"}) == 401
    assert await _status(info, {"Authorization": "Bearer " + token[:-1]}) == 401
    assert await _status(info, {"Authorization": token}) == 401
    assert await _status(info, {"Authorization": "Bearer " + token}) == 101
    assert await _status(info, {"Authorization": "Bearer " + token, "Origin": "https://evil.example"}) == 403
    # the Python client finds the token through daemon.json's tokenFile
    import wraith_client
    from wraith_client.daemon import Endpoint

    ep = Endpoint(info["ws"], token, None, "test")
    ws = await ep.open()
    await ws.close()
    ep = Endpoint(info["ws"], None, None, "test")
    with pytest.raises(wraith_client.DaemonError, match="401"):
        await ep.open()
    # two Authorization headers (one of them right): refused like any wrong token, no error
    host, port = info["ws"][len("tcp:"):].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                  f"Authorization: Bearer {token}\r\nAuthorization: Bearer {token}\r\n\r\n").encode())
    status = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert status.startswith(b"HTTP/1.1 401"), status
    assert "Traceback" not in p.log() and "ERROR" not in p.log()


async def test_tcp_events_need_the_token(tmp_path, procs, monkeypatch) -> None:
    """--events tcp://: a ZeroMQ subscriber without the daemon's token (ZeroMQ PLAIN,
    checked by a ZAP handler) gets nothing; with it, the events. The unix WebSocket
    stays token-free, and the Python client finds the token through daemon.json."""
    import zmq

    import wraith_client

    p, info = start_daemon(tmp_path, "--events", "tcp://127.0.0.1:0")
    procs.append(p)
    assert info["events"].startswith("tcp://127.0.0.1:") and info["ws"].startswith("unix:")
    token_file = Path(info["tokenFile"])
    assert mode(token_file) == 0o600
    token = token_file.read_text().strip()
    ctx = zmq.Context()
    subs: dict[str, zmq.Socket] = {}
    try:
        for name, password in (("none", None), ("wrong", "x" + token[1:]), ("right", token)):
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            if password is not None:
                sub.plain_username = b"wraith"
                sub.plain_password = password.encode()
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(info["events"])
            subs[name] = sub
        await asyncio.sleep(1.0)  # handshakes done (or refused) before anything is published
        # an event: a session that cannot come up (nothing listens on that port)
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        with pytest.raises(wraith_client.WraithError):
            await wraith_client.connect(server=f"127.0.0.1:{closed.getsockname()[1]}", identity="/nonexistent",
                                        host_key="SHA256:" + "A" * 43, daemon=info["ws"], target="127.0.0.1:9")
        closed.close()
        assert subs["right"].poll(10_000), "the subscriber with the token got no event"
        assert subs["right"].recv_multipart()[0].startswith(b"session.")
        for name in ("none", "wrong"):
            assert not subs[name].poll(500), f"a subscriber with {name} token got an event"
    finally:
        for sub in subs.values():
            sub.close(0)
        ctx.term()
    # the Python client's zmq_events(): endpoint and token found through daemon.json
    import wraith_client.daemon

    monkeypatch.setattr(wraith_client.daemon, "default_dir", lambda: tmp_path / "daemon-dir")
    monkeypatch.delenv("WRAITH_DAEMON", raising=False)
    monkeypatch.delenv("WRAITH_DAEMON_TOKEN", raising=False)
    agen = wraith_client.zmq_events(["session."])
    nxt = asyncio.ensure_future(agen.__anext__())
    await asyncio.sleep(1.0)
    with pytest.raises(wraith_client.WraithError):
        await wraith_client.connect(server="127.0.0.1:9", identity="/nonexistent",
                                    host_key="SHA256:" + "A" * 43, daemon=info["ws"], target="127.0.0.1:9")
    ev = await asyncio.wait_for(nxt, 10)
    assert ev["event"].startswith("session.")
    await agen.aclose()
    assert "Traceback" not in p.log() and "ERROR" not in p.log()


@pytest.fixture
def other_user():
    name = "wrt" + uuid.uuid4().hex[:8]
    subprocess.run(["useradd", "-M", "-r", "-s", "/usr/sbin/nologin", name], check=True, capture_output=True)
    try:
        uid = int(subprocess.run(["id", "-u", name], check=True, capture_output=True).stdout)
        gid = int(subprocess.run(["id", "-g", name], check=True, capture_output=True).stdout)
        yield name, uid, gid
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def _as_user(user, *cmd: str) -> subprocess.CompletedProcess[str]:
    _, uid, gid = user
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *cmd],
                          capture_output=True, text=True, timeout=30)


def _curl(*args: str) -> list[str]:
    return ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", *UPGRADE, *args]


def test_another_uid_cannot_connect(other_user, procs) -> None:
    assert shutil.which("setpriv") and shutil.which("curl")
    base = Path(tempfile.mkdtemp(prefix="wraith-sec-"))  # under /tmp, so reachable by the path
    os.chmod(base, 0o755)
    try:
        p, info = start_daemon(base, name="a")
        procs.append(p)
        t, tinfo = start_daemon(base, "--ws", "tcp:127.0.0.1:0", name="b")
        procs.append(t)
        sock = info["ws"][5:]
        port = tinfo["ws"].rsplit(":", 1)[1]
        token = Path(tinfo["tokenFile"]).read_text().strip()
        # sanity: we (root) get through
        r = subprocess.run(_curl("--unix-socket", sock, "http://localhost/"), capture_output=True, text=True)
        assert r.stdout == "101"
        # the other user: the 0700 directory stops it before the socket
        r = _as_user(other_user, *_curl("--unix-socket", sock, "http://localhost/"))
        assert r.stdout == "000" and r.returncode == 7, (r.stdout, r.stderr)
        # … nor can it read the token or daemon.json
        r = _as_user(other_user, "cat", tinfo["tokenFile"])
        assert r.returncode != 0 and "Permission denied" in r.stderr
        r = _as_user(other_user, "cat", str(base / "b-dir" / "daemon.json"))
        assert r.returncode != 0
        # the TCP port is reachable, but without the token: 401
        r = _as_user(other_user, *_curl(f"http://127.0.0.1:{port}/"))
        assert r.stdout == "401", r.stdout
        # even with the directory and socket opened wide, the peer-uid check refuses it
        os.chmod(base / "a-dir", 0o755)
        os.chmod(sock, 0o666)
        r = _as_user(other_user, *_curl("--unix-socket", sock, "http://localhost/"))
        assert r.stdout == "403", (r.stdout, r.stderr)
        # and the daemon still serves its own user afterwards
        r = subprocess.run(_curl("--unix-socket", sock, "http://localhost/"), capture_output=True, text=True)
        assert r.stdout == "101"
        r = subprocess.run(_curl("-H", f"Authorization: Bearer {token}", f"http://127.0.0.1:{port}/"),
                           capture_output=True, text=True)
        assert r.stdout == "101"
    finally:
        for pr in procs:
            pr.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_python_check_of_default_dir(tmp_path) -> None:
    code = ("from wraith_core.daemon.paths import default_dir; import os; "
            "print(default_dir())")
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    out = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == f"/tmp/wraith-{os.getuid()}"
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    out = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == f"{tmp_path}/wraith"


async def _msg(ws) -> dict:
    import msgpack

    return msgpack.unpackb(await asyncio.wait_for(ws.recv(), 20), raw=False)


async def _send(ws, obj: dict) -> None:
    import msgpack

    await ws.send(msgpack.packb(obj, use_bin_type=True))


async def test_only_the_serve_control_can_accept_its_incoming_streams(tmp_path, procs) -> None:
    """Another daemon client sees server.incoming in the events, but what it names there is
    not the id that accepts the stream: only the serve control learns that. (Ids were a
    counter, published in the events: anyone could take another client's connections.)"""
    from helpers import Keys

    keys = Keys.make(tmp_path / "keys")
    p, info = start_daemon(tmp_path)
    procs.append(p)
    control = await raw_ws(info)
    await _send(control, {"type": "open", "kind": "serve", "options": {
        "hostKey": str(keys.host), "authorizedKeys": str(keys.authorized), "listen": "127.0.0.1:0"}})
    port = int((await _msg(control))["addresses"][0].rsplit(":", 1)[1])
    spy = await raw_ws(info)
    await _send(spy, {"type": "open", "kind": "events"})
    await _msg(spy)
    peer = await raw_ws(info)
    await _send(peer, {"type": "open", "kind": "connect", "options": {
        "server": f"127.0.0.1:{port}", "identity": str(keys.client), "hostKey": str(keys.host_pub)}})
    assert (await _msg(peer))["type"] == "opened"
    while (ev := await _msg(spy)).get("event") != "server.incoming":
        pass
    seen = ev["data"]["stream"]
    incoming = await _msg(control)
    assert incoming["type"] == "incoming" and incoming["id"] != seen and len(incoming["id"]) > 20
    for guess in (seen, seen + "-", incoming["id"][:-1]):
        thief = await raw_ws(info)
        await _send(thief, {"type": "open", "kind": "accept", "id": guess})
        answer = await _msg(thief)
        assert answer["type"] == "error" and answer["code"] == "EUSAGE", answer
        await thief.close()
    owner = await raw_ws(info)
    await _send(owner, {"type": "open", "kind": "accept", "id": incoming["id"]})
    assert (await _msg(owner))["type"] == "opened"
    await _send(peer, {"type": "data", "data": b"for the owner"})
    assert (await _msg(owner))["data"] == b"for the owner"
    for ws in (control, spy, peer, owner):
        await ws.close()


async def test_hostile_messages_stay_cheap(tmp_path, procs) -> None:
    """A 16 MiB message of empty maps (msgpack makes an object per byte: 1.2 GB and a
    blocked loop), a 1 GiB window (the daemon holds about a window per stalled stream):
    refused at once, one line each; the daemon's memory stays where it was. (Before a
    stream is open a message is at most 1 MiB: the 16 MiB one is refused from its frame
    header, close 1009, before the daemon reads it.)"""
    from websockets.exceptions import ConnectionClosed

    from test_daemon_support import rss_kib

    p, info = start_daemon(tmp_path)
    procs.append(p)
    base = rss_kib(p.p.pid)
    for _ in range(3):
        ws = await raw_ws(info)
        with pytest.raises(ConnectionClosed) as closed:
            await ws.send(b"\xdd" + (16 * 1024 * 1024 - 8).to_bytes(4, "big") + b"\x80" * (16 * 1024 * 1024 - 8))
            await _msg(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009, closed.value
    ws = await raw_ws(info)  # the same within the 1 MiB that an open may have: an EPROTO error
    await ws.send(b"\xdd" + (1024 * 1024 - 8).to_bytes(4, "big") + b"\x80" * (1024 * 1024 - 8))
    answer = await _msg(ws)
    assert answer["type"] == "error" and answer["code"] == "EPROTO", answer
    await ws.close()
    ws = await raw_ws(info)
    await _send(ws, {"type": "open", "kind": "connect", "options": {
        "server": "127.0.0.1:9", "identity": "/nonexistent", "hostKey": "SHA256:" + "A" * 43,
        "window": 1 << 30}})
    answer = await _msg(ws)
    assert answer["type"] == "error" and answer["code"] == "EUSAGE" and "window" in answer["message"], answer
    await ws.close()
    assert rss_kib(p.p.pid) - base < 200 * 1024, "the daemon grew by hundreds of MiB"
    assert "Traceback" not in p.log()


def test_a_daemon_that_fails_to_start_leaves_the_running_one_alone(tmp_path, procs) -> None:
    """A second daemon on the same directory cannot listen: it exits with one line, and
    the first one's token file (and socket) are still there and still its own."""
    p, info = start_daemon(tmp_path, "--ws", "tcp:127.0.0.1:0")
    procs.append(p)
    token_file = Path(info["tokenFile"])
    token = token_file.read_text()
    d = tmp_path / "daemon-dir"
    r = subprocess.run(wraith("daemon", "--dir", str(d), "--ws", info["ws"]), capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert token_file.read_text() == token
    q = subprocess.run(wraith("daemon", "--dir", str(d)), capture_output=True, text=True, timeout=30)
    assert q.returncode != 0 and "already listening" in q.stderr, q.stderr  # its events socket is live
    assert (d / "events.sock").exists() and token_file.read_text() == token


@pytest.mark.parametrize("events", ["ipc", "none"])
def test_a_daemon_started_while_the_last_one_shuts_down_keeps_its_sockets(tmp_path, procs, events) -> None:
    """SIGTERM to daemon A (a client that answers no closing handshake keeps it shutting
    down for a while), daemon B started in the same directory meanwhile: A's exit removed
    B's daemon.sock, and libzmq B's events.sock. Now one daemon per directory: B waits
    for A to finish, and each removes only its own socket files."""
    import json

    from helpers import Proc

    d = tmp_path / "dir"
    flags = ("--events", "none") if events == "none" else ()
    a = Proc(wraith("daemon", "--dir", str(d), *flags), tmp_path / "a.log", ready=r"wraith daemon: ready (.*)$")
    procs.append(a)
    stuck = socket.socket(socket.AF_UNIX)  # a WebSocket client that never reads again
    stuck.connect(str(d / "daemon.sock"))
    stuck.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    assert stuck.recv(12) == b"HTTP/1.1 101"
    a.signal(signal.SIGTERM)
    time.sleep(0.3)
    b = Proc(wraith("daemon", "--dir", str(d), *flags), tmp_path / "b.log", ready=r"wraith daemon: ready (.*)$")
    procs.append(b)
    assert a.p.wait(20) == 0
    binfo = json.loads(b.match.group(1))  # type: ignore[union-attr]
    assert binfo["pid"] == b.p.pid and json.loads((d / "daemon.json").read_text())["pid"] == b.p.pid
    for name in ("daemon.sock", "events.sock")[:1 if events == "none" else 2]:
        assert stat.S_ISSOCK(os.lstat(d / name).st_mode), f"{name} of the new daemon was removed"
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(d / name))  # and B listens there
    stuck.close()
    b.stop()
    assert not (d / "daemon.sock").exists() and not (d / "events.sock").exists()


def test_a_busy_socket_is_not_taken_for_a_stale_one(tmp_path) -> None:
    """clear_stale_socket removes a socket only when nobody listens (ECONNREFUSED): a live
    listener whose queue is full answers EAGAIN, and must keep its socket."""
    from wraith_core.daemon.paths import clear_stale_socket
    from wraith_core.errors import WraithError

    path = str(tmp_path / "busy.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    fillers = []
    try:
        for _ in range(8):  # fill the backlog (never accepted)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:
                pass
            fillers.append(s)
        with pytest.raises(WraithError):
            clear_stale_socket(path)
        assert os.path.exists(path)
    finally:
        for s in fillers:
            s.close()
        listener.close()
    clear_stale_socket(path)  # nobody listens now: a leftover, removed
    assert not os.path.exists(path)
