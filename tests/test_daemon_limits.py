"""What clients can make the daemon hold: large messages share one budget, an unopened
WebSocket gets the control limit, WebSockets and waiting incoming streams are capped, a
huge key file is refused unread. Real daemon processes (memory measured), or an
in-process daemon where a limit is lowered to test it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import wraith_client
from websockets.exceptions import ConnectionClosed, InvalidStatus

from helpers import Keys
from test_daemon_support import raw_ws, rss_kib, start_env, wire_opts

MIB = 1024 * 1024
BIG = 16 * MIB - 64  # a data message as large as the protocol allows


@pytest.fixture
def env(keys: Keys, tmp_path, procs):
    return start_env(keys, tmp_path, procs)


async def _raw_stream(env, line: bytes) -> Any:
    ws = await raw_ws(env["info"])
    await ws.send(msgpack.packb({"type": "open", "kind": "connect", "options": wire_opts(
        env["keys"], env["sport"], f"127.0.0.1:{env['tport']}")}, use_bin_type=True))
    answer = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 30))
    assert answer["type"] == "opened", answer
    await ws.send(wraith_client._ipc.encode_data(line))
    return ws


async def test_stalled_streams_of_large_messages_stay_within_one_budget(env) -> None:
    """16 MiB data messages into targets that do not read: the daemon took three per stream
    (48 MiB each: 1 GiB for 20 streams). Now messages over 1 MiB share a 64 MiB budget;
    beyond it their WebSockets wait, and ordinary streams keep going."""
    pid = env["daemon"].p.pid
    base = rss_kib(pid)
    big = wraith_client._ipc.encode_data(bytes(BIG))
    streams = [await _raw_stream(env, b"SINK 1\n") for _ in range(4)]

    async def push(ws: Any) -> None:
        for _ in range(4):
            await ws.send(big)

    pushers = [asyncio.create_task(push(ws)) for ws in streams]
    await asyncio.sleep(4)  # time for the daemon to take what it takes (a bounded wait)
    grown_mib = (rss_kib(pid) - base) // 1024
    assert not all(p.done() for p in pushers), "nothing pushed back"
    # meanwhile, a stream of ordinary messages is not held up by the budget
    s = await wraith_client.connect(**env["opts"], target=f"127.0.0.1:{env['tport']}")
    s.write(b"ECHO\n" + bytes(3 * MIB))
    s.write_eof()
    assert len(await asyncio.wait_for(s.read(), 30)) == 3 * MIB
    for p in pushers:
        p.cancel()
    for ws in streams:
        ws.transport.abort()
    assert grown_mib < 128, f"4 stalled streams of 16 MiB messages: the daemon grew by {grown_mib} MiB"


async def test_large_messages_pass_intact_and_give_their_budget_back(env) -> None:
    """More 16 MiB messages than the budget holds, through one stream into a reading target:
    each gives its room back once it is in the channel, and the bytes arrive intact.
    Half of them come in two 8 MiB fragments (reserved per frame, given back per message)."""
    blob = os.urandom(BIG)
    ws = await _raw_stream(env, b"HASH\n")
    msg = wraith_client._ipc.encode_data(blob)
    half = len(msg) // 2
    for i in range(6):
        await asyncio.wait_for(ws.send(msg if i % 2 else [msg[:half], msg[half:]]), 60)
    await ws.send(msgpack.packb({"type": "eof"}))
    answer = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 60))
    assert answer["data"].decode() == hashlib.sha256(blob * 6).hexdigest()
    await ws.close()


async def test_an_unfinished_first_frame_is_refused_from_its_header(env) -> None:
    """A WebSocket that starts a 16 MiB first frame and never finishes it: the daemon read
    it all (16 MiB each, 528 MiB for 30) and waited 10 s for the rest. Before a stream is
    open a message is at most 1 MiB: refused from the header, close 1009."""
    pid = env["daemon"].p.pid
    base = rss_kib(pid)
    conns = []
    for _ in range(6):
        ws = await raw_ws(env["info"])
        head = struct.pack("!BBQ", 0x82, 0x80 | 127, 16 * MIB - 1) + b"\0\0\0\0"
        ws.transport.write(head + bytes(4 * MIB))
        conns.append(ws)
    for ws in conns:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert (rss_kib(pid) - base) // 1024 < 16


async def test_an_open_over_the_limit_is_eproto_for_the_binding(env) -> None:
    """The daemon refuses an over-large open from its header (close 1009, no error message):
    the binding says EPROTO, as for any message the daemon cannot take — not EDAEMON."""
    with pytest.raises(wraith_client.WraithError) as err:
        await wraith_client.connect(**dict(env["opts"], identity=b"k" * (2 * MIB)))
    assert err.value.code == "EPROTO", err.value


def test_a_huge_key_file_is_refused_unread(tmp_path: Path) -> None:
    """The pool compares key files by their contents: it read a 1 GiB identity whole, on the
    event loop (4.7 s frozen, 1 GiB of memory) before keys.py refused it. Now its size says."""
    from wraith_core import ConnectOptions
    from wraith_core.daemon.pool import pool_key
    from wraith_core.errors import WraithError

    huge = tmp_path / "huge_identity"
    with open(huge, "wb") as f:
        f.truncate(1 << 30)  # sparse: costs nothing until read
    opts = ConnectOptions(server="127.0.0.1:1", identity=str(huge), host_key="SHA256:" + "A" * 43, socks5=None)
    with pytest.raises(WraithError) as err:
        pool_key(opts)
    assert err.value.code == "EKEY" and "larger than 16 MiB" in str(err.value)
    small = tmp_path / "small"
    small.write_bytes(b"key")
    same = tmp_path / "same"
    same.write_bytes(b"key")
    # still by contents: two files with the same bytes are the same key
    assert pool_key(dataclasses.replace(opts, identity=str(small))) == \
        pool_key(dataclasses.replace(opts, identity=str(same)))


# -- limits lowered in an in-process daemon ------------------------------------------------


@contextlib.asynccontextmanager
async def _daemon_in_process(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    from wraith_core.daemon.main import Daemon, DaemonConfig

    daemon = Daemon(DaemonConfig(dir=str(tmp_path / "inproc"), events="none", linger=0.5))
    info = await daemon.start()
    try:
        yield info
    finally:
        await daemon.close()


async def test_websockets_beyond_the_cap_are_refused(tmp_path: Path, monkeypatch) -> None:
    from wraith_core.daemon import ws as daemon_ws

    monkeypatch.setattr(daemon_ws, "MAX_CONNECTIONS", 3)
    async with _daemon_in_process(tmp_path) as info:
        held = [await raw_ws(info) for _ in range(3)]
        with pytest.raises(InvalidStatus) as refused:
            await raw_ws(info)
        assert refused.value.response.status_code == 503
        await held.pop().close()
        await asyncio.sleep(0.1)  # its handler ends
        held.append(await raw_ws(info))  # room again
        for ws in held:
            await ws.close()


async def _msg(ws: Any) -> dict[str, Any]:
    return msgpack.unpackb(await asyncio.wait_for(ws.recv(), 20), raw=False)


async def test_a_serve_control_holds_a_bounded_number_of_waiting_streams(
        tmp_path: Path, keys: Keys, monkeypatch) -> None:
    """Incoming streams nobody accepts are refused beyond a cap (each holds a window of
    bytes, and its announcement waited in an unbounded queue); accepted ones no longer
    count (the control's set of ids only ever grew)."""
    from wraith_core.daemon import ws as daemon_ws

    monkeypatch.setattr(daemon_ws, "MAX_PENDING_INCOMING", 2)
    async with _daemon_in_process(tmp_path) as info:
        control = await raw_ws(info)
        await control.send(msgpack.packb({"type": "open", "kind": "serve", "options": {
            "hostKey": str(keys.host), "authorizedKeys": str(keys.authorized), "listen": "127.0.0.1:0"}}))
        address = (await _msg(control))["addresses"][0]
        opts = {"server": address, "identity": str(keys.client), "host_key": str(keys.host_pub),
                "daemon": info["ws"]}
        waiting = [await wraith_client.connect(**opts) for _ in range(2)]
        ids = [(await _msg(control))["id"] for _ in waiting]
        with pytest.raises(wraith_client.WraithError):  # the third: refused (a reset)
            extra = await wraith_client.connect(**opts)
            await asyncio.wait_for(extra.read(), 20)
        for in_id, s in zip(ids, waiting):
            acc = await raw_ws(info)
            await acc.send(msgpack.packb({"type": "open", "kind": "accept", "id": in_id}))
            assert (await _msg(acc))["type"] == "opened"
            s.write(b"hi")
            await s.drain()
            assert (await _msg(acc))["data"] == b"hi"
            await acc.close()
            s.abort()
        later = await wraith_client.connect(**opts)  # the accepted ones left room
        assert (await _msg(control))["type"] == "incoming"
        later.abort()
        await control.close()


async def test_websockets_holding_room_do_not_wait_for_each_other_for_good(
        tmp_path: Path, keys: Keys, procs, monkeypatch) -> None:
    """Seven WebSockets each send the first 9 MiB fragment of a 15 MiB message (63 of the
    64 MiB budget), then want 6 MiB more: each held room while waiting for the others, so
    none ever finished, every other large message queued behind them, and their clients
    going away went unnoticed (not read). A WebSocket holding room that waits HELD_WAIT
    for more is closed: its room comes back and others go on."""
    from test_daemon_support import start_target

    from helpers import start_server
    from wraith_core.daemon import inflow

    monkeypatch.setattr(inflow, "HELD_WAIT", 1.0)
    server, sport = start_server(keys, tmp_path)
    procs.append(server)
    target, tport = start_target(tmp_path)
    procs.append(target)
    async with _daemon_in_process(tmp_path) as info:
        env = {"info": info, "keys": keys, "sport": sport, "tport": tport}
        msg = wraith_client._ipc.encode_data(bytes(15 * MIB))
        first, second = msg[:9 * MIB], msg[9 * MIB:]
        go = asyncio.Event()

        async def fragments() -> AsyncIterator[bytes]:
            yield first
            await go.wait()
            yield second

        stuck = [await _raw_stream(env, b"HASH\n") for _ in range(7)]
        senders = [asyncio.create_task(ws.send(fragments())) for ws in stuck]
        await asyncio.sleep(1.0)  # the first fragments are in
        go.set()
        other = await _raw_stream(env, b"HASH\n")
        blob = os.urandom(2 * MIB)  # above the free size: needs room in the budget
        await asyncio.wait_for(other.send(wraith_client._ipc.encode_data(blob)), 20)
        await other.send(msgpack.packb({"type": "eof"}))
        answer = msgpack.unpackb(await asyncio.wait_for(other.recv(), 20))
        assert answer["data"].decode() == hashlib.sha256(blob).hexdigest()
        for ws, sender in zip(stuck, senders):  # the daemon closed them (each waited, holding room)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(sender, 20)
            ws.transport.abort()
        await other.close()
