"""Shared test helpers: processes, ports, keys, loopback targets. Real sockets only."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent
# env for a wraith process that relays through the generic pump (tests/fallback/sitecustomize.py)
GENERIC_PUMP_ENV = {"PYTHONPATH": str(ROOT / "tests" / "fallback")}
GENERIC_PUMP_MARK = "generic relay pump on"


def free_port(host: str = "127.0.0.1") -> int:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Keys:
    dir: Path
    host: Path
    host_pub: Path
    client: Path
    client_pub: Path
    authorized: Path

    @staticmethod
    def make(d: Path) -> Keys:
        from wraith_core.keys import generate_ed25519

        d.mkdir(parents=True, exist_ok=True)
        host, host_pub = generate_ed25519(d / "host_key", "test-host")
        client, client_pub = generate_ed25519(d / "client_key", "test-client")
        auth = d / "authorized_keys"
        auth.write_bytes(client_pub.read_bytes())
        return Keys(d, host, host_pub, client, client_pub, auth)


class Proc:
    """A child process whose stdout we scan for a ready line; stderr goes to a log file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 ready: str | None = None, timeout: float = 20.0, cwd: Path | None = None) -> None:
        self.args = args
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "ab")
        full_env = dict(os.environ)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        if env:
            full_env.update(env)
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._log, env=full_env,
                                  cwd=cwd, start_new_session=True)
        self.lines: list[str] = []
        self._buf = b""
        self.match: re.Match[str] | None = None
        if ready is not None:
            self.match = self.wait_line(ready, timeout)

    def wait_line(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        assert self.p.stdout is not None
        os.set_blocking(self.p.stdout.fileno(), False)
        seen = 0
        while True:
            for line in self.lines[seen:]:
                m = rx.search(line)
                if m:
                    return m
            seen = len(self.lines)
            if time.monotonic() > deadline:
                break
            try:
                chunk = self.p.stdout.read()
            except BlockingIOError:
                chunk = None
            if chunk:
                self._buf += chunk
                *complete, self._buf = self._buf.split(b"\n")
                self.lines += [raw.decode(errors="replace") for raw in complete]
            elif self.p.poll() is not None:
                break
            else:
                time.sleep(0.02)
        raise AssertionError(f"{self.args[:4]}: no line matching {pattern!r}; exit={self.p.poll()}; "
                             f"log:\n{self.log()[-3000:]}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, sig)

    def stop(self, timeout: float = 5.0) -> int:
        if self.p.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.p.wait(5)
        self._log.close()
        return int(self.p.returncode)


def wraith(*args: str) -> list[str]:
    return [PY, "-m", "wraith_core", *args]


def start_server(keys: Keys, tmp: Path, *extra: str, name: str = "serve",
                 listen: str = "127.0.0.1:0", env: dict[str, str] | None = None) -> tuple[Proc, int]:
    p = Proc(wraith("serve", "--key", str(keys.host), "--authorized-keys", str(keys.authorized),
                    "--listen", listen, *extra),
             tmp / f"{name}.log", env=env, ready=r"listening \w+ .*:(\d+)$")
    assert p.match is not None
    return p, int(p.match.group(1))


def start_client(keys: Keys, tmp: Path, server_port: int, *extra: str, name: str = "connect",
                 env: dict[str, str] | None = None, wait_up: bool = True) -> tuple[Proc, int]:
    p = Proc(wraith("connect", "--server", f"127.0.0.1:{server_port}", "--identity", str(keys.client),
                    "--host-key", str(keys.host_pub), "--socks5", "127.0.0.1:0", *extra),
             tmp / f"{name}.log", env=env, ready=r"socks5 listening .*:(\d+)$")
    assert p.match is not None
    port = int(p.match.group(1))
    if wait_up:
        wait_for_log(p, "session up")
    return p, port


def wait_for_log(p: Proc, text: str, timeout: float = 20.0, count: int = 1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.log().count(text) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"log never showed {text!r} x{count}:\n{p.log()[-3000:]}")


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    assert shutil.which("curl"), "curl is installed by scripts/test.sh"
    return subprocess.run(["curl", "-s", "-S", "--max-time", str(int(timeout)), *args],
                          capture_output=True, timeout=timeout + 5)


class HTTPFiles:
    """A loopback HTTP server (separate process) serving random files of given sizes."""

    def __init__(self, root: Path, sizes: dict[str, int], host: str = "127.0.0.1") -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.hashes: dict[str, str] = {}
        for name, size in sizes.items():
            data = os.urandom(size)
            (root / name).write_bytes(data)
            self.hashes[name] = sha(data)
        self.port = free_port(host)
        self.host = host
        self.proc = subprocess.Popen([PY, "-m", "http.server", str(self.port), "--bind", host,
                                      "--directory", str(root)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(host, self.port)

    def url(self, name: str, host: str | None = None) -> str:
        h = host or self.host
        if ":" in h:
            h = f"[{h}]"
        return f"http://{h}:{self.port}/{name}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on {host}:{port}")


async def socks_connect(socks_port: int, host: str, port: int, timeout: float = 10.0
                        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a stream through a SOCKS5 proxy (raises python_socks.ProxyError on a failure reply)."""
    from python_socks import ProxyType
    from python_socks.async_.asyncio import Proxy

    sock = await Proxy(ProxyType.SOCKS5, "127.0.0.1", socks_port, rdns=True).connect(host, port, timeout=timeout)
    return await asyncio.open_connection(sock=sock, limit=1 << 20)
