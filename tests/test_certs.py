"""OpenSSH user certificates (--cert-authority) with OpenSSH's ssh and with wraith connect."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import Keys, Proc, curl, sha, wait_for_log, wraith
from openssh import run, ssh_base


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def sign(ca: Path, pub: Path, *opts: str) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-I", "test-id", *opts, str(pub)], check=True)
    return Path(str(pub)[: -len(".pub")] + "-cert.pub")


@pytest.fixture
def ca_server(keys: Keys, tmp_path, procs):
    ca = keygen(tmp_path / "ca")
    p = Proc(wraith("serve", "--key", str(keys.host), "--cert-authority", str(ca) + ".pub",
                    "--listen", "127.0.0.1:0"), tmp_path / "serve.log", ready=r"listening \w+ .*:(\d+)$")
    procs.append(p)
    return ca, p, int(p.match.group(1))  # type: ignore[union-attr]


def user_key(tmp_path: Path, name: str, ca: Path, *opts: str) -> Path:
    key = keygen(tmp_path / name)
    sign(ca, Path(str(key) + ".pub"), *opts)
    return key


def ssh_w(keys: Keys, key: Path, port: int, tmp_path: Path, files) -> subprocess.CompletedProcess[bytes]:
    base = ssh_base(keys, port, tmp_path)
    i = base.index("-i")
    base[i + 1] = str(key)  # ssh loads KEY-cert.pub beside it
    return run(base + ["-W", f"127.0.0.1:{files.port}", "root@127.0.0.1"],
               input=b"GET /small.bin HTTP/1.0\r\n\r\n", timeout=20)


def wraith_connect(key: Path, keys: Keys, port: int, tmp_path: Path, procs, name: str) -> tuple[Proc, int]:
    p = Proc(wraith("connect", "--server", f"root@127.0.0.1:{port}", "--identity", str(key),
                    "--host-key", str(keys.host_pub), "--socks5", "127.0.0.1:0"),
             tmp_path / f"{name}.log", ready=r"socks5 listening .*:(\d+)$")
    procs.append(p)
    return p, int(p.match.group(1))  # type: ignore[union-attr]


def test_valid_certificate_accepted(keys: Keys, ca_server, tmp_path, procs, files) -> None:
    ca, server, port = ca_server
    key = user_key(tmp_path, "alice", ca, "-n", "root", "-V", "-5m:+1h")
    out = ssh_w(keys, key, port, tmp_path, files)
    assert out.returncode == 0, out.stderr
    assert sha(out.stdout.split(b"\r\n\r\n", 1)[1]) == files.hashes["small.bin"]
    client, socks = wraith_connect(key, keys, port, tmp_path, procs, "c")
    wait_for_log(client, "session up")
    r = curl("--socks5-hostname", f"127.0.0.1:{socks}", files.url("big.bin", "localhost"))
    assert r.returncode == 0 and sha(r.stdout) == files.hashes["big.bin"]
    # --certificate FILE works too when the cert does not sit beside the key
    moved = tmp_path / "elsewhere-cert.pub"
    Path(str(key) + "-cert.pub").rename(moved)
    p = Proc(wraith("connect", "--server", f"root@127.0.0.1:{port}", "--identity", str(key),
                    "--certificate", str(moved), "--host-key", str(keys.host_pub), "--socks5", "127.0.0.1:0"),
             tmp_path / "c2.log", ready="socks5 listening")
    procs.append(p)
    wait_for_log(p, "session up")


@pytest.mark.parametrize("case,opts", [
    ("expired", ["-n", "root", "-V", "-2h:-1h"]),
    ("not-yet-valid", ["-n", "root", "-V", "+1h:+2h"]),
    ("wrong-principal", ["-n", "alice", "-V", "-5m:+1h"]),
    ("wrong-source", ["-n", "root", "-V", "-5m:+1h", "-O", "source-address=10.9.8.7/32"]),
    ("no-principals", ["-V", "-5m:+1h"]),  # "valid for any user": OpenSSH's TrustedUserCAKeys refuses it too
])
def test_bad_certificates_refused(keys: Keys, ca_server, tmp_path, procs, files, case: str, opts: list[str]) -> None:
    ca, server, port = ca_server
    key = user_key(tmp_path, case, ca, *opts)
    out = ssh_w(keys, key, port, tmp_path, files)
    assert out.returncode == 255 and b"Permission denied" in out.stderr, out.stderr
    client, _ = wraith_connect(key, keys, port, tmp_path, procs, case)
    wait_for_log(client, "authentication failed")
    assert "session up" not in client.log()
    assert "result=reject" in server.log()


def test_wrong_ca_refused(keys: Keys, ca_server, tmp_path, procs, files) -> None:
    _, server, port = ca_server
    other_ca = keygen(tmp_path / "other_ca")
    key = user_key(tmp_path, "mallory", other_ca, "-n", "root")
    out = ssh_w(keys, key, port, tmp_path, files)
    assert out.returncode == 255 and b"Permission denied" in out.stderr
    client, _ = wraith_connect(key, keys, port, tmp_path, procs, "m")
    wait_for_log(client, "authentication failed")


def test_certificate_without_port_forwarding(keys: Keys, ca_server, tmp_path, procs, files) -> None:
    ca, _, port = ca_server
    key = user_key(tmp_path, "nofwd", ca, "-n", "root", "-O", "no-port-forwarding")
    client, socks = wraith_connect(key, keys, port, tmp_path, procs, "nofwd")
    wait_for_log(client, "session up")
    r = curl("--socks5-hostname", f"127.0.0.1:{socks}", files.url("small.bin", "localhost"))
    assert r.returncode == 97  # SOCKS5 "not allowed": the certificate forbids forwarding
