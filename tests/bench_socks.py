"""A minimal blocking SOCKS5 client for tests that need raw sockets."""

from __future__ import annotations

import socket
import struct


def raw_socks_connect(socks_port: int, host: str, port: int, timeout: float = 10) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", socks_port), timeout=timeout)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    name = host.encode()
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", port))
    reply = b""
    while len(reply) < 10:
        part = s.recv(10 - len(reply))
        if not part:
            raise ConnectionError("SOCKS5 proxy closed the connection")
        reply += part
    if reply[1] != 0:
        s.close()
        raise ConnectionError(f"SOCKS5 failure reply {reply[1]}")
    return s
