"""Security: key-only auth, host key pinning, reserved destinations never dialed, no destinations in logs."""

from __future__ import annotations

import asyncio
import re
import struct

import asyncssh
import pytest

from helpers import Keys, Proc, curl, free_port, sha, socks_connect, start_client, start_server, wait_for_log, wraith
from openssh import run, ssh_base


def test_password_and_kbdint_refused(keys: Keys, tmp_path, procs) -> None:
    server, port = start_server(keys, tmp_path)
    procs.append(server)
    out = run(ssh_base(keys, port, tmp_path)[:-0 or None] + [
        "-o", "PreferredAuthentications=password,keyboard-interactive", "-o", "PubkeyAuthentication=no",
        "root@127.0.0.1", "true"], timeout=20)
    assert out.returncode == 255
    assert b"Permission denied (publickey)" in out.stderr  # the server offers public keys only

    async def with_password() -> None:
        with pytest.raises(asyncssh.PermissionDenied):
            await asyncssh.connect("127.0.0.1", port, username="root", password="root", known_hosts=None,
                                   client_keys=None, agent_path=None, config=None,
                                   preferred_auth="password,keyboard-interactive")

    asyncio.run(with_password())


def test_password_tries_that_ignore_the_method_list_are_logged_and_counted(
        keys: Keys, tmp_path, procs, monkeypatch) -> None:
    """A brute-forcer does not read the offered method list: its password and
    keyboard-interactive requests are reject lines for fail2ban and count toward
    --max-auth-attempts like bad keys."""
    from asyncssh.connection import SSHClientConnection
    from asyncssh.packet import Boolean, String

    server, port = start_server(keys, tmp_path, "--max-auth-attempts", "2")
    procs.append(server)
    sent = []

    def try_next_auth(self: SSHClientConnection, *, next_method: bool = False) -> None:
        if not sent:  # after the server answered "none" with "publickey" only
            for method, rest in [(b"password", Boolean(False) + String("hunter2-secret")),
                                 (b"keyboard-interactive", String("") + String(""))]:
                self.send_packet(50, String("root"), String("ssh-connection"), String(method), rest)
                sent.append(method)
        # then no method left: asyncssh's client gives up (or the server disconnects first)

    monkeypatch.setattr(SSHClientConnection, "try_next_auth", try_next_auth)

    async def brute() -> None:
        conn = await asyncssh.connect("127.0.0.1", port, username="root", client_keys=None, known_hosts=None,
                                      agent_path=None, config=None, login_timeout=10)
        conn.close()

    with pytest.raises((asyncssh.Error, ConnectionError, asyncio.TimeoutError)):
        asyncio.run(asyncio.wait_for(brute(), 15))
    assert len(sent) == 2
    wait_for_log(server, "auth limit reached remote_addr=127.0.0.1 attempts=2")
    lines = [ln for ln in server.log().splitlines() if "result=reject" in ln]
    assert [re.search(r"method=(\S+)", ln).group(1) for ln in lines] == [  # type: ignore[union-attr]
        "password", "keyboard-interactive"]
    for ln in lines:
        assert re.search(r"INFO auth attempt remote_addr=127\.0\.0\.1 user=root key_fingerprint=none "
                         r"method=\S+ result=reject$", ln), ln
    assert "hunter2" not in server.log()  # the password itself is never logged


def test_unknown_key_refused_and_logged(keys: Keys, tmp_path, procs) -> None:
    from wraith_core.keys import fingerprint, generate_ed25519, load_private_key

    server, port = start_server(keys, tmp_path)
    procs.append(server)
    stranger, _ = generate_ed25519(tmp_path / "stranger", "stranger")
    client = Proc(wraith("connect", "--server", f"127.0.0.1:{port}", "--identity", str(stranger),
                         "--accept-any-host-key", "--socks5", "127.0.0.1:0"), tmp_path / "c.log",
                  ready="socks5 listening")
    procs.append(client)
    wait_for_log(client, "authentication failed")
    fp = fingerprint(load_private_key(str(stranger)))
    wait_for_log(server, f"key_fingerprint={fp} result=reject")
    line = [ln for ln in server.log().splitlines() if "result=reject" in ln][0]
    assert re.search(r"INFO auth attempt remote_addr=127\.0\.0\.1 user=\S+ key_fingerprint=SHA256:\S+ result=reject$",
                     line), line
    assert "session up" not in client.log()


def test_fail2ban_filter_matches_reject_line(keys: Keys, tmp_path, procs) -> None:
    """The shipped fail2ban filter's failregex matches our reject line (fail2ban's <HOST> = an address)."""
    from pathlib import Path

    conf = (Path(__file__).parent.parent / "examples" / "fail2ban" / "filter.d" / "wraith.conf").read_text()
    regex = re.search(r"^failregex\s*=\s*(.+)$", conf, re.M).group(1).strip()  # type: ignore[union-attr]
    rx = re.compile(regex.replace("<HOST>", r"(?P<host>[\d.:a-fA-F]+)"))
    line = ("2026-11-24T10:00:00 INFO auth attempt remote_addr=203.0.113.50 user=root "
            "key_fingerprint=SHA256:abc result=reject")
    m = rx.search(line)
    assert m and m.group("host") == "203.0.113.50"
    assert not rx.search(line.replace("reject", "accept"))
    password = line.replace("key_fingerprint=SHA256:abc", "key_fingerprint=none method=password")
    m = rx.search(password)
    assert m and m.group("host") == "203.0.113.50"


def test_wrong_host_key_pin_refused(keys: Keys, tmp_path, procs) -> None:
    from wraith_core.keys import generate_ed25519

    server, port = start_server(keys, tmp_path)
    procs.append(server)
    _, other_pub = generate_ed25519(tmp_path / "other", "other")
    for pin in (str(other_pub), "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"):
        c = Proc(wraith("connect", "--server", f"127.0.0.1:{port}", "--identity", str(keys.client),
                        "--host-key", pin, "--socks5", "127.0.0.1:0"), tmp_path / "c.log", ready="socks5 listening")
        procs.append(c)
        wait_for_log(c, "host key verification failed")
        assert "session up" not in c.log()
        c.stop()
    # the right fingerprint works
    from wraith_core.keys import fingerprint, load_public_key

    fp = fingerprint(load_public_key(str(keys.host_pub)))
    c = Proc(wraith("connect", "--server", f"127.0.0.1:{port}", "--identity", str(keys.client),
                    "--host-key", fp, "--socks5", "127.0.0.1:0"), tmp_path / "ok.log", ready="socks5 listening")
    procs.append(c)
    wait_for_log(c, "session up")


def test_no_host_key_verification_is_refused(keys: Keys, tmp_path) -> None:
    out = run(wraith("connect", "--server", "127.0.0.1:1", "--identity", str(keys.client)))
    assert out.returncode != 0
    err = out.stderr.decode()
    assert "host key" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


class _RecordingSocks:
    """A SOCKS5 proxy on loopback that records every CONNECT destination (and then connects)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            head = await r.readexactly(2)
            await r.readexactly(head[1])
            w.write(b"\x05\x00")
            ver, cmd, _, atyp = await r.readexactly(4)
            if atyp == 3:
                host = (await r.readexactly((await r.readexactly(1))[0])).decode()
            elif atyp == 1:
                host = ".".join(str(b) for b in await r.readexactly(4))
            else:
                await r.readexactly(16)
                host = "::1"
            port = struct.unpack(">H", await r.readexactly(2))[0]
            self.seen.append((host, port))
            tr, tw = await asyncio.open_connection(host, port)
            w.write(b"\x05\x00\x00\x01" + bytes(6))

            async def pump(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
                while data := await a.read(65536):
                    b.write(data)
                    await b.drain()
                b.close()

            await asyncio.gather(pump(r, tw), pump(tr, w), return_exceptions=True)
        except (OSError, asyncio.IncompleteReadError):
            w.close()


def test_reserved_destinations_never_dialed(keys: Keys, tmp_path, procs, files) -> None:
    """Outbound dials go through a recording proxy: wraith-* names never reach it, real targets do."""
    rec = _RecordingSocks()

    async def main() -> None:
        srv = await asyncio.start_server(rec.handle, "127.0.0.1", 0)
        pport = srv.sockets[0].getsockname()[1]
        server, sport = await asyncio.to_thread(start_server, keys, tmp_path, "--proxy", f"socks5://127.0.0.1:{pport}")
        procs.append(server)
        client, socks = await asyncio.to_thread(start_client, keys, tmp_path, sport)
        procs.append(client)
        from python_socks import ProxyError

        for host, port in (("wraith-control", 0), ("wraith-control", 1), ("wraith-x", 80), ("WRAITH-Y", 443)):
            with pytest.raises(ProxyError):
                await socks_connect(socks, host, port)
        reader, writer = await socks_connect(socks, "127.0.0.1", files.port)
        writer.write(b"GET /small.bin HTTP/1.0\r\n\r\n")
        body = (await asyncio.wait_for(reader.read(), 10)).split(b"\r\n\r\n", 1)[1]
        assert sha(body) == files.hashes["small.bin"]
        # a raw SSH client may spell the name so that the resolver (IDNA) or a proxy would
        # still look up wraith-*: fullwidth letters, zero-width and soft-hyphen characters
        async with asyncssh.connect("127.0.0.1", sport, username="root", client_keys=[str(keys.client)],
                                    known_hosts=None, agent_path=None, config=None) as conn:
            for host in ("\uff57\uff52\uff41\uff49\uff54\uff48-control", "w\u200braith-control",
                         "wr\u00adaith-x", "WRAITH\u200d-y", "\uff37raith-x",
                         # resolver escapes (glibc reads \DDD and \X), and what a proxy may split on
                         "\\119raith-control", "\\wraith-control", "wraith\\-control", "w\\114aith-secret",
                         "[wraith-control]", "x@wraith-control", "wraith-control%00", "wraith-control\x00"):
                with pytest.raises(asyncssh.ChannelOpenError) as info:
                    await conn.open_connection(host, 80)
                assert info.value.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, host
            # ports past 65535 would wrap to port % 65536 in the dial: refused
            for port in (files.port + 65536, 0):
                with pytest.raises(asyncssh.ChannelOpenError) as info:
                    await conn.open_connection("127.0.0.1", port)
                assert info.value.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, port
        srv.close()

    asyncio.run(main())
    assert rec.seen == [("127.0.0.1", files.port)]


def test_no_destinations_in_logs_even_at_debug(keys: Keys, tmp_path, procs, files) -> None:
    server, sport = start_server(keys, tmp_path, "--log-level", "debug")
    procs.append(server)
    fport = free_port()
    client, socks = start_client(keys, tmp_path, sport, "--log-level", "debug",
                                 "--forward", f"{fport}:localhost:{files.port}")
    procs.append(client)
    marker_host = "localhost"
    for args in (("--socks5-hostname", f"127.0.0.1:{socks}", files.url("big.bin", marker_host)),
                 ("--socks5", f"127.0.0.1:{socks}", files.url("small.bin")),
                 (f"http://127.0.0.1:{fport}/small.bin",),
                 ("--socks5-hostname", f"127.0.0.1:{socks}", f"http://no-such-name.invalid:{files.port}/")):
        curl(*args)
    client.stop()
    server.stop()
    for log in (server.log(), client.log()):
        assert log.strip()
        assert str(files.port) not in log
        assert marker_host not in log and "no-such-name" not in log
        assert str(8 * 1024 * 1024) not in log  # no byte counts


async def test_no_destinations_in_logs_when_used_as_a_library(keys: Keys, files, caplog) -> None:
    """A program that runs serve() and open_stream() with its own logging at DEBUG: asyncssh's
    records (which name destinations) are never created, whatever the program set up."""
    import logging

    import wraith_core
    from wraith_core.options import ConnectOptions, ServeOptions

    caplog.set_level(logging.DEBUG)  # the root logger and everything under it
    logging.getLogger("asyncssh").setLevel(logging.NOTSET)
    server = await wraith_core.serve(ServeOptions(key=str(keys.host), authorized_keys=str(keys.authorized),
                                                  listen="127.0.0.1:0"))
    try:
        port = int(server.addresses()[0].rsplit(":", 1)[1])
        opts = ConnectOptions(server=f"127.0.0.1:{port}", identity=str(keys.client), host_key=str(keys.host_pub))
        stream = await wraith_core.open_stream(opts, f"localhost:{files.port}")
        stream.write(b"GET /small.bin HTTP/1.0\r\n\r\n")
        body = (await asyncio.wait_for(stream.read(), 10)).split(b"\r\n\r\n", 1)[1]
        assert sha(body) == files.hashes["small.bin"]
        with pytest.raises(Exception):
            await wraith_core.open_stream(opts, f"no-such-name.invalid:{files.port}")
    finally:
        await server.close()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert caplog.records, "nothing logged at all: the test would not see a leak"
    assert "localhost" not in text and "no-such-name" not in text and str(files.port) not in text, text


async def test_a_disconnect_reason_cannot_forge_log_lines(keys: Keys, tmp_path, procs) -> None:
    """The server's DISCONNECT reason (which even a machine in the middle can send, before
    the key exchange) goes into the client's log with its line breaks and escapes shown,
    not acted on: it cannot forge a 'session up' line or clear the terminal."""

    async def hostile(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-hostile\r\n")
        await writer.drain()
        await reader.readline()  # the client's banner
        reason = b"bye\n2026-01-01T00:00:00 INFO session up transport=tcp\x1b[2J"
        body = bytes([1]) + struct.pack(">I", 11) + struct.pack(">I", len(reason)) + reason + struct.pack(">I", 0)
        pad = 8 - (len(body) + 5) % 8 + 8
        writer.write(struct.pack(">IB", len(body) + pad + 1, pad) + body + bytes(pad))
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(hostile, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    client, _ = await asyncio.to_thread(start_client, keys, tmp_path, port, wait_up=False)
    procs.append(client)
    await asyncio.to_thread(wait_for_log, client, "session failed")
    srv.close()
    log = client.log()
    assert "bye\\x0a2026" in log and "\x1b" not in log
    assert not any(line.startswith("2026-01-01") for line in log.splitlines()), log
