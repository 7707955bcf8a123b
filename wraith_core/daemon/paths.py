"""The daemon's directory, endpoints, token file and daemon.json (docs/ipc.md §1)."""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import json
import os
import socket
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from ..errors import UsageError, WraithError

VERSION = 1


def default_dir() -> Path:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "wraith"
    return Path(f"/tmp/wraith-{os.getuid()}")


def secure_dir(path: Path, tighten: bool = False) -> Path:
    """Create ``path`` 0700, or check an existing one: ours, not a symlink, 0700.

    An existing directory with wider permissions is made 0700 only if ``tighten``
    (our default directory, which only wraith uses); a directory the user named
    is refused instead — ``--dir /tmp`` must not change /tmp."""
    path = Path(path)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise WraithError(f"cannot create daemon directory {path}: {exc.strerror}", "EDAEMON") from None
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise WraithError(f"daemon directory {path} is not a directory (symlink?); refusing it", "EDAEMON")
    if st.st_uid != os.getuid():
        raise WraithError(f"daemon directory {path} belongs to uid {st.st_uid}, not us; refusing it", "EDAEMON")
    mode = stat.S_IMODE(st.st_mode)
    if mode != 0o700:
        if not tighten:
            raise WraithError(f"daemon directory {path} is mode {mode:04o}, not 0700: give a private directory "
                              f"(or chmod 700 it); refusing it", "EDAEMON")
        os.chmod(path, 0o700)
    return path


def clear_stale_socket(path: str) -> None:
    """Make room for a Unix socket at ``path``: remove a socket left by a daemon that
    died; refuse if a daemon still answers there, or if ``path`` is not a socket
    (a user's file is never removed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise WraithError(f"{path} exists and is not a socket; refusing to replace it", "EDAEMON")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1)
        s.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(path)  # nobody home: a leftover of a daemon that died
            return
        # busy (a full backlog answers EAGAIN) or slow: somebody is there
        raise WraithError(f"a daemon may be listening on {path} ({exc.strerror or 'no answer'}); "
                          "refusing to replace it", "EDAEMON") from None
    finally:
        s.close()
    raise WraithError(f"another daemon is already listening on {path}", "EDAEMON")


class FileIdentity(NamedTuple):
    dev: int
    ino: int


def file_identity(path: str) -> FileIdentity | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return FileIdentity(st.st_dev, st.st_ino)


def remove_if_same(path: str, ident: FileIdentity) -> None:
    """Remove the socket we made at ``path`` — not what another daemon put there since
    (a daemon started while we were shutting down binds its own socket at the same path)."""
    if file_identity(path) == ident:
        try:
            os.unlink(path)
        except OSError:
            pass


def bind_unix_socket(path: str) -> socket.socket:
    """A listening-ready Unix socket bound at ``path``, mode 0600 from birth.

    bind() itself refuses a path that exists, so two daemons cannot both take it (asyncio's
    own binding first unlinks whatever socket is there). An existing socket is removed only
    when it is a dead daemon's leftover (``clear_stale_socket``); then the bind is retried."""
    for attempt in (1, 2):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with private_umask():
                sock.bind(path)
            os.chmod(path, 0o600)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE or attempt == 2:
                raise
        clear_stale_socket(path)
    raise AssertionError("unreachable")  # pragma: no cover


def link_socket(tmp: str, path: str) -> None:
    """Give the socket bound at ``tmp`` its real name ``path`` (and drop ``tmp``).

    For ZeroMQ's ipc://, which binds by itself: libzmq unlinks whatever is at the
    path before binding, and unlinks the path again when the socket closes — a
    daemon shutting down would remove the socket of the one that replaced it. So
    it binds a private name, and link() (which never replaces anything) makes
    the real one; what libzmq removes at the end is only the private name."""
    try:
        for attempt in (1, 2):
            try:
                os.link(tmp, path)
                return
            except FileExistsError:
                if attempt == 2:
                    raise WraithError(f"another daemon is already listening on {path}", "EDAEMON") from None
            clear_stale_socket(path)
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


LOCK_NAME = "daemon.lock"


def try_lock_dir(directory: Path) -> int | None:
    """Take ``DIR/daemon.lock`` (an flock held for the daemon's life: one daemon per
    directory); the locked descriptor, or None if another process holds it."""
    path = directory / LOCK_NAME
    while True:
        with private_umask():
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        # a daemon that exits removes the file while it holds it: what we locked must still
        # be the file at the path, or a third daemon could lock a new one beside us
        st = os.fstat(fd)
        if file_identity(str(path)) == FileIdentity(st.st_dev, st.st_ino):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def unlock_dir(directory: Path, fd: int) -> None:
    """Release the lock, removing its file first (while still holding it; see try_lock_dir)."""
    try:
        os.unlink(directory / LOCK_NAME)
    except OSError:
        pass
    os.close(fd)


def lock_holder(directory: Path) -> int | None:
    try:
        text = (directory / LOCK_NAME).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isascii() and text.isdigit() else None


def running_daemon(directory: Path) -> dict[str, Any] | None:
    """The daemon.json of a live daemon in ``directory``, if there is one."""
    try:
        info = json.loads((directory / "daemon.json").read_text())
    except (OSError, ValueError):
        return None
    pid = info.get("pid") if isinstance(info, dict) else None
    if not isinstance(pid, int) or pid == os.getpid() or not pid_alive(pid):
        return None
    return info


@contextmanager
def private_umask() -> Iterator[None]:
    """Files and sockets created inside are 0600 from birth (no chmod race)."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class WsEndpoint:
    kind: str            # "unix" | "tcp"
    path: str = ""       # unix
    host: str = ""       # tcp
    port: int = 0        # tcp

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{h}:{self.port}"


def parse_ws(spec: str) -> WsEndpoint:
    """``unix:PATH`` | ``tcp:HOST:PORT`` (loopback only) | an absolute path."""
    if spec.startswith("unix:"):
        path = spec[5:]
        if not path:
            raise UsageError("--ws unix:PATH needs a path")
        return WsEndpoint("unix", path=os.path.abspath(os.path.expanduser(path)))
    if spec.startswith("/"):
        return WsEndpoint("unix", path=spec)
    if spec.startswith("tcp:"):
        rest = spec[4:]
        host, sep, port = rest.rpartition(":")
        if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535:
            raise UsageError(f"--ws {spec}: expected tcp:HOST:PORT")
        host = host.strip("[]") or "127.0.0.1"
        if not _loopback(host):
            raise UsageError(f"--ws {spec}: the TCP endpoint must be on loopback (127.0.0.1, ::1)")
        return WsEndpoint("tcp", host=host, port=int(port))
    raise UsageError(f"--ws {spec}: expected unix:PATH or tcp:127.0.0.1:PORT")


def check_events(spec: str) -> str | None:
    """``ipc://PATH`` | ``tcp://127.0.0.1:PORT`` | ``none``."""
    if spec in ("none", "off", ""):
        return None
    if spec.startswith("ipc://"):
        if len(spec) <= 6:
            raise UsageError("--events ipc://PATH needs a path")
        return "ipc://" + os.path.abspath(spec[6:])
    if spec.startswith("tcp://"):
        host, sep, port = spec[6:].rpartition(":")
        if not sep or not ((port.isascii() and port.isdigit()) or port == "*"):
            raise UsageError(f"--events {spec}: expected tcp://127.0.0.1:PORT")
        if not _loopback(host.strip("[]")):
            raise UsageError(f"--events {spec}: the TCP endpoint must be on loopback")
        return spec
    raise UsageError(f"--events {spec}: expected ipc://PATH or tcp://127.0.0.1:PORT")


def write_token(directory: Path, token: str) -> Path:
    path = directory / "token"
    with private_umask():
        tmp = directory / f".token.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    return path


def read_token(path: Path | str) -> str:
    return Path(path).read_text().strip()


def write_daemon_json(directory: Path, info: dict[str, Any]) -> Path:
    path = directory / "daemon.json"
    with private_umask():
        fd, tmp = tempfile.mkstemp(prefix=".daemon.json.", dir=directory)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
            f.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    return path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
