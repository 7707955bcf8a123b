"""Interop both ways with real OpenSSH: ssh -D/-L/-R/-W against wraith serve, wraith connect against sshd."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import Keys, Proc, curl, free_port, sha, start_server, wait_port
from openssh import run, ssh_base, start_sshd


@pytest.fixture
def wserve(keys: Keys, tmp_path, procs):
    p, port = start_server(keys, tmp_path)
    procs.append(p)
    return p, port


def _bg_ssh(args: list[str], tmp_path, name: str) -> Proc:
    return Proc(args, tmp_path / f"{name}.log")


def test_ssh_D_through_wraith_serve(keys, wserve, files, tmp_path, procs) -> None:
    _, port = wserve
    dport = free_port()
    p = _bg_ssh(ssh_base(keys, port, tmp_path) + ["-N", "-D", f"127.0.0.1:{dport}", "root@127.0.0.1"], tmp_path, "sshD")
    procs.append(p)
    wait_port("127.0.0.1", dport)
    r = curl("--socks5-hostname", f"127.0.0.1:{dport}", files.url("big.bin", "localhost"))
    assert r.returncode == 0, r.stderr + p.log().encode()
    assert sha(r.stdout) == files.hashes["big.bin"]


def test_ssh_L_and_W_through_wraith_serve(keys, wserve, files, tmp_path, procs) -> None:
    _, port = wserve
    lport = free_port()
    p = _bg_ssh(ssh_base(keys, port, tmp_path) + ["-N", "-L", f"127.0.0.1:{lport}:127.0.0.1:{files.port}",
                                                  "root@127.0.0.1"], tmp_path, "sshL")
    procs.append(p)
    wait_port("127.0.0.1", lport)
    r = curl(f"http://127.0.0.1:{lport}/big.bin")
    assert r.returncode == 0 and sha(r.stdout) == files.hashes["big.bin"]
    # -W: stdin/stdout as the channel; ssh must exit once the target has closed (EOF both ways)
    req = b"GET /small.bin HTTP/1.0\r\n\r\n"
    out = run(ssh_base(keys, port, tmp_path) + ["-W", f"127.0.0.1:{files.port}", "root@127.0.0.1"],
              input=req, timeout=20)
    assert out.returncode == 0, out.stderr
    body = out.stdout.split(b"\r\n\r\n", 1)[1]
    assert sha(body) == files.hashes["small.bin"]


def test_ssh_R_through_wraith_serve(keys, wserve, files, tmp_path, procs) -> None:
    _, port = wserve
    rport = free_port()
    p = _bg_ssh(ssh_base(keys, port, tmp_path) + ["-N", "-R", f"127.0.0.1:{rport}:127.0.0.1:{files.port}",
                                                  "root@127.0.0.1"], tmp_path, "sshR")
    procs.append(p)
    wait_port("127.0.0.1", rport)
    r = curl(f"http://127.0.0.1:{rport}/big.bin")
    assert r.returncode == 0 and sha(r.stdout) == files.hashes["big.bin"]


def test_wraith_connect_against_sshd(keys, files, tmp_path, procs) -> None:
    sshd, port = start_sshd(keys, tmp_path)
    procs.append(sshd)
    kh = tmp_path / "known_hosts"
    pub = keys.host_pub.read_text().split()
    kh.write_text(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
    lport = free_port()
    rport = free_port()
    p = Proc(["python3", "-m", "wraith_core", "connect", "--server", f"root@127.0.0.1:{port}",
              "--identity", str(keys.client), "--known-hosts", str(kh), "--socks5", "127.0.0.1:0",
              "--forward", f"{lport}:127.0.0.1:{files.port}",
              "--remote-forward", f"{rport}:127.0.0.1:{files.port}"],
             tmp_path / "connect.log", ready=r"socks5 listening .*:(\d+)$")
    procs.append(p)
    socks = int(p.match.group(1))  # type: ignore[union-attr]
    from helpers import wait_for_log

    wait_for_log(p, "remote forward up")
    for url in (f"http://127.0.0.1:{lport}/big.bin", f"http://127.0.0.1:{rport}/big.bin"):
        r = curl(url)
        assert r.returncode == 0 and sha(r.stdout) == files.hashes["big.bin"], (url, r.stderr)
    r = curl("--socks5-hostname", f"127.0.0.1:{socks}", files.url("big.bin", "localhost"))
    assert r.returncode == 0 and sha(r.stdout) == files.hashes["big.bin"]
    # a refused target through OpenSSH's server is still a proper SOCKS5 failure, not an empty success
    r = curl("--socks5", f"127.0.0.1:{socks}", f"http://127.0.0.1:{free_port()}/")
    assert r.returncode == 97, (r.returncode, r.stderr)  # curl: proxy handshake failed


def test_wraith_connect_sshd_wrong_known_host_refused(keys, tmp_path, procs) -> None:
    sshd, port = start_sshd(keys, tmp_path)
    procs.append(sshd)
    from wraith_core.keys import generate_ed25519

    _, other_pub = generate_ed25519(tmp_path / "other", "other")
    kh = tmp_path / "known_hosts"
    pub = other_pub.read_text().split()
    kh.write_text(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
    p = Proc(["python3", "-m", "wraith_core", "connect", "--server", f"root@127.0.0.1:{port}",
              "--identity", str(keys.client), "--known-hosts", str(kh), "--socks5", "127.0.0.1:0"],
             tmp_path / "connect.log", ready=r"socks5 listening")
    procs.append(p)
    from helpers import wait_for_log

    wait_for_log(p, "host key verification failed")
    assert "session up" not in p.log()


def test_wraith_connect_against_sshd_rekeying_often(keys, files, tmp_path, procs) -> None:
    """sshd re-keys every 256 KiB while 8 MiB files come through wraith connect: wraith's lean
    AES-GCM receive and send (ssh/lean_recv.py, ssh/speedups.py) stay in step with OpenSSH's
    packets and its key exchanges, in the middle of data."""
    sshd, port = start_sshd(keys, tmp_path, ["RekeyLimit 256K", "Ciphers aes128-gcm@openssh.com,aes256-gcm@openssh.com"])
    procs.append(sshd)
    kh = tmp_path / "known_hosts"
    pub = keys.host_pub.read_text().split()
    kh.write_text(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
    p = Proc(["python3", "-m", "wraith_core", "connect", "--server", f"root@127.0.0.1:{port}",
              "--identity", str(keys.client), "--known-hosts", str(kh), "--socks5", "127.0.0.1:0"],
             tmp_path / "connect.log", ready=r"socks5 listening .*:(\d+)$")
    procs.append(p)
    socks = int(p.match.group(1))  # type: ignore[union-attr]
    for _ in range(3):
        r = curl("--socks5-hostname", f"127.0.0.1:{socks}", files.url("big.bin", "localhost"))
        assert r.returncode == 0 and sha(r.stdout) == files.hashes["big.bin"], r.stderr
    assert "session up" in p.log() and "error" not in p.log().lower()


def test_wraith_connect_pins_the_key_of_an_sshd_with_a_host_certificate(keys, tmp_path, procs) -> None:
    """sshd offers a host certificate (HostCertificate): a --host-key pin (the key, or its
    SHA256 fingerprint) trusts that key, not a CA, so wraith asks for the plain key. It
    used to take the certificate, find no trusted CA, and retry forever."""
    import subprocess

    from helpers import wait_for_log
    from wraith_core.keys import fingerprint, load_public_key

    ca = tmp_path / "host_ca"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ca)], check=True)
    subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-I", "host", "-h", "-n", "127.0.0.1", str(keys.host_pub)],
                   check=True)
    cert = Path(str(keys.host_pub)[: -len(".pub")] + "-cert.pub")
    sshd, port = start_sshd(keys, tmp_path, [f"HostCertificate {cert}"])
    procs.append(sshd)
    fp = fingerprint(load_public_key(str(keys.host_pub)))
    for name, pin in (("key", str(keys.host_pub)), ("fingerprint", fp)):
        p = Proc(["python3", "-m", "wraith_core", "connect", "--server", f"root@127.0.0.1:{port}",
                  "--identity", str(keys.client), "--host-key", pin, "--socks5", "127.0.0.1:0"],
                 tmp_path / f"connect-{name}.log", ready=r"socks5 listening")
        procs.append(p)
        wait_for_log(p, "session up")
