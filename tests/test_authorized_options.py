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
