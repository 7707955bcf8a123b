"""User errors: one line on stderr, non-zero exit, never a traceback."""

from __future__ import annotations

import signal
import os
import subprocess
import time

import pytest

from helpers import Keys, start_client, start_server, wraith
from openssh import run


def one_line_error(args: list[str], *needles: str) -> None:
    out = run(wraith(*args), timeout=20)
    err = out.stderr.decode()
    assert out.returncode != 0, err
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_missing_key_files(keys: Keys, tmp_path) -> None:
    one_line_error(["serve", "--key", str(tmp_path / "nope"), "--authorized-keys", str(keys.authorized)],
                   "not found", "nope")
    one_line_error(["serve", "--key", str(keys.host), "--authorized-keys", str(tmp_path / "nokeys")], "not found")
    one_line_error(["connect", "--server", "127.0.0.1:1", "--identity", str(tmp_path / "noid"),
                    "--accept-any-host-key"], "not found")


def test_fifo_and_device_keys_refused_without_reading(keys: Keys, tmp_path) -> None:
    """A FIFO would block (a daemon serving others would hang on it), /dev/zero would fill the
    memory: key paths must be regular files."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    one_line_error(["connect", "--server", "127.0.0.1:1", "--identity", str(fifo), "--accept-any-host-key"],
                   "not a regular file", str(fifo))
    one_line_error(["connect", "--server", "127.0.0.1:1", "--identity", str(keys.client), "--known-hosts",
                    "/dev/zero"], "not a regular file")
    one_line_error(["serve", "--key", str(keys.host), "--authorized-keys", str(fifo)], "not a regular file")


def test_dev_null_reads_as_an_empty_file(keys: Keys) -> None:
    """As for OpenSSH (``UserKnownHostsFile=/dev/null``): no host is known, nothing is refused
    for being a device. Other devices still are (above)."""
    from wraith_core.keys import read_key_input
    from wraith_core.options import ConnectOptions
    from wraith_core.ssh.client import Session

    assert read_key_input("/dev/null", "known hosts") == (b"", "/dev/null")
    known = Session(ConnectOptions(server="127.0.0.1:1", identity=str(keys.client),
                                   known_hosts="/dev/null"))
    assert known.known_hosts.match("127.0.0.1", "127.0.0.1", 1) == ([], [], [], [], [], [], [])


def test_pem_key_refused_with_conversion_hint(keys: Keys, tmp_path) -> None:
    pem = tmp_path / "pem_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-m", "PEM", "-N", "", "-f", str(pem)], check=True)
    assert pem.read_text().startswith("-----BEGIN RSA PRIVATE KEY-----")
    one_line_error(["serve", "--key", str(pem), "--authorized-keys", str(keys.authorized)],
                   "PEM", "OpenSSH", f"ssh-keygen -p -N '' -f {pem}")
    pk8 = tmp_path / "pk8"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-m", "PKCS8", "-N", "", "-f", str(pk8)], check=True)
    one_line_error(["connect", "--server", "127.0.0.1:1", "--identity", str(pk8), "--accept-any-host-key"],
                   "PEM/PKCS#8", f"ssh-keygen -p -N '' -f {pk8}")
    # the suggested command does the job
    from wraith_core.keys import load_private_key

    for path in (pem, pk8):
        subprocess.run(["ssh-keygen", "-q", "-p", "-N", "", "-f", str(path)], check=True, capture_output=True)
        assert path.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
        load_private_key(str(path))


def test_ssh_keygen_keys_work(tmp_path, procs, files) -> None:
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)], check=True)
    (tmp_path / "ak").write_bytes((tmp_path / "client.pub").read_bytes())
    keys = Keys(tmp_path, tmp_path / "host", tmp_path / "host.pub", tmp_path / "client", tmp_path / "client.pub",
                tmp_path / "ak")
    server, port = start_server(keys, tmp_path)
    procs.append(server)
    client, socks = start_client(keys, tmp_path, port)
    procs.append(client)


def test_bad_flags_and_combinations(keys: Keys) -> None:
    one_line_error(["serve", "--key", "k", "--bogus"], "unrecognized")
    one_line_error(["serve", "--key", str(keys.host), "--authorized-keys", str(keys.authorized),
                    "--stealth"], "--stealth")
    one_line_error(["serve", "--key", str(keys.host), "--authorized-keys", str(keys.authorized),
                    "--listen", "127.0.0.1:99999"], "port")
    one_line_error(["connect", "--server", "127.0.0.1:1", "--identity", str(keys.client), "--accept-any-host-key",
                    "--forward", "nonsense"], "--forward")
    one_line_error(["connect", "--server", "127.0.0.1:1", "--identity", str(keys.client), "--accept-any-host-key",
                    "--proxy", "ftp://x:1"], "--proxy")
    one_line_error(["serve", "--key", str(keys.host)], "authorized-keys")
    one_line_error(["connect", "--peer", "abc", "--identity", str(keys.client), "--accept-any-host-key"],
                   "--transport iroh")
    c = ["connect", "--server", "127.0.0.1:1", "--identity", str(keys.client), "--accept-any-host-key"]
    for extra, needle in ((["--keepalive-interval", "-1"], "--keepalive-interval"),
                          (["--keepalive-count-max", "0"], "--keepalive-count-max"),
                          (["--half-open-timeout", "-1"], "--half-open-timeout"),
                          (["--window", "99999999999", "--max-pktsize", "99999999999"], "window"),
                          (["--proxy", "http://[::1"], "--proxy"),
                          (["--identity", str(keys.dir)], "is a directory"),
                          # flags of another transport are refused, not silently ignored
                          (["--insecure"], "--transport tls"),
                          (["--tls-server-name", "x.example"], "--transport tls"),
                          (["--iroh-relay", "none"], "--transport iroh")):
        one_line_error(c + extra, needle)
    s = ["serve", "--key", str(keys.host), "--authorized-keys", str(keys.authorized)]
    for extra, needle in ((["--login-grace-time", "-1"], "--login-grace-time"),
                          (["--transport", "tls", "--tls-cert", "x", "--tls-key", "y", "--stealth",
                            "--stealth-timeout", "0"], "--stealth-timeout"),
                          (["--tls-cert", "x", "--tls-key", "y"], "--transport tls"),
                          (["--stealth-timeout", "5"], "--stealth"),
                          (["--iroh-relay", "none"], "--transport iroh")):
        one_line_error(s + extra, needle)
    one_line_error(["serve", "--key", str(keys.dir), "--authorized-keys", str(keys.authorized)], "is a directory")


def test_keygen_errors_and_a_private_key_always_0600(tmp_path) -> None:
    one_line_error(["keygen", str(tmp_path), "--force"], "cannot write the key")
    one_line_error(["keygen", "/proc/no-such-dir/k"], "cannot write the key")
    old = tmp_path / "k"
    old.write_text("old")
    os.chmod(old, 0o644)
    out = run(wraith("keygen", str(old), "--force"), timeout=20)
    assert out.returncode == 0, out.stderr
    assert os.stat(old).st_mode & 0o777 == 0o600 and old.read_text().startswith("-----BEGIN OPENSSH")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_keygen_never_overwrites_or_follows_the_public_key_file(tmp_path) -> None:
    """KEY.pub is checked like KEY: an existing one is kept without --force, and a symlink
    there is replaced, never written through."""
    pub = tmp_path / "a.pub"
    pub.write_text("mine")
    one_line_error(["keygen", str(tmp_path / "a")], "exists")
    assert pub.read_text() == "mine" and not (tmp_path / "a").exists()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "b.pub").symlink_to(victim)
    out = run(wraith("keygen", str(tmp_path / "b"), "--force"), timeout=20)
    assert out.returncode == 0, out.stderr
    assert victim.read_text() == "precious"
    assert (tmp_path / "b.pub").read_text().startswith("ssh-ed25519 ")
    (tmp_path / "c.pub").mkdir()
    one_line_error(["keygen", str(tmp_path / "c"), "--force"], "c.pub")
    assert not (tmp_path / "c").exists()  # no private key without its public half


def test_a_passphrase_protected_key_says_how_to_remove_it(tmp_path) -> None:
    key = tmp_path / "enc"
    r = run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(key)], timeout=20)
    assert r.returncode == 0, r.stderr
    one_line_error(["connect", "--server", "127.0.0.1:1", "--identity", str(key), "--accept-any-host-key"],
                   "ssh-keygen -p -N '' -f")


def test_listen_port_in_use(keys: Keys, tmp_path, procs) -> None:
    server, port = start_server(keys, tmp_path)
    procs.append(server)
    one_line_error(["serve", "--key", str(keys.host), "--authorized-keys", str(keys.authorized),
                    "--listen", f"127.0.0.1:{port}"], "cannot listen")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_shutdown_exit_zero(keys: Keys, tmp_path, procs, sig: int) -> None:
    server, port = start_server(keys, tmp_path)
    procs.append(server)
    client, _ = start_client(keys, tmp_path, port)
    procs.append(client)
    for p in (client, server):
        t0 = time.monotonic()
        p.signal(sig)
        assert p.p.wait(10) == 0
        assert time.monotonic() - t0 < 5
        assert "Traceback" not in p.log()


@pytest.mark.parametrize("delay", [0.08, 0.15, 0.25, 0.4])
def test_ctrl_c_while_the_program_loads_is_quiet(keys: Keys, delay: float) -> None:
    """Loading the program takes a few hundred ms: a Ctrl-C meanwhile ends it with status
    130 (or 0 once it is up), never with a traceback."""
    p = subprocess.Popen(wraith("connect", "--server", "127.0.0.1:1", "--identity", str(keys.client),
                                "--host-key", str(keys.host_pub), "--socks5", "127.0.0.1:0"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=20)
    assert p.returncode in (0, 130), (p.returncode, err)
    assert "Traceback" not in err and "never awaited" not in err, err


def test_serve_prints_the_host_key_fingerprint_and_version(keys: Keys, tmp_path, procs) -> None:
    """What clients pin (--host-key SHA256:…) is printed at start, as ssh-keygen shows it."""
    server, _ = start_server(keys, tmp_path)
    procs.append(server)
    shown = run(["ssh-keygen", "-lf", str(keys.host_pub)], timeout=20).stdout.decode().split()[1]
    assert f"wraith serve: host key {shown}" in server.lines
    out = run(wraith("--version"), timeout=20)
    assert out.returncode == 0 and out.stdout.decode().startswith("wraith ")


def test_every_flag_says_what_it_does() -> None:
    """`wraith COMMAND --help` explains each flag, not only its name."""
    import argparse

    from wraith_core.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bare = [f"{name} {a.option_strings[0]}" for name, p in sub.choices.items() for a in p._actions
            if a.option_strings and not a.help]
    assert bare == []
