"""Standard authorized_keys options are honoured: permitopen=, from=, no-port-forwarding."""

from __future__ import annotations

import pytest

from helpers import Keys, curl, free_port, sha, start_client, start_server, wait_for_log


def _with_options(keys: Keys, options: str) -> None:
    keys.authorized.write_text(f"{options} {keys.client_pub.read_text()}")


def test_permitopen(keys: Keys, tmp_path, procs, files) -> None:
    _with_options(keys, f'permitopen="127.0.0.1:{files.port}"')
    server, port = start_server(keys, tmp_path)
    procs.append(server)
    client, socks = start_client(keys, tmp_path, port)
    procs.append(client)
    r = curl("--socks5", f"127.0.0.1:{socks}", files.url("small.bin"))
    assert r.returncode == 0 and sha(r.stdout) == files.hashes["small.bin"]
    r = curl("--socks5", f"127.0.0.1:{socks}", f"http://127.0.0.1:{free_port()}/")
    assert r.returncode == 97


def test_no_port_forwarding(keys: Keys, tmp_path, procs, files) -> None:
    _with_options(keys, "no-port-forwarding")
    server, port = start_server(keys, tmp_path)
    procs.append(server)
    rport = free_port()
    client, socks = start_client(keys, tmp_path, port, "--remote-forward", f"{rport}:127.0.0.1:{files.port}")
    procs.append(client)
    r = curl("--socks5", f"127.0.0.1:{socks}", files.url("small.bin"))
    assert r.returncode == 97
    wait_for_log(client, "remote forward refused by server")


@pytest.mark.parametrize("pattern,allowed", [('from="10.0.0.0/8"', False), ('from="127.0.0.1"', True)])
def test_from_option(keys: Keys, tmp_path, procs, pattern: str, allowed: bool) -> None:
    _with_options(keys, pattern)
    server, port = start_server(keys, tmp_path)
    procs.append(server)
    client, _ = start_client(keys, tmp_path, port, wait_up=False)
    procs.append(client)
    wait_for_log(client, "session up" if allowed else "authentication failed")


@pytest.mark.parametrize("expiry,allowed", [('expiry-time="20000101"', False), ('expiry-time="29991231Z"', True),
                                            ('expiry-time="200001011200"', False)])
def test_expiry_time(keys: Keys, tmp_path, procs, expiry: str, allowed: bool) -> None:
    """OpenSSH's expiry-time: the key is refused once that time has passed."""
    _with_options(keys, expiry)
    server, port = start_server(keys, tmp_path)
    procs.append(server)
    client, _ = start_client(keys, tmp_path, port, wait_up=False)
    procs.append(client)
    wait_for_log(client, "session up" if allowed else "authentication failed")
    assert ("result=reject" in server.log()) != allowed


@pytest.mark.parametrize("options,needle", [("no-port-forwardng", "'no-port-forwardng'"),
                                            ("permit-open=\"x:1\"", "'permit-open'"),
                                            ('expiry-time="2026-01-01"', "expiry-time")])
def test_options_wraith_does_not_enforce_are_refused_at_start(keys: Keys, tmp_path, options: str,
                                                               needle: str) -> None:
    """An option the server would silently ignore (a typo, or one it does not implement)
    must not fail open: the server refuses to start, in one line."""
    import subprocess

    from helpers import wraith

    _with_options(keys, options)
    r = subprocess.run(wraith("serve", "--key", str(keys.host), "--authorized-keys", str(keys.authorized),
                              "--listen", "127.0.0.1:0"), capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_privileged_remote_forward_refused(keys: Keys, tmp_path, procs) -> None:
    """tcpip-forward for a port below 1024 is refused, as OpenSSH does for every login
    but root (a key is not root), even when the server runs as root."""
    server, port = start_server(keys, tmp_path)
    procs.append(server)
    client, _ = start_client(keys, tmp_path, port, "--remote-forward", "700:127.0.0.1:9")
    procs.append(client)
    wait_for_log(client, "remote forward refused by server")
    wait_for_log(server, "remote forward refused remote_addr=127.0.0.1 reason=privileged-port")
