"""The smallest Python relay with wraith's shape, to measure the floor of connect latency.

Two processes like ``wraith connect`` and ``wraith serve`` (uvloop, protocol callbacks, no
tasks on the hot path), joined by one plain TCP link with 7-byte frames: no SSH, no
encryption, no channel windows, no SOCKS codec, no logging — the least Python can do per
hop. ``late``: the SOCKS5 success reply waits for the server's confirmation, as wraith's
SPEC requires (and as ``ssh -D`` behaves); ``early``: replied at once and the client's first
bytes held until the confirmation — a lower bound no SSH client reaches. Not a product: a
yardstick for bench_floor.py.

    python3 bench/floor_relay.py server PORT TARGET_PORT
    python3 bench/floor_relay.py client SERVER_PORT SOCKS_PORT late|early
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
from typing import Any

HDR = struct.Struct(">BIH")  # type, channel id, payload length
OPEN, CONFIRM, DATA, EOF = b"OCDE"
SOCKS_OK = b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"


class Link(asyncio.Protocol):
    """The client<->server link; ``handler(link, type, id, payload)`` per frame."""

    current: Link | None = None

    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.buf = b""
        self.chans: dict[int, Any] = {}
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        Link.current = self

    def send(self, kind: int, cid: int, payload: bytes = b"") -> None:
        self.transport.write(HDR.pack(kind, cid, len(payload)) + payload)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        while len(buf) >= HDR.size:
            kind, cid, n = HDR.unpack_from(buf)
            if len(buf) < HDR.size + n:
                break
            payload, buf = buf[HDR.size:HDR.size + n], buf[HDR.size + n:]
            self.handler(self, kind, cid, payload)
        self.buf = buf


class TargetSide(asyncio.Protocol):
    def __init__(self, link: Link, cid: int) -> None:
        self.link, self.cid = link, cid
        self.transport: Any = None
        self.held = b""
        self.closed = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if self.held:
            transport.write(self.held)
        if self.closed:
            transport.close()

    def data_received(self, data: bytes) -> None:
        self.link.send(DATA, self.cid, data)

    def eof_received(self) -> bool:
        self.link.send(EOF, self.cid)
        return True


def server_frame(target_port: int) -> Any:
    def handle(link: Link, kind: int, cid: int, payload: bytes) -> None:
        if kind == OPEN:  # connect (loopback: done when connect() returns), confirm, attach later
            sock = socket.socket()
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.connect_ex(("127.0.0.1", target_port))
            link.send(CONFIRM, cid)
            side = link.chans[cid] = TargetSide(link, cid)
            asyncio.get_running_loop().create_task(
                asyncio.get_running_loop().create_connection(lambda: side, sock=sock))
        elif kind == DATA:
            side = link.chans[cid]
            if side.transport is None:
                side.held += payload
            else:
                side.transport.write(payload)
        elif kind == EOF:
            side = link.chans.pop(cid, None)
            if side is not None and side.transport is not None:
                side.transport.close()
            elif side is not None:
                side.closed = True

    return handle


class SocksSide(asyncio.Protocol):
    next_id = 0

    def __init__(self, late: bool) -> None:
        self.late = late
        self.state = 0
        self.held = b""
        self.open = False
        self.transport: Any = None
        SocksSide.next_id += 1
        self.cid = SocksSide.next_id

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        link = Link.current
        assert link is not None
        if self.state == 0:  # greeting
            self.transport.write(b"\x05\x00")
            self.state = 1
        elif self.state == 1:  # request (the probe's target is fixed: the port is enough)
            self.state = 2
            link.chans[self.cid] = self
            link.send(OPEN, self.cid, data[-2:])
            if not self.late:
                self.transport.write(SOCKS_OK)
        elif self.open:
            link.send(DATA, self.cid, data)
        else:
            self.held += data

    def confirmed(self) -> None:
        self.open = True
        if self.late:
            self.transport.write(SOCKS_OK)
        if self.held:
            assert Link.current is not None
            Link.current.send(DATA, self.cid, self.held)
            self.held = b""

    def eof_received(self) -> bool:
        assert Link.current is not None
        Link.current.send(EOF, self.cid)
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        if Link.current is not None:
            Link.current.chans.pop(self.cid, None)


def client_frame(link: Link, kind: int, cid: int, payload: bytes) -> None:
    side = link.chans.get(cid)
    if side is None:
        return
    if kind == CONFIRM:
        side.confirmed()
    elif kind == DATA:
        side.transport.write(payload)
    elif kind == EOF:
        side.transport.close()


async def serve(port: int, target_port: int) -> None:
    await asyncio.get_running_loop().create_server(lambda: Link(server_frame(target_port)), "127.0.0.1", port)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def connect(server_port: int, socks_port: int, late: bool) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_connection(lambda: Link(client_frame), "127.0.0.1", server_port)
    await loop.create_server(lambda: SocksSide(late), "127.0.0.1", socks_port)
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    import uvloop

    if sys.argv[1] == "server":
        uvloop.run(serve(int(sys.argv[2]), int(sys.argv[3])))
    else:
        uvloop.run(connect(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "late"))


if __name__ == "__main__":
    main()
