"""TLS transport end to end: real wraith processes, real curl through the SOCKS5 port, content hashes."""

from __future__ import annotations

import asyncio

import pytest

from helpers import HTTPFiles, Keys, curl, sha, start_client, start_server, wait_for_log
from transport_helpers import Certs, slow_tls_login, start_client_args, tls_server_args

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def certs(tmp_path) -> Certs:
    return Certs.make(tmp_path / "certs")


@pytest.fixture
def tls_server(keys: Keys, certs: Certs, tmp_path, procs):
    server, port = start_server(keys, tmp_path, *tls_server_args(certs))
    procs.append(server)
    return server, port


def _fetch_all(socks: int, files: HTTPFiles) -> None:
    for name in ("small.bin", "big.bin", "empty.bin"):
        r = curl("--socks5-hostname", f"127.0.0.1:{socks}", files.url(name))
        assert r.returncode == 0, r.stderr
        assert sha(r.stdout) == files.hashes[name], name


def test_tls_verified_with_ca(keys, certs, tls_server, files, tmp_path, procs) -> None:
    """Verified against --tls-ca; SNI and the checked name default to the --server host name."""
    server, port = tls_server
    client, socks = start_client_args(keys, tmp_path, ["--server", f"localhost:{port}", "--transport", "tls",
                                                       "--tls-ca", str(certs.ca)])
    procs.append(client)
    _fetch_all(socks, files)
    assert "transport=tls" in server.log()
    assert "--insecure" not in client.log()


def test_tls_server_name_checked(keys, certs, tls_server, files, tmp_path, procs) -> None:
    """SNI/verification use --tls-server-name: a name on the certificate works, another is refused."""
    _, port = tls_server
    ok, socks = start_client(keys, tmp_path, port, "--transport", "tls", "--tls-ca", str(certs.ca),
                             "--tls-server-name", "wraith.test", name="sni-ok")
    procs.append(ok)
    r = curl("--socks5", f"127.0.0.1:{socks}", files.url("small.bin"))
    assert sha(r.stdout) == files.hashes["small.bin"]
    bad, _ = start_client(keys, tmp_path, port, "--transport", "tls", "--tls-ca", str(certs.ca),
                          "--tls-server-name", "not-on-the-cert.example", name="sni-bad", wait_up=False)
    procs.append(bad)
    wait_for_log(bad, "TLS certificate verification failed")
    assert "session up" not in bad.log()


def test_tls_insecure_warns_once(keys, tls_server, files, tmp_path, procs) -> None:
    server, port = tls_server
    client, socks = start_client(keys, tmp_path, port, "--transport", "tls", "--insecure")
    procs.append(client)
    _fetch_all(socks, files)
    # a reconnect must not repeat the warning
    server.stop()
    server2, _ = start_server(keys, tmp_path, *tls_server_args(Certs.make(tmp_path / "certs2")),
                              name="serve2", listen=f"127.0.0.1:{port}")
    procs.append(server2)
    wait_for_log(client, "session up", timeout=20, count=2)
    r = curl("--socks5", f"127.0.0.1:{socks}", files.url("small.bin"))
    assert sha(r.stdout) == files.hashes["small.bin"]
    warnings = [ln for ln in client.log().splitlines() if "--insecure" in ln]
    assert len(warnings) == 1, warnings
    assert "WARNING" in warnings[0] and "NOT verified" in warnings[0]


@pytest.mark.parametrize("ca", ["other", "system"])
def test_tls_wrong_ca_refused(keys, certs, tls_server, files, tmp_path, procs, ca: str) -> None:
    """A CA that did not sign the server's certificate (or the system store) refuses the server."""
    server, port = tls_server
    extra = ["--tls-ca", str(certs.other_ca)] if ca == "other" else []
    client, socks = start_client(keys, tmp_path, port, "--transport", "tls", *extra, wait_up=False)
    procs.append(client)
    wait_for_log(client, "TLS certificate verification failed")
    assert "session up" not in client.log()
    if ca == "other":  # (a channel request waits session_wait for a session that never comes)
        r = curl("--socks5", f"127.0.0.1:{socks}", files.url("small.bin"), timeout=15)
        assert r.returncode != 0 and r.stdout == b""
    # the failed handshake never reached SSH on the server
    assert "connection opened" not in server.log()


async def test_tls_library_open_stream(keys, certs, tls_server, files) -> None:
    """Library parity: ConnectOptions(transport='tls', tls_ca=<PEM bytes>) + open_stream; ETLS on a bad CA."""
    from wraith_core import open_stream
    from wraith_core.errors import ConnectError
    from wraith_core.options import ConnectOptions

    _, port = tls_server
    opts = ConnectOptions(server=f"127.0.0.1:{port}", transport="tls", tls_ca=certs.ca.read_bytes(),
                          identity=str(keys.client), host_key=str(keys.host_pub), socks5=None)
    stream = await open_stream(opts, target=f"127.0.0.1:{files.port}")
    try:
        stream.write(b"GET /big.bin HTTP/1.0\r\nHost: x\r\n\r\n")
        data = await asyncio.wait_for(stream.read(-1), 30)
    finally:
        stream.close()
    body = data.split(b"\r\n\r\n", 1)[1]
    assert sha(body) == files.hashes["big.bin"]

    bad = opts.replace(tls_ca=certs.other_ca.read_bytes())
    with pytest.raises(ConnectError) as info:
        await open_stream(bad, target=f"127.0.0.1:{files.port}")
    assert info.value.code == "ETLS"
    assert "certificate verification failed" in str(info.value)
    assert "\n" not in str(info.value)


def test_login_grace_time_counts_from_the_accept(keys, certs, tmp_path, procs) -> None:
    """--login-grace-time is one deadline from the TCP accept: a client that spends most of
    it in the TLS handshake has only the rest for SSH, not a fresh grace time."""
    grace, stall = 4.0, 3.0
    server, port = start_server(keys, tmp_path, *tls_server_args(certs), "--login-grace-time", str(grace))
    procs.append(server)
    handshake, closed = slow_tls_login(port, stall, wait=grace + 2.0)
    assert handshake >= stall
    assert closed <= grace + 2.0, f"closed {closed:.1f} s after the connect (handshake done at {handshake:.1f} s)"
    wait_for_log(server, "connection closed remote_addr=127.0.0.1")
