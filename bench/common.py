"""Shared pieces of the benchmarks: a loopback target process and a raw SOCKS5 client.

The target (``python bench/common.py target PORT``) understands one command byte:
``D`` + 8-byte length: send that many bytes, then close;
``U``: read until EOF, answer the 8-byte count;
``P``: answer one byte (the latency probe: SOCKS handshake + request + first byte back).
"""

from __future__ import annotations

import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

CHUNK = 1 << 20


def run_target(port: int) -> None:
    import asyncio

    block = bytes(CHUNK)

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            cmd = await r.readexactly(1)
            if cmd == b"P":
                w.write(b"!")
                await w.drain()
                await r.read(1)
            elif cmd == b"D":
                n = struct.unpack(">Q", await r.readexactly(8))[0]
                view = memoryview(block)
                while n > 0:
                    w.write(view[: min(n, CHUNK)])
                    n -= min(n, CHUNK)
                    await w.drain()
            elif cmd == b"U":
                total = 0
                while data := await r.read(CHUNK):
                    total += len(data)
                w.write(struct.pack(">Q", total))
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    async def main() -> None:
        srv = await asyncio.start_server(handle, "127.0.0.1", port, limit=CHUNK)
        print("ready", flush=True)
        await srv.serve_forever()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def start_target() -> tuple[subprocess.Popen[bytes], int]:
    from helpers import free_port

    port = free_port()
    p = subprocess.Popen([sys.executable, __file__, "target", str(port)], stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
    return p, port


def start_openssh_socks(keys: Any, tmp: Path) -> tuple[list[Any], int]:
    """A private sshd on loopback and ``ssh -D`` to it, default settings: the two
    processes (to stop) and the SOCKS5 port."""
    from helpers import Proc, free_port, wait_port
    from openssh import ssh_base, start_sshd

    sshd, dport = start_sshd(keys, tmp)
    procs = [sshd]
    try:
        socks = free_port()
        procs.append(Proc(ssh_base(keys, dport, tmp) + ["-N", "-D", f"127.0.0.1:{socks}", "root@127.0.0.1"],
                          tmp / "ssh.log"))
        wait_port("127.0.0.1", socks)
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return procs, socks


def socks_open(socks_port: int, host: str, port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", socks_port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # like curl: greeting, wait for the method, request, wait for the reply
    s.sendall(b"\x05\x01\x00")
    if _recv_n(s, 2) != b"\x05\x00":
        raise ConnectionError("socks method refused")
    name = host.encode()
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", port))
    got = _recv_n(s, 10)
    if got[1] != 0:
        raise ConnectionError(f"socks failure {got!r}")
    return s


def _recv_n(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        part = s.recv(n - len(got))
        if not part:
            raise ConnectionError("socks closed")
        got += part
    return got


def recv_exact(s: socket.socket, n: int) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while n > 0:
        k = s.recv_into(view, min(n, CHUNK))
        if not k:
            raise ConnectionError("early EOF")
        n -= k


def download(socks_port: int, target_port: int, size: int) -> float:
    s = socks_open(socks_port, "127.0.0.1", target_port)
    t0 = time.perf_counter()
    s.sendall(b"D" + struct.pack(">Q", size))
    recv_exact(s, size)
    dt = time.perf_counter() - t0
    s.close()
    return size / dt


def upload(socks_port: int, target_port: int, size: int) -> float:
    s = socks_open(socks_port, "127.0.0.1", target_port)
    block = bytes(CHUNK)
    t0 = time.perf_counter()
    s.sendall(b"U")
    left = size
    while left > 0:
        s.sendall(block[: min(left, CHUNK)])
        left -= CHUNK
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while len(reply) < 8:
        part = s.recv(8 - len(reply))
        if not part:
            break
        reply += part
    dt = time.perf_counter() - t0
    s.close()
    assert struct.unpack(">Q", reply)[0] == size, "upload count mismatch"
    return size / dt


PHASES = ("tcp connect", "socks greeting", "socks request", "first byte")


def connect_phases(socks_port: int, target_port: int) -> tuple[float, float, float, float]:
    """One connect + first-byte probe, timed per phase (seconds, as ``PHASES``): the TCP
    connect to the proxy; the SOCKS5 greeting and its answer; the CONNECT request and its
    reply (the proxy opens the way to the target); a byte to the target and its answer."""
    pc = time.perf_counter
    t0 = pc()
    s = socket.create_connection(("127.0.0.1", socks_port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t1 = pc()
    s.sendall(b"\x05\x01\x00")
    if _recv_n(s, 2) != b"\x05\x00":
        raise ConnectionError("socks method refused")
    t2 = pc()
    name = b"127.0.0.1"
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", target_port))
    if _recv_n(s, 10)[1] != 0:
        raise ConnectionError("socks failure")
    t3 = pc()
    s.sendall(b"P")
    recv_exact(s, 1)
    t4 = pc()
    s.close()
    return t1 - t0, t2 - t1, t3 - t2, t4 - t3


def connect_latency(socks_port: int, target_port: int) -> float:
    """SOCKS5 connect + first byte back, in seconds (the sum of ``connect_phases``)."""
    return sum(connect_phases(socks_port, target_port))


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def med(values: list[float]) -> float:
    return statistics.median(values)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "target":
    run_target(int(sys.argv[2]))
