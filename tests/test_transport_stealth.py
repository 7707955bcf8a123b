"""Stealth mode: a TLS server that looks like nginx to anyone who does not speak SSH first."""

from __future__ import annotations

import email.utils
import socket
import ssl
import subprocess
import time

import pytest

from helpers import Keys, curl, sha, start_client, start_server, wait_for_log, wraith
from openssh import ssh_base
from transport_helpers import Certs, slow_tls_login, tls_server_args

pytestmark = pytest.mark.timeout(60)

STEALTH_TIMEOUT = 4.0
NGINX_BODY = (b"<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n"
              b"<center><h1>404 Not Found</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")


@pytest.fixture
def certs(tmp_path) -> Certs:
    return Certs.make(tmp_path / "certs")


@pytest.fixture
def stealth(keys: Keys, certs: Certs, tmp_path, procs):
    server, port = start_server(keys, tmp_path, *tls_server_args(certs), "--stealth",
                                "--stealth-timeout", str(STEALTH_TIMEOUT))
    procs.append(server)
    return server, port


def _tls_socket(port: int) -> ssl.SSLSocket:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def _read_all(s: ssl.SSLSocket, timeout: float) -> bytes:
    s.settimeout(timeout)
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (ssl.SSLEOFError, ConnectionResetError):
            break
        if not chunk:
            break
        out += chunk
    return out


def _check_nginx_404(raw: bytes, head_only: bool = False) -> None:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 404 Not Found"
    names = [ln.split(b":", 1)[0] for ln in lines[1:]]
    assert names == [b"Server", b"Date", b"Content-Type", b"Content-Length", b"Connection"], lines
    hdr = {ln.split(b": ", 1)[0]: ln.split(b": ", 1)[1] for ln in lines[1:]}
    assert hdr[b"Server"] == b"nginx"
    assert hdr[b"Content-Type"] == b"text/html"
    assert hdr[b"Connection"] == b"close"
    assert hdr[b"Content-Length"] == str(len(NGINX_BODY)).encode() == b"146"
    when = email.utils.parsedate_to_datetime(hdr[b"Date"].decode())
    assert abs(time.time() - when.timestamp()) < 60 and hdr[b"Date"].endswith(b" GMT")
    assert body == (b"" if head_only else NGINX_BODY)
    assert b"SSH-" not in raw


def test_curl_gets_nginx_404(stealth) -> None:
    server, port = stealth
    r = curl("-k", "-i", f"https://localhost:{port}/")
    assert r.returncode == 0, r.stderr
    _check_nginx_404(r.stdout)
    r = curl("-k", "-i", f"https://localhost:{port}/admin/login.php?x=1")
    _check_nginx_404(r.stdout)
    r = curl("-k", "-I", f"https://localhost:{port}/")
    _check_nginx_404(r.stdout, head_only=True)
    assert "connection opened" not in server.log()


def test_non_http_junk_gets_404_too(stealth) -> None:
    _, port = stealth
    with _tls_socket(port) as s:
        s.sendall(b"\x00\x01hello")
        _check_nginx_404(_read_all(s, 5))


@pytest.mark.parametrize("partial", [b"S", b"SSH", b"G", b"GET / HTTP/1.1\r\nHost: x\r\n", b"\r\nPOS",
                                     b"\r\n\r\n"])
def test_an_incomplete_request_is_closed_silently_like_nginx(stealth, partial: bytes) -> None:
    """nginx waits for the rest of a request and sends nothing if it never comes: the same
    for a partial "SSH-" as for a partial HTTP request, so neither tells SSH is behind."""
    _, port = stealth
    with _tls_socket(port) as s:
        s.sendall(partial)
        s.settimeout(1.5)
        with pytest.raises(socket.timeout):
            s.recv(1)  # still waiting for more
        s.shutdown(socket.SHUT_WR)
        assert _read_all(s, 5) == b""


def test_idle_client_sees_nothing_then_is_closed(stealth) -> None:
    _, port = stealth
    with _tls_socket(port) as s:
        started = time.monotonic()
        s.settimeout(STEALTH_TIMEOUT - 1)
        with pytest.raises(socket.timeout):
            s.recv(1)  # nothing at all for several seconds: no SSH banner, no greeting
        got = _read_all(s, STEALTH_TIMEOUT + 5)
        elapsed = time.monotonic() - started
    assert got == b""
    assert STEALTH_TIMEOUT - 1 <= elapsed < STEALTH_TIMEOUT + 4


def test_ssh_banner_only_after_client_speaks(stealth) -> None:
    _, port = stealth
    with _tls_socket(port) as s:
        s.settimeout(1.5)
        with pytest.raises(socket.timeout):
            s.recv(1)
        s.sendall(b"SS")  # the prefix may arrive in pieces
        s.settimeout(0.5)
        with pytest.raises(socket.timeout):
            s.recv(1)
        s.sendall(b"H-2.0-probe\r\n")
        s.settimeout(5)
        assert s.recv(256).startswith(b"SSH-2.0-")


def test_wraith_connect_through_stealth(keys, certs, stealth, files, tmp_path, procs) -> None:
    server, port = stealth
    client, socks = start_client(keys, tmp_path, port, "--transport", "tls", "--tls-ca", str(certs.ca))
    procs.append(client)
    for name in ("small.bin", "big.bin"):
        r = curl("--socks5-hostname", f"127.0.0.1:{socks}", files.url(name))
        assert sha(r.stdout) == files.hashes[name]
    # a decoy request at the same time does not disturb the session
    assert curl("-k", "-i", f"https://localhost:{port}/").stdout.startswith(b"HTTP/1.1 404")
    r = curl("--socks5-hostname", f"127.0.0.1:{socks}", files.url("small.bin"))
    assert sha(r.stdout) == files.hashes["small.bin"]
    assert "transport=tls" in server.log()


def test_openssh_through_openssl_s_client(keys, certs, stealth, files, tmp_path) -> None:
    """Real-client interop: OpenSSH's ssh with `openssl s_client -quiet` as its ProxyCommand."""
    _, port = stealth
    proxy = (f"openssl s_client -quiet -connect 127.0.0.1:{port} -servername localhost "
             f"-verify_return_error -CAfile {certs.ca}")
    args = ssh_base(keys, port, tmp_path, known_hosts=False) + [
        "-o", f"ProxyCommand={proxy}", "-W", f"127.0.0.1:{files.port}", "root@127.0.0.1"]
    out = subprocess.run(args, input=b"GET /big.bin HTTP/1.0\r\nHost: x\r\n\r\n",
                         capture_output=True, timeout=40)
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), (out.returncode, out.stderr[-2000:])
    assert sha(body) == files.hashes["big.bin"]


@pytest.mark.parametrize("transport", ["tcp", "iroh"])
def test_stealth_needs_tls(keys, tmp_path, transport: str) -> None:
    out = subprocess.run(wraith("serve", "--key", str(keys.host), "--authorized-keys", str(keys.authorized),
                                "--listen", "127.0.0.1:0", "--transport", transport, "--stealth"),
                         capture_output=True, timeout=30)
    assert out.returncode != 0
    err = out.stderr.decode()
    assert err.count("\n") == 1 and "--stealth" in err and "tls" in err, err
    assert "Traceback" not in err and out.stdout == b""


def test_stealth_library_options(keys, certs) -> None:
    """ServeOptions refuses stealth without TLS (library parity of the CLI error)."""
    from wraith_core.errors import UsageError
    from wraith_core.options import ServeOptions

    opts = ServeOptions(key=str(keys.host), authorized_keys=str(keys.authorized), stealth=True)
    with pytest.raises(UsageError):
        opts.check()
    opts = opts.replace(transport="tls", tls_cert=str(certs.cert), tls_key=str(certs.key))
    opts.check()


def _refused(port: int) -> bool:
    """True if the server resets a new connection at once (refused at accept)."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
    except ConnectionResetError:  # the reset came before connect() returned
        return True
    try:
        s.settimeout(3)
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    finally:
        s.close()


def _hold_two_before_ssh(port: int, stealth_on: bool) -> list[socket.socket]:
    """Two connections in the phase before SSH (stealth: handshake done, silent; plain TLS:
    TCP only, no ClientHello), with a limit of two in place: a third is refused."""
    held = [_tls_socket(port) if stealth_on else socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    time.sleep(0.5)  # both accepted
    assert _refused(port)
    return held


@pytest.mark.parametrize("stealth_on", [False, True], ids=["tls", "stealth"])
def test_per_ip_limit_counts_connections_before_ssh(keys, certs, tmp_path, procs, stealth_on: bool) -> None:
    """--max-connections-per-ip holds for connections still in their TLS handshake and,
    in stealth mode, for those that finished it and stay silent: one address cannot
    pile up connections in the phases before SSH."""
    extra = ["--stealth", "--stealth-timeout", "30"] if stealth_on else []
    server, port = start_server(keys, tmp_path, *tls_server_args(certs), "--max-connections-per-ip", "2",
                                "--login-grace-time", "30", *extra)
    procs.append(server)
    held = _hold_two_before_ssh(port, stealth_on)
    wait_for_log(server, "connection refused remote_addr=127.0.0.1 reason=max-connections-per-ip")
    for s in held:
        s.close()
    deadline = time.monotonic() + 10
    while True:  # their places are given back once the server sees them go
        try:
            tls = _tls_socket(port)
            break
        except (ssl.SSLError, ConnectionResetError):
            assert time.monotonic() < deadline, "the limit never freed up"
            time.sleep(0.2)
    try:
        tls.settimeout(10)
        if stealth_on:
            tls.sendall(b"SSH-2.0-probe\r\n")
        assert tls.recv(4) == b"SSH-"
    finally:
        tls.close()
    assert "Traceback" not in server.log()


def _tls_until_fin(port: int, payload: bytes, wait: float) -> tuple[bytes, bool, float]:
    """TLS by memory BIOs, so the client never answers the server's close_notify (as a scanner
    may not): the answer, whether a close_notify came, and the seconds until the TCP FIN."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=wait)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    obj = ctx.wrap_bio(inc, out, server_hostname="localhost")
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            raw.sendall(out.read())
            inc.write(raw.recv(65536))
    obj.write(payload)
    raw.sendall(out.read())
    got, notified, started = b"", False, time.monotonic()
    with raw:
        while data := raw.recv(65536):
            inc.write(data)
            try:
                while chunk := obj.read(65536):
                    got += chunk
                notified = True  # b"": the server's close_notify
            except ssl.SSLZeroReturnError:
                notified = True
            except ssl.SSLWantReadError:
                pass
    return got, notified, time.monotonic() - started


@pytest.mark.parametrize("payload", [b"GET / HTTP/1.0\r\n\r\n", b"", b"GET"], ids=["decoy", "idle", "partial"])
def test_closed_at_once_like_nginx(stealth, payload: bytes) -> None:
    """nginx sends its close_notify and closes TCP at once (none after a partial request's
    timeout); the server never waits (asyncio would, 30 s) for a close_notify in answer."""
    _, port = stealth
    got, notified, elapsed = _tls_until_fin(port, payload, wait=STEALTH_TIMEOUT + 4)
    if payload.endswith(b"\r\n\r\n"):
        _check_nginx_404(got)
        assert elapsed < 2
    else:
        assert got == b"" and STEALTH_TIMEOUT - 1 <= elapsed < STEALTH_TIMEOUT + 2
    assert notified == (payload != b"GET")


def test_decoy_gives_back_its_place_at_once(keys, certs, tmp_path, procs) -> None:
    """A scanner that keeps its socket after the 404 holds no --max-connections-per-ip place."""
    server, port = start_server(keys, tmp_path, *tls_server_args(certs), "--stealth",
                                "--max-connections-per-ip", "1")
    procs.append(server)
    held = _tls_socket(port)
    held.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    held.settimeout(5)
    assert held.recv(12) == b"HTTP/1.1 404"  # kept open, no close_notify sent back
    time.sleep(0.5)
    with _tls_socket(port) as s:
        s.sendall(b"SSH-2.0-probe\r\n")
        s.settimeout(5)
        assert s.recv(4) == b"SSH-"
    held.close()


@pytest.mark.parametrize("request_, want", [
    (b"\r\nHEAD / HTTP/1.0\r\n\r\n", "head"),  # nginx skips empty lines before the request line
    (b"GET /\r\n", "http/0.9"),  # no version: the bare page, at once
    (b"\r\n\r\nGET /index.html\n", "http/0.9"),
])
def test_http_details_like_nginx(stealth, request_: bytes, want: str) -> None:
    _, port = stealth
    with _tls_socket(port) as s:
        started = time.monotonic()
        s.sendall(request_)
        got = _read_all(s, STEALTH_TIMEOUT + 2)
    assert time.monotonic() - started < 2
    if want == "head":
        _check_nginx_404(got, head_only=True)
    else:
        assert got == NGINX_BODY


NGINX_PLAIN_HTTP_BODY = (b"<html>\r\n<head><title>400 The plain HTTP request was sent to HTTPS port</title></head>\r\n"
                         b"<body>\r\n<center><h1>400 Bad Request</h1></center>\r\n"
                         b"<center>The plain HTTP request was sent to HTTPS port</center>\r\n"
                         b"<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")
NGINX_400_BODY = (b"<html>\r\n<head><title>400 Bad Request</title></head>\r\n<body>\r\n"
                  b"<center><h1>400 Bad Request</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")


@pytest.mark.parametrize("request_, body", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", NGINX_PLAIN_HTTP_BODY),
    (b"SSH-2.0-OpenSSH_9.2\r\n", NGINX_400_BODY),  # plain SSH is no request to nginx: never SSH here
])
def test_plain_http_to_the_tls_port_like_nginx(stealth, request_: bytes, body: bytes) -> None:
    """nginx 1.22's answers (bytes compared with a real one) to a client that skips TLS."""
    _, port = stealth
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request_)
        s.settimeout(5)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    head, _, rest = got.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 400 Bad Request" and rest == body
    assert [ln.split(b": ", 1)[0] for ln in lines[1:]] == [b"Server", b"Date", b"Content-Type",
                                                           b"Content-Length", b"Connection"]
    assert lines[1] == b"Server: nginx" and lines[3] == b"Content-Type: text/html"
    assert lines[4] == b"Content-Length: " + str(len(body)).encode() and lines[5] == b"Connection: close"
    email.utils.parsedate_to_datetime(lines[2].split(b": ", 1)[1].decode())


def test_alpn_without_http11_refused_like_nginx(stealth) -> None:
    """nginx >= 1.21.4 refuses an ALPN offer without http/1.1 (alert 120)."""
    _, port = stealth
    for alpn, ok in ((["h2"], False), (["foo", "bar"], False), (["h2", "http/1.1"], True)):
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.set_alpn_protocols(alpn)
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        if ok:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                assert s.selected_alpn_protocol() == "http/1.1"
        else:
            with raw, pytest.raises(ssl.SSLError, match="NO_APPLICATION_PROTOCOL|no application protocol"):
                ctx.wrap_socket(raw, server_hostname="localhost")


def test_tls12_ciphers_like_nginx(stealth) -> None:
    """nginx's default ssl_ciphers HIGH:!aNULL:!MD5 takes TLS 1.2 suites that Python's defaults
    leave out."""
    _, port = stealth
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-ECDSA-AES128-SHA")
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost") as s:
        assert s.cipher()[0] == "ECDHE-ECDSA-AES128-SHA"


def test_part_of_a_tls_record_then_eof_is_closed_at_once(stealth) -> None:
    """A client that sends the start of a TLS record and then shuts its side down is closed
    at its EOF, as nginx does, not after the stealth timeout (its per-IP place comes back)."""
    _, port = stealth
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"\x16\x03\x01")
        s.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        assert _read_all(s, STEALTH_TIMEOUT + 5) == b""
        assert time.monotonic() - started < min(2.0, STEALTH_TIMEOUT - 1)


def test_ssh_after_a_silent_start_has_only_the_rest_of_the_login_grace_time(keys, certs, tmp_path, procs) -> None:
    """The waits before SSH are nginx's (--stealth-timeout), but a stream that turns out
    to be SSH must still log in by accept + --login-grace-time: the silent start, the
    handshake and the peek do not come on top of it."""
    grace, stall = 4.0, 3.0
    server, port = start_server(keys, tmp_path, *tls_server_args(certs), "--stealth", "--stealth-timeout", "30",
                                "--login-grace-time", str(grace))
    procs.append(server)
    handshake, closed = slow_tls_login(port, stall, silent_first=True, wait=grace + 2.0)
    assert handshake >= stall
    assert closed <= grace + 2.0, f"closed {closed:.1f} s after the connect (handshake done at {handshake:.1f} s)"
    wait_for_log(server, "connection closed remote_addr=127.0.0.1")


@pytest.mark.parametrize("stealth_on", [False, True], ids=["tls", "stealth"])
def test_max_startups_counts_connections_before_ssh(keys, certs, tmp_path, procs, stealth_on: bool) -> None:
    """--max-startups counts a TLS connection from its accept: in its handshake and, in
    stealth mode, silent after it. Over the cap a new one is reset before any TLS work,
    and a login gets in once places are free again."""
    extra = ["--stealth", "--stealth-timeout", "30"] if stealth_on else []
    server, port = start_server(keys, tmp_path, *tls_server_args(certs), "--max-startups", "2",
                                "--login-grace-time", "30", *extra)
    procs.append(server)
    held = _hold_two_before_ssh(port, stealth_on)
    wait_for_log(server, "connections dropped reason=max-startups count=1 unauthenticated=2")
    for s in held:
        s.close()
    client, _ = start_client(keys, tmp_path, port, "--transport", "tls", "--tls-ca", str(certs.ca),
                             "--tls-server-name", "localhost")
    procs.append(client)  # (it retries by itself until a place is free)
    assert "Traceback" not in server.log()
