"""The daemon's msgpack messages: a copy of the client half of wraith_core/protocol/ipc.py.

(This package must not import wraith_core, which pulls in the SSH stack.)
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

MAX_MESSAGE = 16 * 1024 * 1024
MAX_CONTROL_MESSAGE = 1024 * 1024  # any message but data (the daemon has the same limits)
# a few bytes of msgpack can stand for millions of empty arrays: legit messages are small
_UNPACK_LIMITS = {"max_array_len": 1024, "max_map_len": 64, "max_ext_len": 0}
SEND_CHUNK = 1024 * 1024  # data messages we send are at most this big

_DATA_PREFIX = b"\x82\xa4type\xa4data\xa4data"
_BIN = {0xC4: (1, ">B"), 0xC5: (2, ">H"), 0xC6: (4, ">I")}
EOF_BYTES = msgpack.packb({"type": "eof"})


class ProtocolViolation(Exception):
    pass


def data_header(n: int) -> bytes:
    if n < 256:
        return _DATA_PREFIX + b"\xc4" + bytes((n,))
    if n < 65536:
        return _DATA_PREFIX + b"\xc5" + struct.pack(">H", n)
    return _DATA_PREFIX + b"\xc6" + struct.pack(">I", n)


def encode_data(payload: bytes | bytearray | memoryview) -> bytes:
    return b"".join((data_header(len(payload)), payload))


def encode(msg: dict[str, Any]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def decode(raw: bytes | str) -> dict[str, Any]:
    """One daemon message as a dict with a string ``type``; data fast-pathed."""
    if isinstance(raw, str):
        raise ProtocolViolation("the daemon sent a text frame")
    if raw.startswith(_DATA_PREFIX) and len(raw) > len(_DATA_PREFIX):
        tag = raw[len(_DATA_PREFIX)]
        spec = _BIN.get(tag)
        if spec is not None:
            off = len(_DATA_PREFIX) + 1
            size, fmt = spec
            if len(raw) >= off + size:  # else (truncated): msgpack's checks below
                (n,) = struct.unpack_from(fmt, raw, off)
                if off + size + n == len(raw):
                    return {"type": "data", "data": raw[off + size:]}
    if len(raw) > MAX_CONTROL_MESSAGE:
        raise ProtocolViolation(f"the daemon sent a message larger than {MAX_CONTROL_MESSAGE} bytes")
    try:
        obj = msgpack.unpackb(raw, raw=False, **_UNPACK_LIMITS)
    except Exception as exc:
        raise ProtocolViolation(f"the daemon sent something that is not msgpack ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ProtocolViolation("the daemon sent a message without a type")
    return obj
