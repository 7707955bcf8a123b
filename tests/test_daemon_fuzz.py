"""Protocol fuzzing against a live daemon: random and truncated msgpack, out-of-order messages.

Each bad WebSocket gets an ``error`` (EPROTO/EUSAGE) and is closed; a stream that
is busy meanwhile keeps flowing, and the daemon keeps serving new streams.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random

import msgpack
import pytest
from websockets.exceptions import ConnectionClosed

from helpers import Keys
from test_daemon_support import raw_ws, start_env, wire_opts


@pytest.fixture
def env(keys: Keys, tmp_path, procs):
    env = start_env(keys, tmp_path, procs)
    return {**env, "opts": wire_opts(keys, env["sport"], f"127.0.0.1:{env['tport']}")}


def _valid_messages(opts: dict) -> list[bytes]:
    return [msgpack.packb(m, use_bin_type=True) for m in (
        {"type": "open", "kind": "connect", "options": opts},
        {"type": "open", "kind": "events"},
        {"type": "open", "kind": "serve", "options": {"hostKey": "/nonexistent"}},
        {"type": "data", "data": b"abc"},
        {"type": "eof"},
    )]


def _fuzz_cases(opts: dict, n: int, rng: random.Random) -> list[list[bytes | str]]:
    valid = _valid_messages(opts)
    cases: list[list[bytes | str]] = [
        [b""], [b"\xc1"], ["text frame"], [msgpack.packb([1, 2, 3])], [msgpack.packb({"type": "eof"})],
        [msgpack.packb({"type": "data", "data": b"x"}, use_bin_type=True)],
        [msgpack.packb({"type": "open", "kind": "accept", "id": "in999"})],
        [msgpack.packb({"type": "open", "kind": "connect", "options": dict(opts, window="x")})],
        [msgpack.packb({"type": "open", "kind": "connect", "options": {"target": 1}})],
        [msgpack.packb({"type": "open", "kind": "events"}), b"\x00"],
        [msgpack.packb({"type": "open", "kind": "connect", "options": opts}),
         msgpack.packb({"type": "eof"}), msgpack.packb({"type": "data", "data": b"late"}, use_bin_type=True)],
        [msgpack.packb({"type": "open", "kind": "connect", "options": opts}),
         msgpack.packb({"type": "eof"}), msgpack.packb({"type": "eof"})],
        [msgpack.packb({"type": "open", "kind": "connect", "options": opts}),
         msgpack.packb({"type": "open", "kind": "events"})],
        [msgpack.packb({"type": "open", "kind": "connect", "options": opts}), b"\x92\x01"],
    ]
    for _ in range(n):
        kind = rng.randrange(4)
        if kind == 0:
            cases.append([rng.randbytes(rng.randrange(1, 200))])
        elif kind == 1:
            m = rng.choice(valid)
            cases.append([m[: rng.randrange(0, len(m))]])
        elif kind == 2:
            m = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 4)):
                m[rng.randrange(len(m))] = rng.randrange(256)
            cases.append([bytes(m)])
        else:
            m = valid[0]
            cases.append([m, rng.choice(valid)[: rng.randrange(1, 12)]])
    return cases


async def _run_case(info: dict, msgs: list[bytes | str]) -> tuple[list[str], int | None]:
    codes: list[str] = []
    ws = await raw_ws(info)
    try:
        for m in msgs:
            await ws.send(m)
        async with asyncio.timeout(15):
            async for raw in ws:
                if isinstance(raw, bytes):
                    d = msgpack.unpackb(raw)
                    if d.get("type") == "error":
                        codes.append(d["code"])
                    elif d.get("type") == "opened" and d.get("kind") == "connect":
                        # a valid open followed by nothing bad: end the stream ourselves
                        if len(msgs) == 1:
                            await ws.send(msgpack.packb({"type": "eof"}))
    except ConnectionClosed:
        pass
    finally:
        await ws.close()
    return codes, ws.close_code


async def test_fuzz_keeps_serving_others(env) -> None:
    info, opts = env["info"], env["opts"]
    # a legit stream that keeps flowing the whole time
    ws = await raw_ws(info)
    await ws.send(msgpack.packb({"type": "open", "kind": "connect", "options": opts}, use_bin_type=True))
    assert msgpack.unpackb(await ws.recv())["type"] == "opened"
    await ws.send(msgpack.packb({"type": "data", "data": b"ECHO\n"}, use_bin_type=True))
    sent = hashlib.sha256()
    got = hashlib.sha256()
    stop = asyncio.Event()

    async def pump() -> int:
        n = 0
        while not stop.is_set():
            blob = os.urandom(50_000)
            sent.update(blob)
            await ws.send(msgpack.packb({"type": "data", "data": blob}, use_bin_type=True))
            n += len(blob)
            await asyncio.sleep(0.01)
        await ws.send(msgpack.packb({"type": "eof"}))
        return n

    async def drain() -> int:
        n = 0
        async for raw in ws:
            d = msgpack.unpackb(raw)
            if d["type"] == "data":
                got.update(d["data"])
                n += len(d["data"])
            elif d["type"] == "eof":
                break
        return n

    pt = asyncio.create_task(pump())
    dt = asyncio.create_task(drain())

    rng = random.Random(1234)
    cases = _fuzz_cases(opts, 250, rng)
    results = []
    for i in range(0, len(cases), 25):
        results += await asyncio.gather(*(_run_case(info, c) for c in cases[i:i + 25]))
    stop.set()
    n_sent = await pt
    n_got = await asyncio.wait_for(dt, 30)
    assert n_sent == n_got and sent.hexdigest() == got.hexdigest()
    await ws.close()

    errors = [c for codes, _ in results for c in codes]
    assert errors.count("EPROTO") >= 100
    assert "EDAEMON" not in errors, errors  # no internal error, whatever came in
    # every protocol error closed with 1002 (never an internal error 1011)
    assert all(code != 1011 for _, code in results)
    # oversize message: closed by the size limit (1009)
    big = await raw_ws(info)
    await big.send(msgpack.packb({"type": "open", "kind": "connect", "options": opts}, use_bin_type=True))
    assert msgpack.unpackb(await big.recv())["type"] == "opened"
    with pytest.raises(ConnectionClosed):
        await big.send(msgpack.packb({"type": "data", "data": b"\0" * (17 * 1024 * 1024)}, use_bin_type=True))
        await asyncio.wait_for(big.recv(), 10)
    assert big.close_code == 1009
    # the daemon lives on and serves a fresh stream
    assert env["daemon"].p.poll() is None
    ws2 = await raw_ws(info)
    await ws2.send(msgpack.packb({"type": "open", "kind": "connect", "options": opts}, use_bin_type=True))
    assert msgpack.unpackb(await ws2.recv())["type"] == "opened"
    await ws2.send(msgpack.packb({"type": "data", "data": b"HASH\nabc"}, use_bin_type=True))
    await ws2.send(msgpack.packb({"type": "eof"}))
    reply = b""
    async for raw in ws2:
        d = msgpack.unpackb(raw)
        if d["type"] == "data":
            reply += d["data"]
    assert reply == hashlib.sha256(b"abc").hexdigest().encode()
    assert ws2.close_code == 1000
    assert "Traceback" not in env["daemon"].log()
