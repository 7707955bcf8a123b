"""Server limits a single client cannot get around: repeated "none" auth requests count as
failures, remote forwards and channels are capped per connection, descriptors near the fd
limit are kept for accepting and logging in, and connections not yet logged in are capped
at accept (OpenSSH's MaxStartups). Real sockets on loopback; servers in process or as
`wraith serve` processes (where the log line's exact form or the process's fd limit matters)."""

from __future__ import annotations

import asyncio
import logging
import re
import resource
import socket
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from asyncssh.packet import String

from helpers import ROOT, Keys, curl, free_port, sha, start_client, start_server, wait_for_log, wraith
from test_hostile import black_hole  # noqa: F401  (a fixture)
from wraith_core.options import ServeOptions
from wraith_core.server_api import WraithServer

pytestmark = pytest.mark.timeout(90)


async def _login(keys: Keys, port: int, **kw: Any) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect("127.0.0.1", port, username="u", client_keys=[str(keys.client)],
                                  known_hosts=None, agent_path=None, config=None, **kw)


def _fail2ban_patterns() -> list[re.Pattern[str]]:
    """The shipped filter's failregex lines (fail2ban's <HOST>: an address)."""
    conf = (ROOT / "examples" / "fail2ban" / "filter.d" / "wraith.conf").read_text()
    block = re.search(r"^failregex\s*=\s*(.+?)^\S", conf, re.M | re.S)
    assert block is not None
    return [re.compile(line.strip().replace("<HOST>", r"(?P<host>[\d.:a-fA-F]+)"))
            for line in block.group(1).splitlines() if line.strip()]


# -- "none" auth requests ------------------------------------------------------------------------

def test_repeated_none_requests_are_rejects_that_count(keys: Keys, tmp_path: Path, procs: list,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A client's first "none" request asks for the method list: free, and no reject line (a
    normal login must not look like a failure to fail2ban). Every further "none" is a reject
    line fail2ban's filter matches and counts toward --max-auth-attempts, as in OpenSSH: a
    client flooding them is disconnected instead of being answered for the whole grace time."""
    from asyncssh.connection import SSHClientConnection

    server, port = start_server(keys, tmp_path, "--max-auth-attempts", "3")
    procs.append(server)

    async def normal_login() -> None:
        conn = await _login(keys, port)
        conn.close()
        await conn.wait_closed()

    asyncio.run(normal_login())
    wait_for_log(server, "auth success remote_addr=127.0.0.1")
    assert "result=reject" not in server.log()

    sent: list[bytes] = []

    def try_next_auth(self: SSHClientConnection, *, next_method: bool = False) -> None:
        if not sent:  # after the server answered asyncssh's own first "none"
            for _ in range(50):
                self.send_packet(50, String("root"), String("ssh-connection"), String("none"))
                sent.append(b"none")

    monkeypatch.setattr(SSHClientConnection, "try_next_auth", try_next_auth)

    async def flood() -> None:
        conn = await asyncssh.connect("127.0.0.1", port, username="root", client_keys=None, known_hosts=None,
                                      agent_path=None, config=None, login_timeout=20)
        conn.close()

    with pytest.raises((asyncssh.Error, ConnectionError, asyncio.TimeoutError)):
        asyncio.run(asyncio.wait_for(flood(), 25))
    assert len(sent) == 50
    wait_for_log(server, "auth limit reached remote_addr=127.0.0.1 attempts=3")
    lines = [ln for ln in server.log().splitlines() if "result=reject" in ln]
    assert len(lines) == 3, lines  # the first "none" free, then three failures, then disconnected
    patterns = _fail2ban_patterns()
    for ln in lines:
        assert re.search(r"INFO auth attempt remote_addr=127\.0\.0\.1 user=root key_fingerprint=none "
                         r"method=none result=reject$", ln), ln
        hits = [m for m in (p.search(ln) for p in patterns) if m]
        assert hits and hits[0].group("host") == "127.0.0.1", ln


# -- per-connection limits on forwards and channels ---------------------------------------------

@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    writers: set[asyncio.StreamWriter] = set()

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        writers.add(w)
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            writers.discard(w)
            w.close()

    srv = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=1024)
    yield srv.sockets[0].getsockname()[1]
    srv.close()
    for w in list(writers):  # handlers end on their own, not cancelled with the loop
        w.transport.abort()
    for _ in range(100):
        if not writers:
            break
        await asyncio.sleep(0.02)


async def _limited_server(keys: Keys, **limits: int) -> tuple[WraithServer, int]:
    port = free_port()
    srv = await WraithServer(ServeOptions(key=str(keys.host), authorized_keys=str(keys.authorized),
                                          listen=f"127.0.0.1:{port}", **limits), use_hub=False).start()
    return srv, port


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_remote_forwards_are_capped_per_connection(keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    """Each tcpip-forward listener is a descriptor: past --max-forwards-per-connection the
    request fails (the session lives on), another connection has its own allowance, and a
    cancelled forward gives its place back. Reaching the limit is logged once, without ports."""
    caplog.set_level(logging.INFO, logger="wraith.server")
    srv, port = await _limited_server(keys, max_forwards_per_connection=3)
    try:
        async with await _login(keys, port) as greedy, await _login(keys, port) as other:
            granted = []
            refused = 0
            for _ in range(6):
                try:
                    granted.append(await greedy.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 9))
                except asyncssh.ChannelListenError:
                    refused += 1
            assert (len(granted), refused) == (3, 3)
            assert all(_listening(g.get_port()) for g in granted)
            theirs = await other.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 9)  # its own allowance
            assert _listening(theirs.get_port())
            granted[0].close()
            await granted[0].wait_closed()
            for _ in range(100):  # the cancel reaches the server, then the place is free again
                try:
                    granted.append(await greedy.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 9))
                    break
                except asyncssh.ChannelListenError:
                    await asyncio.sleep(0.05)
            assert len(granted) == 4
    finally:
        await srv.close()
    limit_lines = [r.getMessage() for r in caplog.records if "max-forwards-per-connection" in r.getMessage()]
    assert limit_lines == ["remote forward refused remote_addr=127.0.0.1 reason=max-forwards-per-connection "
                           "limit=3"]


async def test_channels_are_capped_per_connection(keys: Keys, echo_port: int,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Past --max-channels-per-connection a channel open is refused with "resource
    shortage" (an IP target, a host name, the control channel alike); the session and
    its open channels carry on, another connection is not affected, and a closed channel
    gives its place back. Logged once per connection, never with the destination."""
    caplog.set_level(logging.INFO, logger="wraith.server")
    srv, port = await _limited_server(keys, max_channels_per_connection=4)

    async def try_open(conn: asyncssh.SSHClientConnection, host: str) -> tuple[int, Any]:
        try:
            chan, _ = await conn.create_connection(asyncssh.SSHTCPSession, host, echo_port)
        except asyncssh.ChannelOpenError as exc:
            return exc.code, None
        return 0, chan

    try:
        async with await _login(keys, port) as greedy, await _login(keys, port) as other:
            opened = [await try_open(greedy, "127.0.0.1") for _ in range(4)]
            assert [code for code, _ in opened] == [0] * 4
            for host in ("127.0.0.1", "localhost", "wraith-control"):
                code, _ = await try_open(greedy, host)
                assert code == asyncssh.OPEN_RESOURCE_SHORTAGE, host
            assert (await try_open(other, "127.0.0.1"))[0] == 0
            chans = [chan for _, chan in opened]
            chans[0].write(b"still here")  # the open channels work on
            chans[0].close()
            for _ in range(100):  # once the close is done on both sides, there is room again
                code, chan = await try_open(greedy, "localhost")
                if code == 0:
                    break
                await asyncio.sleep(0.05)
            assert code == 0
            for c in chans[1:] + [chan]:
                c.close()
    finally:
        await srv.close()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert text.count("channel limit reached remote_addr=127.0.0.1 limit=4") == 1
    assert str(echo_port) not in text and "localhost" not in text


@pytest.mark.parametrize("target", ["127.0.0.1", "localhost"])
async def test_descriptors_near_the_fd_limit_are_kept_for_logins(keys: Keys, tmp_path: Path, procs: list,
                                                                 echo_port: int, target: str) -> None:
    """One login opening channels and forwards until the server's descriptors run out would
    lock everybody else out: past the reserve at the top of RLIMIT_NOFILE new channels and
    forwards are refused ("resource shortage"), so accepting and logging in still work. Also
    for a burst of opens to a host name, whose sockets are made later, in their dials."""
    server, port = await asyncio.to_thread(start_server, keys, tmp_path)
    procs.append(server)
    resource.prlimit(server.p.pid, resource.RLIMIT_NOFILE, (256, 256))  # reserve: the top 64
    async with await _login(keys, port) as greedy:
        async def try_open(host: str = "127.0.0.1") -> int:
            try:
                await greedy.create_connection(asyncssh.SSHTCPSession, host, echo_port)
            except asyncssh.ChannelOpenError as exc:
                return exc.code
            return 0

        codes = Counter(await asyncio.gather(*[try_open(target) for _ in range(300)]))
        # at most 256 - 64 descriptors in use by then: well over 300 - 192 opens refused
        assert codes[asyncssh.OPEN_RESOURCE_SHORTAGE] >= 300 - 192, codes
        assert set(codes) == {0, asyncssh.OPEN_RESOURCE_SHORTAGE}, codes
        if target == "127.0.0.1":  # (dials by name count before their sockets exist: some room is left)
            assert await try_open("localhost") == asyncssh.OPEN_RESOURCE_SHORTAGE  # (checked before its dial)
            forwards = 0
            for _ in range(20):
                try:
                    await greedy.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 9)
                    forwards += 1
                except asyncssh.ChannelListenError:
                    pass
            assert forwards == 0
        for _ in range(3):  # others can still log in while the greedy one holds all it got
            async with await _login(keys, port, login_timeout=20) as fresh:
                assert fresh.get_extra_info("username") == "u"
    wait_for_log(server, "file descriptors running low (limit 256)")
    assert "Traceback" not in server.log()


# -- connections not yet logged in (MaxStartups) ------------------------------------------------

def _closed_before_any_byte(port: int) -> bool:
    """A new connection is closed by the server without a byte (dropped at accept)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.settimeout(10)
        try:
            return s.recv(64) == b""
        except ConnectionResetError:
            return True


async def test_connections_not_logged_in_are_capped_at_accept(keys: Keys, tmp_path: Path, procs: list,
                                                              files) -> None:
    """--max-startups N: past N connections that have not logged in, a new one is closed at
    accept, before any SSH work; logged-in connections hold no place, so users already in
    carry on and more can log in as places free up. The drops make one line per 10 s at
    most, with no address (a flood must not flood the log, nor get a dropped user banned)."""
    server, port = await asyncio.to_thread(start_server, keys, tmp_path, "--max-startups", "3",
                                           "--login-grace-time", "60")
    procs.append(server)
    client, socks = await asyncio.to_thread(start_client, keys, tmp_path, port)  # logged in: no place held
    procs.append(client)
    sessions = [await _login(keys, port) for _ in range(4)]  # more than N, one after the other: all in
    held = []
    for _ in range(3):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"SSH-2.0-idle\r\n")
        assert (await asyncio.wait_for(r.read(8), 10)).startswith(b"SSH-2.0")  # admitted: the server speaks
        held.append(w)
    for _ in range(5):
        assert await asyncio.to_thread(_closed_before_any_byte, port)
    r = await asyncio.to_thread(curl, "--socks5-hostname", f"127.0.0.1:{socks}", files.url("small.bin"))
    assert sha(r.stdout) == files.hashes["small.bin"]  # the user already in is not affected
    drops = [ln for ln in server.log().splitlines() if "connections dropped" in ln]
    assert len(drops) == 1 and drops[0].endswith("WARNING connections dropped reason=max-startups count=1 "
                                                  "unauthenticated=3"), drops
    assert not any(p.search(drops[0]) for p in _fail2ban_patterns())  # a dropped client did nothing wrong
    for w in held:
        w.close()
    for _ in range(100):  # places come back once the server has seen the closes
        try:
            sessions.append(await _login(keys, port))
            break
        except (OSError, asyncssh.Error):
            await asyncio.sleep(0.1)
    assert len(sessions) == 5, "no login after the held connections closed"
    for conn in sessions:
        conn.close()
    assert "reason=max-startups" not in server.log().replace("connections dropped reason=max-startups", "")


async def test_random_early_drop_between_start_and_full(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """START:RATE:FULL as OpenSSH: below START never dropped; from START a drop with
    probability RATE %, rising linearly to 100 % at FULL; FULL and over always."""
    import wraith_core.ssh.server as server_mod

    srv, _ = await _limited_server(keys)
    runner = srv.runner
    try:
        assert ServeOptions(max_startups="10:30:100").startups() == (10, 30, 100)
        assert ServeOptions(max_startups=5).startups() == (5, 100, 5)
        assert ServeOptions(max_startups="0").startups() is None
        for luck, admitted in ((99, 100), (0, 10)):  # the best luck: only FULL stops it; the worst: START
            monkeypatch.setattr(server_mod.secrets, "randbelow", lambda n, luck=luck: luck)
            runner.startups = 0
            while runner.take_startup():
                assert runner.startups <= 100
            assert runner.startups == admitted
        draws: list[int] = []
        monkeypatch.setattr(server_mod.secrets, "randbelow", lambda n: draws.append(n) or 64)
        runner.startups = 55  # halfway: p = 30 + 70 * 45 // 90 = 65 %; a draw of 64 is below it
        assert not runner.take_startup() and draws == [100]
        runner.startups = 54  # p = 30 + 70 * 44 // 90 = 64 %
        assert runner.take_startup()
        assert runner.take_startup(force=True)  # admitted earlier (before a TLS handshake)
        runner._startup_limits = ServeOptions(max_startups=5).startups()  # N: 5:100:5, no luck involved
        runner.startups = 0
        assert [runner.take_startup() for _ in range(7)] == [True] * 5 + [False] * 2
    finally:
        runner.startups = 0
        await srv.close()


def test_max_startups_and_limits_flags_are_checked(keys: Keys) -> None:
    from wraith_core.errors import UsageError

    base = dict(key=str(keys.host), authorized_keys=str(keys.authorized))
    for bad in ("10:30", "a:b:c", "100:30:10", "10:0:100", "10:101:100", "-1", "", "\u00b2", "\u0663",
                "1:30:\u00b9\u2070"):  # (digits to str.isdigit(), not to int() or not ASCII)
        with pytest.raises(UsageError, match="--max-startups"):
            ServeOptions(**base, max_startups=bad).check()  # type: ignore[arg-type]
    for name in ("max_forwards_per_connection", "max_channels_per_connection"):
        with pytest.raises(UsageError, match="--" + name.replace("_", "-")):
            ServeOptions(**base, **{name: -1}).check()  # type: ignore[arg-type]
    ServeOptions(**base, max_startups="0", max_forwards_per_connection=0,  # type: ignore[arg-type]
                 max_channels_per_connection=0).check()


@pytest.mark.parametrize("flag,value", [("--max-startups", "10:30"), ("--max-startups", "100:30:10"),
                                        ("--max-forwards-per-connection", "-1"),
                                        ("--max-channels-per-connection", "many")])
def test_bad_limit_flags_are_one_line_errors(keys: Keys, flag: str, value: str) -> None:
    out = subprocess.run(wraith("serve", "--key", str(keys.host), "--authorized-keys", str(keys.authorized),
                                "--listen", "127.0.0.1:0", flag, value), capture_output=True, timeout=60)
    err = out.stderr.decode()
    assert out.returncode != 0, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and flag in err, err


async def test_a_silent_stealth_client_holds_no_startup_place_past_the_grace_time(keys: Keys, tmp_path) -> None:
    """Stealth holds a silent client for nginx's timeouts (here 2 s before the TLS hello, 2
    more after it), longer than the login grace time (1 s). Past that time the client can
    no longer log in, so its --max-startups place is given back then, not when the decoy is
    over: one such client per grace time must not keep everyone else out."""
    from transport_helpers import Certs

    certs = Certs.make(tmp_path / "certs")
    port = free_port()
    srv = await WraithServer(ServeOptions(key=str(keys.host), authorized_keys=str(keys.authorized),
                                          listen=f"127.0.0.1:{port}", transport="tls", tls_cert=str(certs.cert),
                                          tls_key=str(certs.key), stealth=True, stealth_timeout=2.0,
                                          login_grace_time=1.0, max_startups="1"), use_hub=False).start()
    runner = srv.runner
    try:
        silent = socket.create_connection(("127.0.0.1", port))
        for _ in range(50):
            if runner.startups == 1:
                break
            await asyncio.sleep(0.02)
        assert runner.startups == 1  # the silent client has the only place
        await asyncio.sleep(1.3)  # past the login grace time, within the stealth timeout
        silent.setblocking(False)
        with pytest.raises(BlockingIOError):
            silent.recv(1)  # still held by the decoy: nothing said, not closed
        assert runner.startups == 0
        assert (await asyncio.to_thread(_ssh_greeting_over_tls, port)).startswith(b"SSH-2.0-")  # another gets in
        silent.close()
        await asyncio.sleep(0.1)
        assert runner.startups == 0  # and the silent client's end gives nothing back twice
    finally:
        await srv.close()


def _ssh_greeting_over_tls(port: int) -> bytes:
    from test_transport_stealth import _tls_socket

    with _tls_socket(port) as s:
        s.sendall(b"SSH-2.0-probe\r\n")
        return s.recv(256)


async def test_connects_in_flight_by_name_count_once_toward_the_channel_limit(keys: Keys, black_hole: int) -> None:
    """An open to a host name has its channel in the connection's table while it connects:
    it counts once toward --max-channels-per-connection, as an open to an IP address does
    (it was counted twice, so half as many could wait for a slow target)."""
    bport = black_hole  # connects to it hang
    port = free_port()
    srv = await WraithServer(ServeOptions(key=str(keys.host), authorized_keys=str(keys.authorized),
                                          listen=f"127.0.0.1:{port}", max_channels_per_connection=4,
                                          connect_timeout=2), use_hub=False).start()
    try:
        for host in ("127.0.0.1", "localhost"):
            async with await _login(keys, port) as conn:
                async def one() -> int:
                    try:
                        await conn.create_connection(asyncssh.SSHTCPSession, host, bport)
                    except asyncssh.ChannelOpenError as exc:
                        return exc.code
                    return 0

                tasks = []
                for _ in range(5):
                    tasks.append(asyncio.create_task(one()))
                    await asyncio.sleep(0.1)
                codes = await asyncio.wait_for(asyncio.gather(*tasks), 15)
                assert codes == [asyncssh.OPEN_CONNECT_FAILED] * 4 + [asyncssh.OPEN_RESOURCE_SHORTAGE], (host, codes)
    finally:
        await srv.close()
