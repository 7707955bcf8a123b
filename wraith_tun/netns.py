"""``--unshare -- CMD``: run CMD in a new network + mount namespace behind the TUN.

The parent (the shim) starts ``python -m wraith_tun.netns`` as a child. The
child unshares (adding a user namespace when not root), brings up ``lo``,
creates the TUN inside the new namespace, makes it the default route,
bind-mounts a private ``/etc/resolv.conf`` naming the shim's DNS address (and a
private ``/etc/nsswitch.conf`` with ``hosts: files dns``), hides the host's
name service daemons' sockets, hands the TUN file descriptor back over a Unix
socket (SCM_RIGHTS), waits for "go", and execs CMD. The shim keeps serving from
the original namespace, so its SOCKS5 connections never enter the new one.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
# Unix sockets of daemons that resolve names on the host's network: the mount namespace still
# shares /run, and glibc asks nscd before any NSS module or resolv.conf is looked at; nss-resolve
# asks systemd-resolved's varlink socket. An empty read-only tmpfs goes over each in CMD's view.
HOST_RESOLVER_DIRS = ("/run/nscd", "/var/run/nscd", "/run/systemd/resolve", "/var/run/systemd/resolve")
NSSWITCH = "/etc/nsswitch.conf"


class NamespaceError(Exception):
    pass


@dataclass
class Unshared:
    proc: asyncio.subprocess.Process
    fd: int
    name: str
    sock: socket.socket
    tmpdir: tempfile.TemporaryDirectory[str]

    def go(self) -> None:
        """Let CMD start (the shim is reading the TUN by now)."""
        self.sock.sendall(b"g")
        self.sock.close()

    async def wait(self) -> int:
        rc = await self.proc.wait()
        return 128 - rc if rc < 0 else rc


async def spawn(cmd: list[str], iface: ipaddress.IPv4Interface, mtu: int, dns_addr: str | None, name: str | None,
                iface6: ipaddress.IPv6Interface | None = None) -> Unshared:
    tmpdir = tempfile.TemporaryDirectory(prefix="wraith-tun-")
    resolv = os.path.join(tmpdir.name, "resolv.conf")
    with open(resolv, "w") as f:
        if dns_addr:
            f.write(f"# written by wraith-tun: DNS goes to the shim's virtual DNS on the TUN\nnameserver {dns_addr}\noptions attempts:3 timeout:2\n")
        else:
            f.write("# written by wraith-tun (--dns off)\n")
    nsswitch = os.path.join(tmpdir.name, "nsswitch.conf")
    _write_nsswitch(nsswitch)
    os.chmod(tmpdir.name, 0o755)
    os.chmod(resolv, 0o644)
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # -P: the helper runs as root; the current directory (maybe someone else's, with a planted
    # wraith_tun/) must not come first on its import path
    args = [sys.executable, "-P", "-m", "wraith_tun.netns", "--sock-fd", str(child.fileno()),
            "--tun-addr", str(iface), "--mtu", str(mtu), "--resolv", resolv, "--nsswitch", nsswitch]
    if name:
        args += ["--tun-name", name]
    if iface6:
        args += ["--tun-addr6", str(iface6)]
    proc = await asyncio.create_subprocess_exec(*args, "--", *cmd, pass_fds=(child.fileno(),))
    child.close()
    loop = asyncio.get_running_loop()
    parent.setblocking(False)
    try:
        msg, fds = await asyncio.wait_for(_recv_fd(loop, parent), 30)
    except (asyncio.TimeoutError, OSError) as e:
        parent.close()
        await proc.wait()
        tmpdir.cleanup()
        raise NamespaceError(f"namespace setup failed: {e}") from e
    if not fds:
        parent.close()
        rc = await proc.wait()
        tmpdir.cleanup()
        raise NamespaceError(msg.decode(errors="replace").strip() or f"namespace setup failed (exit {rc})")
    # the bind mount keeps the file alive inside CMD's mount namespace: nothing to leave behind
    tmpdir.cleanup()
    return Unshared(proc, fds[0], msg.decode().strip(), parent, tmpdir)


def _write_nsswitch(path: str, src: str = NSSWITCH) -> None:
    """The host's nsswitch.conf with names looked up in files and DNS only: modules such as
    resolve, mdns or myhostname reach daemons or networks on the host's side."""
    try:
        with open(src) as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    lines = [ln for ln in lines if not ln.strip().startswith("hosts:")]
    lines += ["# wraith-tun: names resolve through the TUN only", "hosts: files dns"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, 0o644)


async def _recv_fd(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[bytes, list[int]]:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        await fut
    finally:
        loop.remove_reader(sock.fileno())
    msg, fds, _flags, _addr = socket.recv_fds(sock, 4096, 1)
    return msg, fds


# ---- the child ---------------------------------------------------------------------------


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise NamespaceError(f"{what}: {os.strerror(err)}")


def _unshare() -> None:
    libc = _libc()
    flags = CLONE_NEWNET | CLONE_NEWNS
    # not root: a user namespace makes us root of the new namespaces (WRAITH_TUN_USERNS=1 forces
    # this path as root too, which is how the tests exercise it)
    if os.geteuid() != 0 or os.environ.get("WRAITH_TUN_USERNS") == "1":
        uid, gid = os.geteuid(), os.getegid()
        _check(libc.unshare(flags | CLONE_NEWUSER), "unshare (user namespaces may be disabled; run as root)")
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"0 {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"0 {gid} 1")
    else:
        _check(libc.unshare(flags), "unshare")
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")


def _private_resolv_conf(src: str, target: str = "/etc/resolv.conf") -> None:
    """Show ``src`` as /etc/resolv.conf in this (private) mount namespace."""
    libc = _libc()
    real = os.path.realpath(target)
    if not os.path.exists(real):
        # missing, or a dangling symlink (e.g. systemd-resolved's stub while it is stopped):
        # put a private tmpfs where it points and create the file there
        parent = os.path.dirname(real)
        if not os.path.isdir(parent):
            raise NamespaceError(f"{target} points to {real}, whose directory does not exist")
        _check(libc.mount(b"tmpfs", parent.encode(), b"tmpfs", 0, b"mode=0755"), f"mount tmpfs on {parent}")
        with open(real, "w"):
            pass
    _check(libc.mount(src.encode(), real.encode(), None, MS_BIND, None), f"bind-mount {target}")


def _hide_host_resolvers(dirs: tuple[str, ...] = HOST_RESOLVER_DIRS) -> None:
    """Put an empty read-only tmpfs over the directories holding the host's resolver sockets."""
    libc = _libc()
    done: set[str] = set()
    for d in dirs:
        real = os.path.realpath(d)  # /var/run is usually a link to /run
        if real in done or not os.path.isdir(real):
            continue
        done.add(real)
        flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
        _check(libc.mount(b"tmpfs", real.encode(), b"tmpfs", flags, b"mode=0755,size=4k"), f"hide {real}")


def _private_file(src: str, target: str) -> None:
    """Show ``src`` as ``target`` (an existing file) in this mount namespace."""
    real = os.path.realpath(target)
    if os.path.isfile(real):
        _check(_libc().mount(src.encode(), real.encode(), None, MS_BIND, None), f"bind-mount {target}")


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise NamespaceError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def child_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="wraith_tun.netns")
    ap.add_argument("--sock-fd", type=int, required=True)
    ap.add_argument("--tun-addr", required=True)
    ap.add_argument("--tun-name")
    ap.add_argument("--tun-addr6")
    ap.add_argument("--mtu", type=int, required=True)
    ap.add_argument("--resolv", required=True)
    ap.add_argument("--nsswitch")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    sock = socket.socket(fileno=a.sock_fd)
    try:
        from .device import create_tun

        _unshare()
        _ip("link", "set", "lo", "up")
        iface = ipaddress.IPv4Interface(a.tun_addr)
        iface6 = ipaddress.IPv6Interface(a.tun_addr6) if a.tun_addr6 else None
        dev = create_tun(a.tun_name, iface, a.mtu, iface6=iface6)
        _ip("route", "add", "default", "dev", dev.name)
        if iface6:
            _ip("-6", "route", "add", "default", "dev", dev.name)
        _hide_host_resolvers()  # first: /etc/resolv.conf may point into one of these directories
        _private_resolv_conf(a.resolv)
        if a.nsswitch:
            _private_file(a.nsswitch, NSSWITCH)  # no nsswitch.conf (musl): no NSS modules, nothing to do
    except Exception as e:
        sock.sendall(str(e).encode() or b"namespace setup failed")
        return 126
    socket.send_fds(sock, [dev.name.encode()], [dev.fd])
    dev.close()  # the shim holds the device now
    if sock.recv(1) != b"g":
        return 126
    sock.close()
    # without the shim the namespace has no network: if the shim dies, so does CMD
    _libc().prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:
        return 126
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        print(f"wraith-tun: cannot run {cmd[0]}: {e.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1:]))
