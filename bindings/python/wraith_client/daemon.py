"""Finding (or starting) a wraith daemon, and opening WebSockets to it (docs/ipc.md §1-2).

Order: the ``daemon=`` option, ``WRAITH_DAEMON``, ``daemon.json`` in the daemon
directory whose pid is alive, else a child daemon of our own
(``$WRAITH_PYTHON -m wraith_core daemon --dir TMP --exit-with-stdin``) that is
stopped when this process exits (or at :func:`shutdown`).
"""

from __future__ import annotations

import asyncio
import atexit
import ipaddress
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.exceptions import InvalidStatus, WebSocketException

from . import _ipc
from ._frame_input import chunked_frame_input
from .errors import DaemonError

READY_TIMEOUT = 20.0
SOCKET_BUFFER = 1024 * 1024
WS_SETTINGS: dict[str, Any] = {
    "compression": None,
    "max_size": _ipc.MAX_MESSAGE,
    "max_queue": 16,
    "write_limit": 1024 * 1024,
    "ping_interval": None,
    "ping_timeout": None,
    "close_timeout": 5,
    "open_timeout": 10,
}


def default_dir() -> Path:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "wraith"
    return Path(f"/tmp/wraith-{os.getuid()}")


@dataclass(frozen=True)
class Endpoint:
    ws: str                     # unix:PATH | tcp:HOST:PORT
    token: str | None = None
    events: str | None = None   # ZeroMQ endpoint, if known
    source: str = ""

    async def open(self) -> ClientConnection:
        """A new WebSocket to the daemon (one per stream)."""
        try:
            if self.ws.startswith("unix:"):
                ws = await unix_connect(self.ws[5:], "ws://localhost/", **WS_SETTINGS)
            else:
                hostport = self.ws[4:]
                headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
                ws = await connect(f"ws://{hostport}/", additional_headers=headers, **WS_SETTINGS)
            _deepen_socket_buffers(ws)
            chunked_frame_input(ws)
            return ws
        except InvalidStatus as exc:
            status = exc.response.status_code
            hint = " (wrong or missing token)" if status == 401 else ""
            raise DaemonError(f"the daemon at {self.ws} refused us: HTTP {status}{hint}") from None
        except (OSError, WebSocketException, asyncio.TimeoutError) as exc:
            raise DaemonError(f"cannot reach the wraith daemon at {self.ws} ({self.source}): "
                              f"{getattr(exc, 'strerror', None) or exc}") from None


def _deepen_socket_buffers(ws: ClientConnection) -> None:
    """1 MiB kernel buffers each way: fewer, larger hand-overs between us and the daemon."""
    sock = ws.transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    except OSError:
        pass


def _loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_endpoint(spec: str) -> str:
    if spec.startswith(("unix:", "tcp:")):
        return spec
    if spec.startswith("/"):
        return "unix:" + spec
    if spec.startswith("ws://"):
        return "tcp:" + spec[5:].rstrip("/")
    raise DaemonError(f"daemon endpoint {spec!r}: expected unix:PATH or tcp:HOST:PORT", "EUSAGE")


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


MAX_SMALL_FILE = 64 * 1024  # daemon.json and token files


def _private_file(path: Path) -> bytes | None:
    """The bytes of ``path`` if it is a small regular file of ours in a directory only we
    can use (as the daemon makes it: ours, 0700, not a symlink) — else None. In /tmp
    another user could make the directory first, with a daemon.json pointing at their
    listener and a tokenFile naming one of our secrets: such files are never read."""
    try:
        st = os.lstat(path.parent)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size > MAX_SMALL_FILE:
            return None
        data = f.read(MAX_SMALL_FILE + 1)
    return data if len(data) <= MAX_SMALL_FILE else None


def _read_json(path: Path) -> dict[str, Any] | None:
    data = _private_file(path)
    if data is None:
        return None
    try:
        info = json.loads(data)
    except ValueError:
        return None
    if not isinstance(info, dict) or info.get("version") != 1 or not isinstance(info.get("ws"), str):
        return None
    try:
        parse_endpoint(info["ws"])
    except DaemonError:
        return None
    token_file, events = info.get("tokenFile"), info.get("events")
    if token_file is not None and (not isinstance(token_file, str)
                                   or Path(token_file).parent.resolve() != path.parent.resolve()):
        return None  # the daemon writes its token beside daemon.json
    if events is not None and not isinstance(events, str):
        return None
    if not _pid_alive(info.get("pid")):
        return None
    return info


def _token_for(ws: str, explicit: str | None, token_file: str | None, events: str | None = None) -> str | None:
    """The daemon's token, needed only for its TCP endpoints (the WebSocket's
    ``tcp:`` and the ZeroMQ ``tcp://``, which share it)."""
    if not ws.startswith("tcp:") and not (events or "").startswith("tcp://"):
        return None
    if explicit:
        return explicit
    env = os.environ.get("WRAITH_DAEMON_TOKEN")
    if env:
        return env
    if ws.startswith("tcp:") and not _loopback(ws[4:].rpartition(":")[0]):
        return None  # the local daemon's token goes to no other host, whatever names it
    data = _private_file(Path(token_file) if token_file else default_dir() / "token")
    if data is None:
        return None
    token = data.decode("ascii", "replace").strip()
    return token if token.isprintable() and token else None


# -- the child daemon ---------------------------------------------------------------


class ChildDaemon:
    """A daemon we started ourselves; it dies with us (its stdin is our pipe)."""

    def __init__(self, python: str) -> None:
        self.python = python
        self.dir = tempfile.mkdtemp(prefix="wraith-client-")  # 0700
        self.info: dict[str, Any] = {}
        # the daemon's stderr: a file without a name (unlinked at once, read through our
        # descriptor), so that a client killed with SIGKILL leaves no log behind
        self._log = tempfile.TemporaryFile(dir=self.dir)
        env = dict(os.environ)
        env.pop("WRAITH_DAEMON", None)
        try:
            self.proc = subprocess.Popen(
                [python, "-m", "wraith_core", "daemon", "--dir", str(Path(self.dir) / "d"),
                 "--exit-with-stdin"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env, close_fds=True)
        except OSError as exc:
            self._log.close()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise DaemonError(
                f"cannot start a wraith daemon with Python {python!r}: {exc.strerror or exc}. "
                f"Install Python 3.11+ and wraith (pip install 'wraith[daemon]'), set WRAITH_PYTHON to "
                f"that interpreter, or point WRAITH_DAEMON at a running daemon") from None

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        result: dict[str, Any] = {}

        def reader() -> None:
            assert self.proc.stdout is not None
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").strip()
                if line.startswith("wraith daemon: ready "):
                    try:
                        result.update(json.loads(line[len("wraith daemon: ready "):]))
                    except ValueError:
                        pass
                    return

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        t.join(max(0.0, deadline - time.monotonic()))
        if not result:
            code = self.proc.poll()
            log = self.log_text()
            self.stop()
            if "No module named" in log and "wraith_core" in log:
                raise DaemonError(
                    f"wraith_core is not installed for {self.python}: install it with "
                    f"`{self.python} -m pip install 'wraith[daemon]'` (or set WRAITH_PYTHON to an "
                    f"interpreter that has it, or WRAITH_DAEMON to a running daemon)")
            if "No module named" in log:
                missing = log.split("No module named", 1)[1].split("\n", 1)[0].strip(" '\"")
                raise DaemonError(f"the wraith daemon needs the Python module {missing!r}: install it with "
                                  f"`{self.python} -m pip install 'wraith[daemon]'`")
            state = f"exited with status {code}" if code is not None else "did not become ready"
            raise DaemonError(f"the wraith daemon ({self.python}) {state}:\n{log[-2000:]}")
        self.info = result
        return result

    def log_text(self, limit: int = 1 << 20) -> str:
        """The end of what the daemon wrote on stderr (its last ``limit`` bytes)."""
        try:
            size = os.fstat(self._log.fileno()).st_size
            return os.pread(self._log.fileno(), limit, max(0, size - limit)).decode(errors="replace")
        except (OSError, ValueError):
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        p = self.proc
        if p.poll() is None:
            try:
                if p.stdin is not None:
                    p.stdin.close()  # the lifeline: the daemon exits on EOF
            except OSError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(timeout)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        for f in (p.stdin, p.stdout, self._log):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


_lock = threading.Lock()
_child: ChildDaemon | None = None
_child_endpoint: Endpoint | None = None


def _python() -> str:
    chosen = os.environ.get("WRAITH_PYTHON")
    if not chosen:
        return sys.executable or "python3"
    found = shutil.which(chosen)
    if found is None:
        raise DaemonError(f"WRAITH_PYTHON={chosen!r} was not found. Install Python 3.11+ with "
                          f"`pip install 'wraith[daemon]'`, or set WRAITH_PYTHON to its path")
    return found


def _start_child() -> Endpoint:
    global _child, _child_endpoint
    with _lock:
        if _child is not None and _child.proc.poll() is None and _child_endpoint is not None:
            return _child_endpoint
        child = ChildDaemon(_python())
        info = child.wait_ready()
        _child = child
        events = info.get("events")
        _child_endpoint = Endpoint(info["ws"], _token_for(info["ws"], None, info.get("tokenFile"), events),
                                   events, "child daemon")
        return _child_endpoint


def _stop_child() -> None:
    global _child, _child_endpoint
    with _lock:
        child, _child, _child_endpoint = _child, None, None
    if child is not None:
        child.stop()


atexit.register(_stop_child)


def child_daemon() -> ChildDaemon | None:
    """The daemon this process started, if any."""
    return _child


def discover(daemon: str | None = None, token: str | None = None) -> Endpoint | None:
    """The endpoint of a running daemon, or None if there is none to find."""
    if daemon:
        ws = parse_endpoint(daemon)
        return Endpoint(ws, _token_for(ws, token, None), None, "daemon option")
    env = os.environ.get("WRAITH_DAEMON")
    if env:
        ws = parse_endpoint(env)
        return Endpoint(ws, _token_for(ws, token, None), None, "WRAITH_DAEMON")
    info = _read_json(default_dir() / "daemon.json")
    if info is not None:
        ws = info["ws"]
        events = info.get("events")
        return Endpoint(ws, _token_for(ws, token, info.get("tokenFile"), events), events, "daemon.json")
    return None


async def resolve(daemon: str | None = None, token: str | None = None, autostart: bool = True) -> Endpoint:
    ep = discover(daemon, token)
    if ep is not None:
        return ep
    if _child_endpoint is not None and _child is not None and _child.proc.poll() is None:
        return _child_endpoint
    if not autostart:
        raise DaemonError("no wraith daemon is running (start one with `wraith daemon`)")
    return await asyncio.get_running_loop().run_in_executor(None, _start_child)


async def open_ws(daemon: str | None = None, token: str | None = None) -> ClientConnection:
    ep = await resolve(daemon, token)
    return await ep.open()


async def shutdown() -> None:
    """Stop the child daemon this process started (if any)."""
    await asyncio.get_running_loop().run_in_executor(None, _stop_child)
