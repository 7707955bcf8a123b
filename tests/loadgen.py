"""Load generator and echo target for the load / hostile / netem tests and bench_resilience.

Runs as its own process (so the test process, the load, the target and wraith
each stay under the per-process fd limit):

    python3 tests/loadgen.py target PORT [HOST]
        echo server: echoes every byte until EOF, then half-closes; prints "ready PORT".
    python3 tests/loadgen.py streams SOCKS TPORT N SIZE [HOLD_S]
        open N SOCKS5 streams at once (all held open), then every stream sends SIZE
        random bytes + EOF and checks the echo's SHA-256; prints one JSON line.
    python3 tests/loadgen.py idle SOCKS TPORT N
        open N streams, check each once with a short echo, print JSON {"held": ...};
        then per stdin line: "check" -> echo on every stream again, print JSON;
        "quit" (or EOF) -> close everything and exit.
    python3 tests/loadgen.py churn SOCKS TPORT SECONDS CONC SIZE [ABORT_EVERY]
        CONC workers open / transfer SIZE bytes / verify / close, for SECONDS; with ABORT_EVERY=k
        every k-th stream instead sends part of its bytes and is reset (RST); prints JSON.

Every wait is bounded (asyncio timeouts); nothing loops without a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import resource
import struct
import sys
import time
from collections import Counter

OPEN_CONCURRENCY = 200


def lift_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- target -----------------------------------------------------------------------------------

async def _echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(1 << 16):
            w.write(data)
            await w.drain()
        if w.can_write_eof():
            w.write_eof()
        await w.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        w.close()


async def target(port: int, host: str) -> None:
    srv = await asyncio.start_server(_echo, host, port, backlog=4096, reuse_address=True)
    print("ready", srv.sockets[0].getsockname()[1], flush=True)
    await srv.serve_forever()


# -- SOCKS5 client ---------------------------------------------------------------------------

async def socks_open(socks_port: int, tport: int, host: str = "127.0.0.1",
                     timeout: float = 30) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with asyncio.timeout(timeout):
        r, w = await asyncio.open_connection("127.0.0.1", socks_port, limit=1 << 20)
        try:
            w.write(b"\x05\x01\x00")
            if await r.readexactly(2) != b"\x05\x00":
                raise ConnectionError("method refused")
            w.write(b"\x05\x01\x00\x01" + bytes(int(x) for x in host.split(".")) + struct.pack(">H", tport))
            rep = await r.readexactly(10)
            if rep[1] != 0:
                raise ConnectionError(f"socks reply {rep[1]}")
        except BaseException:
            w.close()
            raise
        return r, w


async def transfer(r: asyncio.StreamReader, w: asyncio.StreamWriter, payload: bytes, timeout: float) -> bool:
    """Send payload + EOF, read the echo to EOF, compare hashes."""
    async def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(payload), 1 << 16):
            w.write(view[i:i + (1 << 16)])
            await w.drain()
        w.write_eof()

    async with asyncio.timeout(timeout):
        st = asyncio.ensure_future(send())
        h = hashlib.sha256()
        n = 0
        while chunk := await r.read(1 << 16):
            h.update(chunk)
            n += len(chunk)
        await st
    return n == len(payload) and h.digest() == hashlib.sha256(payload).digest()


def _err(exc: BaseException) -> str:
    return type(exc).__name__ + (f":{exc}" if isinstance(exc, ConnectionError) and str(exc) else "")


async def streams(socks_port: int, tport: int, n: int, size: int, hold: float) -> dict:
    sem = asyncio.Semaphore(OPEN_CONCURRENCY)
    errors: Counter[str] = Counter()
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    t0 = time.monotonic()

    async def open_one() -> None:
        async with sem:
            try:
                opened.append(await socks_open(socks_port, tport))
            except Exception as exc:
                errors["open " + _err(exc)] += 1

    await asyncio.gather(*(open_one() for _ in range(n)))
    t_open = time.monotonic() - t0
    if hold:
        await asyncio.sleep(hold)
    t1 = time.monotonic()

    async def run(rw: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> bool:
        try:
            return await transfer(*rw, os.urandom(size), timeout=120)
        except Exception as exc:
            errors["xfer " + _err(exc)] += 1
            return False
        finally:
            rw[1].close()

    results = await asyncio.gather(*(run(rw) for rw in opened))
    return {"n": n, "opened": len(opened), "ok": sum(results), "bad": len(results) - sum(results),
            "errors": dict(errors), "open_s": round(t_open, 2), "xfer_s": round(time.monotonic() - t1, 2)}


async def _ping(rw: tuple[asyncio.StreamReader, asyncio.StreamWriter], tag: bytes) -> bool:
    r, w = rw
    async with asyncio.timeout(60):
        w.write(tag)
        return await r.readexactly(len(tag)) == tag


async def idle(socks_port: int, tport: int, n: int) -> None:
    sem = asyncio.Semaphore(OPEN_CONCURRENCY)
    errors: Counter[str] = Counter()
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    t0 = time.monotonic()

    async def open_one(i: int) -> None:
        async with sem:
            try:
                rw = await socks_open(socks_port, tport)
                if await _ping(rw, b"hello %08d" % i):
                    held.append(rw)
                else:
                    errors["bad echo"] += 1
            except Exception as exc:
                errors["open " + _err(exc)] += 1

    await asyncio.gather(*(open_one(i) for i in range(n)))
    print(json.dumps({"held": len(held), "errors": dict(errors), "open_s": round(time.monotonic() - t0, 2)}),
          flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if line.strip() != "check":
            break
        errs: Counter[str] = Counter()
        sem2 = asyncio.Semaphore(1000)

        async def check(i: int, rw: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> bool:
            async with sem2:
                try:
                    return await _ping(rw, b"again %08d" % i)
                except Exception as exc:
                    errs[_err(exc)] += 1
                    return False

        t1 = time.monotonic()
        res = await asyncio.gather(*(check(i, rw) for i, rw in enumerate(held)))
        print(json.dumps({"checked": len(res), "ok": sum(res), "errors": dict(errs),
                          "check_s": round(time.monotonic() - t1, 2)}), flush=True)
    for _, w in held:
        w.close()


def rst_close(w: asyncio.StreamWriter) -> None:
    import socket

    sock = w.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.close()


async def churn(socks_port: int, tport: int, seconds: float, conc: int, size: int, abort_every: int = 0) -> dict:
    deadline = time.monotonic() + seconds
    errors: Counter[str] = Counter()
    done = bad = aborted = 0

    async def worker(k: int) -> None:
        nonlocal done, bad, aborted
        i = k
        while time.monotonic() < deadline:
            i += 1
            try:
                r, w = await socks_open(socks_port, tport)
                if abort_every and i % abort_every == 0:
                    w.write(os.urandom(size // 2))
                    await asyncio.sleep(0.001 * (i % 7))
                    rst_close(w)
                    aborted += 1
                    continue
                try:
                    ok = await transfer(r, w, os.urandom(size), timeout=30)
                finally:
                    w.close()
                done += 1
                bad += not ok
            except Exception as exc:
                errors[_err(exc)] += 1
                bad += 1
                await asyncio.sleep(0.05)

    await asyncio.gather(*(worker(k) for k in range(conc)))
    return {"done": done, "bad": bad, "aborted": aborted, "errors": dict(errors)}


def main(argv: list[str]) -> None:
    lift_fd_limit()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    cmd, args = argv[0], argv[1:]
    if cmd == "target":
        runner(target(int(args[0]), args[1] if len(args) > 1 else "127.0.0.1"))
    elif cmd == "streams":
        hold = float(args[4]) if len(args) > 4 else 0.0
        print(json.dumps(runner(streams(int(args[0]), int(args[1]), int(args[2]), int(args[3]), hold))), flush=True)
    elif cmd == "idle":
        runner(idle(int(args[0]), int(args[1]), int(args[2])))
    elif cmd == "churn":
        abort_every = int(args[5]) if len(args) > 5 else 0
        print(json.dumps(runner(churn(int(args[0]), int(args[1]), float(args[2]), int(args[3]), int(args[4]),
                                      abort_every))), flush=True)
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv[1:])
