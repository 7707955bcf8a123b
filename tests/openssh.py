"""Real OpenSSH peers for interop tests and benchmarks: a private sshd on loopback, ssh command lines."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from helpers import Keys, Proc, free_port, wait_port

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def start_sshd(keys: Keys, tmp: Path, extra: list[str] | None = None) -> tuple[Proc, int]:
    """sshd with our keys (OpenSSH format: wraith keygen writes the same files ssh-keygen does)."""
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    port = free_port()
    cfg = tmp / "sshd_config"
    for p in (keys.host, keys.client):
        os.chmod(p, 0o600)
    lines = [
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {keys.host}",
        f"AuthorizedKeysFile {keys.authorized}",
        f"PidFile {tmp / 'sshd.pid'}",
        "StrictModes no",
        "UsePAM no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "AllowTcpForwarding yes",
        "LogLevel ERROR",
        "MaxStartups 1000:30:2000",
        "MaxSessions 1000",
        *(extra or []),
    ]
    cfg.write_text("\n".join(lines) + "\n")
    p = Proc([SSHD, "-D", "-e", "-f", str(cfg)], tmp / "sshd.log")
    wait_port("127.0.0.1", port)
    return p, port


def ssh_base(keys: Keys, port: int, tmp: Path, known_hosts: bool = True) -> list[str]:
    kh = tmp / "ssh_known_hosts"
    if known_hosts:
        pub = keys.host_pub.read_text().split()
        kh.write_text(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
    return [
        "ssh", "-F", "/dev/null", "-p", str(port), "-i", str(keys.client),
        "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-o", f"UserKnownHostsFile={kh}", "-o", "StrictHostKeyChecking=yes" if known_hosts else "StrictHostKeyChecking=no",
        "-o", "ServerAliveInterval=5", "-o", "ExitOnForwardFailure=yes",
        "-o", "LogLevel=ERROR",
    ]


def run(args: list[str], timeout: float = 30, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, capture_output=True, timeout=timeout, input=input)
