"""Network namespaces for wraith-tun tests and the benchmark.

    client ns (wtc<id>)                 server ns (wts<id>)
    veth 10.77.0.1/30  <------------>   veth 10.77.0.2/30
    default via 10.77.0.2               lo: 10.79.0.1 (SOCKS5 / SSH service)
                                        lo: 10.80.0.1, fd80::1 (HTTP test host)

Nothing here ever routes outside these two namespaces: the client's default
route points at the server namespace, which has no other interface.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CLIENT_ADDR = "10.77.0.1"
SERVER_VETH = "10.77.0.2"
SERVICE_ADDR = "10.79.0.1"
HTTP_ADDR = "10.80.0.1"
HTTP_ADDR6 = "fd80::1"  # the HTTP test host's IPv6 address (server namespace only)
HTTP_PORT = 8080
HTTP_NAME = "files.wraith-test"  # resolvable ONLY by the server side's private /etc/hosts

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

_counter = 0


@dataclass
class WraithNet:
    net: "TestNet"
    socks: str  # HOST:PORT of `wraith connect`'s SOCKS5 listener in the client namespace
    files: dict[str, str]  # file name -> sha256


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=timeout)


def ensure_tools(*tools: str) -> None:
    """apt-install missing Debian tools (the only thing tests install)."""
    packages = {"microsocks": "microsocks", "curl": "curl", "ip": "iproute2", "ssh-keygen": "openssh-client",
                "unshare": "util-linux"}
    missing = [packages[t] for t in tools if shutil.which(t) is None]
    if missing:
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, capture_output=True, timeout=300,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


class TestNet:
    def __init__(self, tag: str = "") -> None:
        global _counter
        _counter += 1
        ident = f"{os.getpid() % 100000}{tag}{_counter}"
        self.client = f"wtc{ident}"
        self.server = f"wts{ident}"
        self.vc = f"vc{ident}"[:15]
        self.vs = f"vs{ident}"[:15]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="wraith-tun-test-"))
        os.chmod(self.tmp, 0o755)
        self.www = self.tmp / "www"
        self.www.mkdir()

    # -- lifecycle ---------------------------------------------------------------------------

    def create(self) -> "TestNet":
        sh("ip", "netns", "add", self.client)
        sh("ip", "netns", "add", self.server)
        sh("ip", "link", "add", self.vc, "netns", self.client, "type", "veth", "peer", "name", self.vs, "netns", self.server)
        c = ["ip", "netns", "exec", self.client]
        s = ["ip", "netns", "exec", self.server]
        sh(*c, "ip", "link", "set", "lo", "up")
        sh(*c, "ip", "addr", "add", f"{CLIENT_ADDR}/30", "dev", self.vc)
        sh(*c, "ip", "link", "set", self.vc, "up")
        sh(*c, "ip", "route", "add", "default", "via", SERVER_VETH)
        sh(*s, "ip", "link", "set", "lo", "up")
        sh(*s, "ip", "addr", "add", f"{SERVER_VETH}/30", "dev", self.vs)
        sh(*s, "ip", "link", "set", self.vs, "up")
        sh(*s, "ip", "addr", "add", f"{SERVICE_ADDR}/32", "dev", "lo")
        sh(*s, "ip", "addr", "add", f"{HTTP_ADDR}/32", "dev", "lo")
        sh(*s, "ip", "-6", "addr", "add", f"{HTTP_ADDR6}/128", "dev", "lo", "nodad")
        (self.tmp / "hosts").write_text(f"127.0.0.1 localhost\n{HTTP_ADDR} {HTTP_NAME}\n")
        return self

    def destroy(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in reversed(self.procs):
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)
        for ns in (self.client, self.server):
            sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "TestNet":
        try:
            return self.create()
        except BaseException:
            self.destroy()
            raise

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # -- processes ----------------------------------------------------------------------------------

    def cmd(self, ns: str, *args: str, private_hosts: bool = False) -> list[str]:
        base = ["ip", "netns", "exec", ns]
        if private_hosts:
            hosts = self.tmp / "hosts"
            script = f'mount --bind "{hosts}" /etc/hosts && exec "$@"'
            return [*base, "unshare", "-m", "sh", "-c", script, "sh", *args]
        return [*base, *args]

    def start(self, ns: str, *args: str, private_hosts: bool = False, **kw: object) -> subprocess.Popen[bytes]:
        kw.setdefault("env", _env())
        p = subprocess.Popen(self.cmd(ns, *args, private_hosts=private_hosts), start_new_session=True, **kw)  # type: ignore[call-overload]
        self.procs.append(p)
        return p

    def run(self, ns: str, *args: str, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[bytes]:
        kw.setdefault("env", _env())
        return subprocess.run(self.cmd(ns, *args), capture_output=True, timeout=timeout, **kw)  # type: ignore[call-overload]

    def start_http(self) -> None:
        p = self.start(self.server, "python3", str(HERE / "httpd.py"), HTTP_ADDR, str(HTTP_PORT), str(self.www),
                       HTTP_ADDR6, stdout=subprocess.PIPE)
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.strip() == b"ready", "HTTP test server did not start"

    def start_microsocks(self, port: int = 1080) -> tuple[str, int]:
        """A plain SOCKS5 server on the server side, with the private /etc/hosts."""
        self.start(self.server, "microsocks", "-i", SERVICE_ADDR, "-p", str(port), private_hosts=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self, self.client, SERVICE_ADDR, port)
        return SERVICE_ADDR, port

    def start_wraith(self, ssh_port: int = 2222, socks_port: int = 1080) -> tuple[str, int]:
        """Real wraith: `wraith serve` on the server side (private /etc/hosts), `wraith connect`
        on the client side; returns the client-side SOCKS5 address."""
        hostkey, clientkey = self.tmp / "hostkey", self.tmp / "clientkey"
        for k in (hostkey, clientkey):
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k))
        self.start(self.server, sys.executable, "-m", "wraith_core", "serve", "--key", str(hostkey),
                   "--authorized-keys", f"{clientkey}.pub", "--listen", f"{SERVICE_ADDR}:{ssh_port}",
                   "--log-level", "warning", private_hosts=True,
                   stdout=subprocess.DEVNULL, stderr=open(self.tmp / "serve.log", "wb"))
        wait_port(self, self.client, SERVICE_ADDR, ssh_port)
        self.start(self.client, sys.executable, "-m", "wraith_core", "connect", "--server", f"{SERVICE_ADDR}:{ssh_port}",
                   "--identity", str(clientkey), "--accept-any-host-key", "--socks5", f"127.0.0.1:{socks_port}",
                   "--log-level", "warning", stdout=subprocess.DEVNULL, stderr=open(self.tmp / "connect.log", "wb"))
        wait_port(self, self.client, "127.0.0.1", socks_port)
        return "127.0.0.1", socks_port


def wait_port(net: TestNet, ns: str, host: str, port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    code = f"import socket; socket.create_connection(({host!r}, {port}), timeout=1).close()"
    while time.monotonic() < deadline:
        if net.run(ns, "python3", "-c", code, timeout=10).returncode == 0:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{host}:{port} not reachable from {ns}")


def wraith_tun_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "wraith_tun", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
