"""The daemon's msgpack messages (docs/ipc.md), sans-I/O.

One WebSocket binary message = one msgpack map with a ``type`` field. This
module turns bytes into validated message objects and back; it never touches
a socket. Anything malformed raises :class:`IPCError` with ``code="EPROTO"``
(or ``EUSAGE`` for bad option values), so a caller can answer with an
``error`` message and close only that one WebSocket.

This file must stay importable without asyncssh, websockets or zmq
(``bindings/python`` carries a copy of the encoder/decoder part).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

VERSION = 1
MAX_MESSAGE = 16 * 1024 * 1024
# The daemon sends data messages of at most this size.
DATA_CHUNK = 1024 * 1024
MAX_TOPICS, MAX_TOPIC_LENGTH = 256, 256  # an events feed's prefixes (each event is checked against all)
# Every message but ``data`` is small: an ``open`` carries options (inline keys, a
# known_hosts file), the rest a few fields. msgpack builds a Python object per byte at
# worst (one 16 MiB message of empty maps was 1.2 GB and seconds of a blocked loop),
# so these are decoded only under these bounds.
MAX_CONTROL_MESSAGE = 1024 * 1024
_UNPACK_LIMITS = {"max_array_len": 1024, "max_map_len": 64, "max_ext_len": 0}
# What a client may ask of the daemon's own buffers: its receive window per stream and
# SSH packet size (a stalled reader holds about a window; 4 GiB was accepted).
MAX_DAEMON_WINDOW = 16 * 1024 * 1024

KINDS = ("connect", "serve", "accept", "events")

ERROR_CODES = (
    "EUSAGE", "EKEY", "EAUTH", "EHOSTKEY", "ECONNREFUSED", "EHOSTUNREACH", "ENETUNREACH",
    "ETIMEDOUT", "ENOTFOUND", "ECONNECT", "EPROHIBITED", "ECHANNEL", "ESESSION", "ECONNRESET",
    "EADDRINUSE", "EACCES", "ESERVE", "EPROTO", "EDAEMON",
)


class IPCError(Exception):
    """A message that breaks the protocol (or an option that breaks the rules)."""

    def __init__(self, message: str, code: str = "EPROTO") -> None:
        super().__init__(message)
        self.code = code


# -- messages ------------------------------------------------------------------


@dataclass(frozen=True)
class Open:
    kind: str
    options: dict[str, Any] = field(default_factory=dict)
    id: str | None = None
    topics: tuple[str, ...] | None = None
    type: str = "open"


@dataclass(frozen=True)
class Opened:
    kind: str
    id: str
    extra: dict[str, Any] = field(default_factory=dict)
    type: str = "opened"


@dataclass(frozen=True)
class Error:
    code: str
    message: str
    type: str = "error"


@dataclass(frozen=True)
class Data:
    data: bytes
    type: str = "data"


@dataclass(frozen=True)
class Eof:
    type: str = "eof"


@dataclass(frozen=True)
class Incoming:
    id: str
    info: dict[str, Any]
    type: str = "incoming"


@dataclass(frozen=True)
class Event:
    event: str
    time: float
    data: dict[str, Any]
    type: str = "event"


Message = Open | Opened | Error | Data | Eof | Incoming | Event


# -- encoding ------------------------------------------------------------------

_DATA_PREFIX = b"\x82\xa4type\xa4data\xa4data"
EOF_BYTES = msgpack.packb({"type": "eof"})


def data_header(n: int) -> bytes:
    """The msgpack bytes that precede an ``n``-byte payload in a data message."""
    if n < 256:
        return _DATA_PREFIX + b"\xc4" + bytes((n,))
    if n < 65536:
        return _DATA_PREFIX + b"\xc5" + struct.pack(">H", n)
    return _DATA_PREFIX + b"\xc6" + struct.pack(">I", n)


def data_payload(raw: object) -> memoryview | None:
    """The payload of a data message encoded as ``encode_data`` does (what both
    bindings send), as a view into ``raw`` without a copy; None for anything else,
    which then goes through :func:`decode` (and gets its full checks)."""
    if type(raw) is not bytes or not raw.startswith(_DATA_PREFIX):
        return None
    at = len(_DATA_PREFIX)
    if len(raw) < at + 2:
        return None
    kind = raw[at]
    if kind == 0xC4:
        start = at + 2
    elif kind == 0xC5:
        start = at + 3
    elif kind == 0xC6:
        start = at + 5
    else:
        return None
    size = int.from_bytes(raw[at + 1 : start], "big")
    if size == 0 or len(raw) != start + size or len(raw) > MAX_MESSAGE:
        return None
    return memoryview(raw)[start:]


def encode_data(payload: bytes | bytearray | memoryview) -> bytes:
    """``{"type": "data", "data": payload}`` with a single copy of the payload."""
    return b"".join((data_header(len(payload)), payload))


def encode(msg: Message | dict[str, Any]) -> bytes:
    if isinstance(msg, dict):
        return msgpack.packb(msg, use_bin_type=True)
    if isinstance(msg, Data):
        return encode_data(msg.data)
    if isinstance(msg, Eof):
        return EOF_BYTES
    return msgpack.packb(to_dict(msg), use_bin_type=True)


def to_dict(msg: Message) -> dict[str, Any]:
    if isinstance(msg, Open):
        d: dict[str, Any] = {"type": "open", "kind": msg.kind}
        if msg.kind in ("connect", "serve"):
            d["options"] = msg.options
        if msg.id is not None:
            d["id"] = msg.id
        if msg.topics is not None:
            d["topics"] = list(msg.topics)
        return d
    if isinstance(msg, Opened):
        return {"type": "opened", "kind": msg.kind, "id": msg.id, **msg.extra}
    if isinstance(msg, Error):
        return {"type": "error", "code": msg.code, "message": msg.message}
    if isinstance(msg, Data):
        return {"type": "data", "data": msg.data}
    if isinstance(msg, Eof):
        return {"type": "eof"}
    if isinstance(msg, Incoming):
        return {"type": "incoming", "id": msg.id, "info": msg.info}
    if isinstance(msg, Event):
        return {"type": "event", "event": msg.event, "time": msg.time, "data": msg.data}
    raise TypeError(f"not an IPC message: {msg!r}")


def error_bytes(code: str, message: str) -> bytes:
    return encode(Error(code, message))


# -- decoding ------------------------------------------------------------------


def shown(value: object, limit: int = 80) -> str:
    """A client-chosen value quoted in an error (sent back, and logged): repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _unpack(raw: bytes | bytearray | memoryview | str) -> dict[str, Any]:
    if isinstance(raw, str):
        raise IPCError("text frames are not allowed: send msgpack in binary frames")
    # only a data message laid out as the bindings send it (two entries, a bin) may be large
    limit = MAX_MESSAGE if data_payload(raw) is not None else MAX_CONTROL_MESSAGE
    if len(raw) > limit:
        raise IPCError(f"message larger than {limit} bytes")
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True, **_UNPACK_LIMITS)
    except msgpack.ExtraData:
        raise IPCError("trailing bytes after the msgpack message") from None
    except (ValueError, TypeError, msgpack.UnpackException, UnicodeDecodeError) as exc:
        raise IPCError(f"not a msgpack message ({type(exc).__name__})") from None
    except Exception as exc:  # msgpack raises a few odd types on hostile input
        raise IPCError(f"not a msgpack message ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise IPCError("a message must be a msgpack map")
    t = obj.get("type")
    if not isinstance(t, str):
        raise IPCError("a message needs a string field 'type'")
    return obj


def _str(obj: dict[str, Any], name: str, required: bool = True) -> str | None:
    v = obj.get(name)
    if v is None and not required:
        return None
    if not isinstance(v, str):
        raise IPCError(f"field {shown(name)} of {shown(obj.get('type'))} must be a string")
    return v


def _map(obj: dict[str, Any], name: str, required: bool = True) -> dict[str, Any]:
    v = obj.get(name)
    if v is None and not required:
        return {}
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise IPCError(f"field {shown(name)} of {shown(obj.get('type'))} must be a map with string keys")
    return v


def _decode_open(o: dict[str, Any]) -> Open:
    kind = _str(o, "kind")
    if kind not in KINDS:
        raise IPCError(f"unknown open kind {shown(kind)} (expected one of {', '.join(KINDS)})")
    if kind in ("connect", "serve"):
        return Open(kind, _map(o, "options"))
    if kind == "accept":
        return Open(kind, id=_str(o, "id"))
    topics = o.get("topics")
    if topics is not None:
        if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
            raise IPCError("field 'topics' must be a list of strings")
        if len(topics) > MAX_TOPICS or any(len(t) > MAX_TOPIC_LENGTH for t in topics):
            raise IPCError(f"field 'topics' takes at most {MAX_TOPICS} prefixes of {MAX_TOPIC_LENGTH} characters")
        return Open(kind, topics=tuple(topics))
    return Open(kind)


def _decode_data(o: dict[str, Any]) -> Data:
    d = o.get("data")
    if not isinstance(d, (bytes, bytearray)):
        raise IPCError("field 'data' must be bin")
    if not d:
        raise IPCError("empty data message")
    return Data(bytes(d))


def _decode_opened(o: dict[str, Any]) -> Opened:
    kind = _str(o, "kind")
    ident = _str(o, "id")
    extra = {k: v for k, v in o.items() if k not in ("type", "kind", "id")}
    return Opened(kind, ident, extra)  # type: ignore[arg-type]


def _decode_event(o: dict[str, Any]) -> Event:
    t = o.get("time")
    if not isinstance(t, (int, float)):
        raise IPCError("field 'time' must be a number")
    return Event(_str(o, "event"), float(t), _map(o, "data", required=False))  # type: ignore[arg-type]


_DECODERS: dict[str, Callable[[dict[str, Any]], Message]] = {
    "open": _decode_open,
    "data": _decode_data,
    "eof": lambda o: Eof(),
    "opened": _decode_opened,
    "error": lambda o: Error(_str(o, "code"), _str(o, "message", required=False) or ""),  # type: ignore[arg-type]
    "incoming": lambda o: Incoming(_str(o, "id"), _map(o, "info")),  # type: ignore[arg-type]
    "event": _decode_event,
}

CLIENT_TYPES = frozenset({"open", "data", "eof"})
DAEMON_TYPES = frozenset({"opened", "error", "data", "eof", "incoming", "event"})


def decode(raw: bytes | bytearray | memoryview | str, allowed: frozenset[str] | None = None) -> Message:
    """One WebSocket message -> one message object (or :class:`IPCError`)."""
    obj = _unpack(raw)
    t = obj["type"]
    if allowed is not None and t not in allowed:
        raise IPCError(f"unexpected message type {shown(t)}")
    dec = _DECODERS.get(t)
    if dec is None:
        raise IPCError(f"unknown message type {shown(t)}")
    return dec(obj)


def decode_client(raw: bytes | bytearray | memoryview | str) -> Message:
    return decode(raw, CLIENT_TYPES)


def decode_daemon(raw: bytes | bytearray | memoryview | str) -> Message:
    return decode(raw, DAEMON_TYPES)


# -- options ---------------------------------------------------------------------

# camelCase name -> (snake_case field, accepted python types)
_KEY = (str, bytes)
_NUM = (int, float)

CONNECT_OPTIONS: dict[str, tuple[str, tuple[type, ...]]] = {
    "server": ("server", (str,)),
    "peer": ("peer", (str,)),
    "transport": ("transport", (str,)),
    "identity": ("identity", _KEY),
    "certificate": ("certificate", _KEY),
    "user": ("user", (str,)),
    "hostKey": ("host_key", _KEY),
    "knownHosts": ("known_hosts", _KEY),
    "acceptAnyHostKey": ("accept_any_host_key", (bool,)),
    "tlsServerName": ("tls_server_name", (str,)),
    "tlsCa": ("tls_ca", _KEY),
    "insecure": ("insecure", (bool,)),
    "proxy": ("proxy", (str,)),
    "irohRelay": ("iroh_relay", (str,)),
    "maxPktsize": ("max_pktsize", (int,)),
    "window": ("window", (int,)),
    "keepaliveInterval": ("keepalive_interval", _NUM),
    "keepaliveCountMax": ("keepalive_count_max", (int,)),
    "connectTimeout": ("connect_timeout", _NUM),
    "sessionWait": ("session_wait", _NUM),
}
# Not an option of the session: the stream's destination.
TARGET_OPTION = "target"
DEFAULT_TARGET = "wraith-control:0"

SERVE_OPTIONS: dict[str, tuple[str, tuple[type, ...]]] = {
    "hostKey": ("key", _KEY),
    "key": ("key", _KEY),
    "authorizedKeys": ("authorized_keys", _KEY),
    "certAuthority": ("cert_authority", _KEY),
    "listen": ("listen", (str,)),
    "transport": ("transport", (str,)),
    "tlsCert": ("tls_cert", _KEY),
    "tlsKey": ("tls_key", _KEY),
    "stealth": ("stealth", (bool,)),
    "proxy": ("proxy", (str,)),
    "irohRelay": ("iroh_relay", (str,)),
    "maxConnectionsPerIp": ("max_connections_per_ip", (int,)),
    "maxStartups": ("max_startups", (str, int)),
    "maxForwardsPerConnection": ("max_forwards_per_connection", (int,)),
    "maxChannelsPerConnection": ("max_channels_per_connection", (int,)),
    "maxAuthAttempts": ("max_auth_attempts", (int,)),
    "loginGraceTime": ("login_grace_time", _NUM),
    "maxPktsize": ("max_pktsize", (int,)),
    "window": ("window", (int,)),
    "keepaliveInterval": ("keepalive_interval", _NUM),
    "keepaliveCountMax": ("keepalive_count_max", (int,)),
}


def _convert(options: dict[str, Any], table: dict[str, tuple[str, tuple[type, ...]]],
             what: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in options.items():
        if name in skip or value is None:
            continue
        spec = table.get(name)
        if spec is None:
            raise IPCError(f"unknown {what} option {shown(name)}", "EUSAGE")
        snake, types = spec
        # bool is an int subclass: never let True pass as a number, nor 1 as a bool
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            names = " or ".join("bin" if t is bytes else t.__name__ for t in types)
            raise IPCError(f"{what} option {name!r} must be {names}", "EUSAGE")
        if isinstance(value, float) and not math.isfinite(value):
            raise IPCError(f"{what} option {name!r} must be a finite number", "EUSAGE")
        out[snake] = value
    return out


def connect_fields(options: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """``open.options`` of a connect -> (ConnectOptions field values, target)."""
    target = options.get(TARGET_OPTION)
    if target is None:
        target = DEFAULT_TARGET
    if not isinstance(target, str) or not target:
        raise IPCError("option 'target' must be a non-empty string host:port", "EUSAGE")
    return _convert(options, CONNECT_OPTIONS, "connect", skip=(TARGET_OPTION,)), target


def serve_fields(options: dict[str, Any]) -> dict[str, Any]:
    """``open.options`` of a serve -> ServeOptions field values."""
    if "hostKey" in options and "key" in options and options["hostKey"] is not None \
            and options["key"] is not None:
        raise IPCError("give the host key as 'hostKey' or 'key', not both", "EUSAGE")
    return _convert(options, SERVE_OPTIONS, "serve")
