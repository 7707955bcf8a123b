# Vendored from wraith_core/protocol/envelope.py by bindings/python/sync_vendor.py — edit the original.
"""Control-stream framing: 4-byte big-endian length + UTF-8 JSON ``EventEnvelope``, sans-I/O.

Wire format (SPEC §7), identical on every control stream::

    +----------------+----------------------------------------------+
    | length (u32 BE)| UTF-8 JSON {"type": str, "id": str, "payload"} |
    +----------------+----------------------------------------------+

Usage::

    dec = EnvelopeDecoder(max_frame=DEFAULT_MAX_FRAME)
    dec.receive_data(chunk)          # any split of the byte stream
    dec.receive_eof()                # the peer half-closed
    for ev in dec.events():          # Envelope | ProtocolError | EndOfStream
        ...
    sock.write(encode(Envelope("chat", new_id(), {"text": "hi"})))

A frame whose declared length is over ``max_frame`` is rejected as soon as its
header is read (its body is never buffered). Invalid UTF-8, invalid JSON (NaN
and Infinity included), a non-object, a missing or non-string ``type``/``id``
are protocol errors. After a :class:`ProtocolError` the decoder is dead: it
ignores further input, so a caller can simply close the stream. EOF in the
middle of a frame is a ``truncated`` protocol error; EOF on a frame boundary is
:class:`EndOfStream`. "Need more data" is simply an empty event list.

Control messages ``__subscribe`` / ``__unsubscribe`` carry ``{"type": T}``;
:func:`subscription_type` validates that payload. Types starting with ``__``
are reserved for control messages.
"""

from __future__ import annotations

import base64
import json
import struct
import uuid
from dataclasses import dataclass, field
from typing import Any

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
DEFAULT_MAX_FRAME = 16 * 1024 * 1024  # bytes of JSON body
MAX_TYPE_LENGTH = 1024  # characters in an event type name

SUBSCRIBE = "__subscribe"
UNSUBSCRIBE = "__unsubscribe"
RESERVED_PREFIX = "__"


class EnvelopeError(ValueError):
    """A message that cannot be encoded, or a control payload of the wrong shape."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Envelope:
    type: str
    id: str
    payload: Any = None
    # The complete frame as received (header + body), so a hub can fan it out
    # without re-encoding. Empty for envelopes built locally.
    frame: bytes = field(default=b"", compare=False, repr=False)

    @property
    def is_control(self) -> bool:
        return self.type.startswith(RESERVED_PREFIX)


@dataclass(frozen=True)
class ProtocolError:
    """The stream broke the framing rules; ``reason`` is a short stable token."""

    reason: str  # frame-too-large | invalid-utf8 | invalid-json | bad-envelope | truncated
    message: str


@dataclass(frozen=True)
class EndOfStream:
    """The peer sent EOF on a frame boundary."""


@dataclass(frozen=True)
class RawFrame:
    """A frame over the decoder's ``defer_over`` size, not parsed yet: the caller parses it
    (``parse_frame``), maybe in another process — a big frame of tiny JSON values takes
    the parser a while."""

    frame: bytes = field(repr=False)


Event = Envelope | ProtocolError | EndOfStream | RawFrame


def new_id() -> str:
    return uuid.uuid4().hex


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# one decoder for every frame (json.loads with an option builds a new one per call)
_JSON = json.JSONDecoder(parse_constant=_reject_constant)


def _binary(value: Any) -> str:
    """Binary data in payloads travels as base64 (SPEC §7; the Node adapter does the same)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def encode_body(type: str, id: str, payload: Any) -> bytes:
    try:
        return json.dumps({"type": type, "id": id, "payload": payload}, ensure_ascii=False,
                          separators=(",", ":"), allow_nan=False, default=_binary).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise EnvelopeError("not-json", f"payload is not JSON-serialisable: {exc}") from None


def encode(envelope: Envelope, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """One frame (header + body). Raises :class:`EnvelopeError` if it is not valid or too large."""
    check_type(envelope.type, allow_reserved=True)
    if not isinstance(envelope.id, str):
        raise EnvelopeError("bad-envelope", "envelope id must be a string")
    body = encode_body(envelope.type, envelope.id, envelope.payload)
    if len(body) > max_frame:
        raise EnvelopeError("frame-too-large", f"frame of {len(body)} bytes is over the {max_frame}-byte limit")
    return HEADER.pack(len(body)) + body


def make_frame(type: str, payload: Any = None, id: str | None = None,
               max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    return encode(Envelope(type, id if id is not None else new_id(), payload), max_frame)


def check_type(type: object, allow_reserved: bool = False) -> str:
    if not isinstance(type, str) or not type:
        raise EnvelopeError("bad-envelope", "event type must be a non-empty string")
    if len(type) > MAX_TYPE_LENGTH:
        raise EnvelopeError("bad-envelope", f"event type longer than {MAX_TYPE_LENGTH} characters")
    if not type.isascii():
        try:
            type.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape: not text
            raise EnvelopeError("bad-envelope", "event type is not valid Unicode") from None
    if not allow_reserved and type.startswith(RESERVED_PREFIX):
        raise EnvelopeError("reserved-type", f"event types starting with {RESERVED_PREFIX!r} are reserved")
    return type


def subscription_type(envelope: Envelope) -> str:
    """The ``T`` of a ``__subscribe``/``__unsubscribe`` message, validated."""
    payload = envelope.payload
    if not isinstance(payload, dict):
        raise EnvelopeError("bad-envelope", f"{envelope.type} payload must be an object")
    return check_type(payload.get("type"))


def parse_body(body: bytes | memoryview, frame: bytes = b"", keep_payload: bool = True) -> Envelope | ProtocolError:
    """The envelope in ``body``, validated. With ``keep_payload`` False the payload of an
    event (not of a ``__`` control message) is checked and then dropped: a hub only
    forwards ``frame``, and a parsed payload can be many times the size of its JSON."""
    try:
        text = str(body, "utf-8")
    except UnicodeDecodeError:
        return ProtocolError("invalid-utf8", "frame is not valid UTF-8")
    try:
        obj = _JSON.decode(text)
    except (ValueError, RecursionError):
        return ProtocolError("invalid-json", "frame is not valid JSON")
    if not isinstance(obj, dict):
        return ProtocolError("bad-envelope", "envelope must be a JSON object")
    try:
        type_ = check_type(obj.get("type"), allow_reserved=True)
    except EnvelopeError as exc:
        return ProtocolError("bad-envelope", str(exc))
    id_ = obj.get("id")
    if not isinstance(id_, str):
        return ProtocolError("bad-envelope", "envelope id must be a string")
    keep = keep_payload or type_.startswith(RESERVED_PREFIX)
    return Envelope(type_, id_, obj.get("payload") if keep else None, frame)


def parse_frame(frame: bytes, keep_payload: bool = True) -> Envelope | ProtocolError:
    """Parse a whole frame (header + body); the envelope carries no copy of it."""
    return parse_body(memoryview(frame)[HEADER_SIZE:], b"", keep_payload)


class EnvelopeDecoder:
    """Bytes in, :data:`Event` objects out. No I/O."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, keep_payload: bool = True,
                 defer_over: int | None = None) -> None:
        if max_frame < 1:
            raise ValueError("max_frame must be positive")
        self.max_frame = max_frame
        self.keep_payload = keep_payload  # False: events carry their frame, not their payload
        self.defer_over = defer_over  # bodies longer than this come out as RawFrame
        self._buf = bytearray()
        self._need: int | None = None  # body length of the frame being read
        self._events: list[Event] = []
        self._done = False

    @property
    def done(self) -> bool:
        """True after a protocol error or EOF: no further events will come."""
        return self._done

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._done or not data:
            return
        self._buf += data
        self._parse()

    def receive_eof(self) -> None:
        if self._done:
            return
        self._done = True
        if self._buf:
            self._events.append(ProtocolError(
                "truncated", f"stream ended inside a frame ({len(self._buf)} bytes pending)"))
            self._buf.clear()
        else:
            self._events.append(EndOfStream())

    def events(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    def _fail(self, error: ProtocolError) -> None:
        self._events.append(error)
        self._done = True
        self._buf.clear()

    def _parse(self) -> None:
        buf = self._buf
        pos = 0
        while not self._done:
            if self._need is None:
                if len(buf) - pos < HEADER_SIZE:
                    break
                (n,) = HEADER.unpack_from(buf, pos)
                if n > self.max_frame:
                    self._fail(ProtocolError("frame-too-large",
                                             f"frame of {n} bytes is over the {self.max_frame}-byte limit"))
                    return
                self._need = n
            n = self._need
            if len(buf) - pos < HEADER_SIZE + n:
                break
            with memoryview(buf) as view:  # one copy, and the view is released before buf is resized
                frame = bytes(view[pos:pos + HEADER_SIZE + n])
            pos += HEADER_SIZE + n
            self._need = None
            if self.defer_over is not None and n > self.defer_over:
                self._events.append(RawFrame(frame))
                continue
            ev = parse_body(memoryview(frame)[HEADER_SIZE:], frame, self.keep_payload)
            if isinstance(ev, ProtocolError):
                self._fail(ev)
                return
            self._events.append(ev)
        if pos:
            del buf[:pos]
