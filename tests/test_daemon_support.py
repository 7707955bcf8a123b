"""Shared pieces of the daemon tests (no tests here): a daemon process, a target process, raw IPC.

The target (a separate process, so it does not share the test's CPU time) takes
one command line per connection:
  HASH\\n        read until EOF, answer the sha256 hex of what came, close
  ECHO\\n        echo until EOF, then EOF (half-close both ways)
  SEND n seed [bps]\\n  send n deterministic bytes, then EOF; then read until EOF (at most
                 bps bytes/s if given), print "received <sha256>" on stdout and close
  RESET\\n       send 100 kB, then reset the connection (RST)
  SINK bps\\n    read at most bps bytes/s until EOF, answer the count, close
  WAIT\\n        say nothing, read until EOF, answer "bye", close (half-close the other way)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

from helpers import PY, Keys, Proc, start_server, wraith

BLOCK = 1 << 20


def block(seed: int) -> bytes:
    return random.Random(seed).randbytes(BLOCK)


def expected_sha(n: int, seed: int) -> str:
    h = hashlib.sha256()
    b = block(seed)
    full, rest = divmod(n, BLOCK)
    for _ in range(full):
        h.update(b)
    h.update(b[:rest])
    return h.hexdigest()


async def _target_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        line = (await r.readline()).decode().split()
        if not line:
            return
        cmd = line[0]
        if cmd == "HASH":
            h = hashlib.sha256()
            while True:
                d = await r.read(1 << 20)
                if not d:
                    break
                h.update(d)
            w.write(h.hexdigest().encode())
        elif cmd == "ECHO":
            while True:
                d = await r.read(1 << 20)
                if not d:
                    break
                w.write(d)
                await w.drain()
            w.write_eof()
            await w.drain()
            await asyncio.sleep(0.2)
        elif cmd == "SEND":
            n, seed = int(line[1]), int(line[2])
            b = block(seed)
            mv = memoryview(b)
            left = n
            while left > 0:
                k = min(left, BLOCK)
                w.write(mv[:k])
                await w.drain()
                left -= k
            w.write_eof()
            await w.drain()
            bps = int(line[3]) if len(line) > 3 else 0  # optional: read back at most bps bytes/s
            h = hashlib.sha256()
            count = 0
            t0 = time.monotonic()
            while True:
                d = await r.read(1 << 16 if bps else 1 << 20)
                if not d:
                    break
                h.update(d)
                count += len(d)
                if bps and count / bps > time.monotonic() - t0:
                    await asyncio.sleep(count / bps - (time.monotonic() - t0))
            print(f"received {h.hexdigest()}", flush=True)
        elif cmd == "RESET":
            w.write(b"x" * 100_000)
            await w.drain()
            await asyncio.sleep(0.3)
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()
            return
        elif cmd == "SINK":
            bps = int(line[1])
            count = 0
            t0 = time.monotonic()
            while True:
                d = await r.read(64 * 1024)
                if not d:
                    break
                count += len(d)
                ahead = count / bps - (time.monotonic() - t0)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            w.write(str(count).encode())
        elif cmd == "WAIT":
            while await r.read(1 << 16):
                pass
            w.write(b"bye")
        await w.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        w.close()


async def _target_main() -> None:
    srv = await asyncio.start_server(_target_conn, "127.0.0.1", 0, limit=1 << 20)
    print(f"target listening {srv.sockets[0].getsockname()[1]}", flush=True)
    await srv.serve_forever()


def start_target(tmp: Path) -> tuple[Proc, int]:
    env = {"PYTHONPATH": str(Path(__file__).parent)}
    p = Proc([PY, "-c", "import asyncio, test_daemon_support as t; asyncio.run(t._target_main())"],
             tmp / "target.log", env=env, ready=r"target listening (\d+)")
    assert p.match is not None
    return p, int(p.match.group(1))


def start_daemon(tmp: Path, *extra: str, name: str = "daemon", linger: str = "1",
                 env: dict[str, str] | None = None) -> tuple[Proc, dict[str, Any]]:
    d = tmp / f"{name}-dir"
    p = Proc(wraith("daemon", "--dir", str(d), "--linger", linger, *extra), tmp / f"{name}.log",
             env=env, ready=r"wraith daemon: ready (.*)$")
    assert p.match is not None
    return p, json.loads(p.match.group(1))


def conn_opts(keys: Keys, server_port: int, info: dict[str, Any] | None = None) -> dict[str, Any]:
    o: dict[str, Any] = {"server": f"127.0.0.1:{server_port}", "identity": str(keys.client),
                         "host_key": str(keys.host_pub)}
    if info is not None:
        o["daemon"] = info["ws"]
    return o


def wire_opts(keys: Keys, server_port: int, target: str) -> dict[str, Any]:
    return {"server": f"127.0.0.1:{server_port}", "identity": str(keys.client),
            "hostKey": str(keys.host_pub), "target": target}


async def raw_ws(info: dict[str, Any], headers: dict[str, str] | None = None, **kw: Any) -> Any:
    """A bare WebSocket to the daemon (for protocol-level tests)."""
    from websockets.asyncio.client import connect, unix_connect

    ws = info["ws"]
    settings = dict(compression=None, max_size=32 * 1024 * 1024, ping_interval=None, open_timeout=10)
    settings.update(kw)
    if ws.startswith("unix:"):
        return await unix_connect(ws[5:], "ws://localhost/", additional_headers=headers, **settings)
    return await connect(f"ws://{ws[4:]}/", additional_headers=headers, **settings)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def count_in_log(p: Proc, text: str) -> int:
    return p.log().count(text)


if __name__ == "__main__":  # pragma: no cover - manual use
    asyncio.run(_target_main()) if sys.argv[1:] == ["target"] else None
    os._exit(0)


def start_env(keys: Keys, tmp_path: Path, procs: list[Proc]) -> dict[str, Any]:
    """A server, a daemon and a target (all in ``procs``), and the stream options for them."""
    server, sport = start_server(keys, tmp_path)
    procs.append(server)
    daemon, info = start_daemon(tmp_path)
    procs.append(daemon)
    target, tport = start_target(tmp_path)
    procs.append(target)
    return {"server": server, "sport": sport, "daemon": daemon, "info": info, "target": target,
            "tport": tport, "keys": keys, "opts": conn_opts(keys, sport, info)}
