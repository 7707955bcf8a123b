"""The control-stream codec (4-byte BE length + UTF-8 JSON envelope), sans-I/O, incl. hypothesis."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wraith_core.protocol.envelope import (
    DEFAULT_MAX_FRAME,
    MAX_TYPE_LENGTH,
    SUBSCRIBE,
    EndOfStream,
    Envelope,
    EnvelopeDecoder,
    EnvelopeError,
    ProtocolError,
    encode,
    make_frame,
    subscription_type,
)


def frame_of(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def decode_all(data: bytes, max_frame: int = DEFAULT_MAX_FRAME, eof: bool = True) -> list[Any]:
    d = EnvelopeDecoder(max_frame)
    d.receive_data(data)
    if eof:
        d.receive_eof()
    return d.events()


def test_encode_layout() -> None:
    f = encode(Envelope("chat", "id1", {"text": "héllo"}))
    (n,) = struct.unpack(">I", f[:4])
    assert n == len(f) - 4
    assert json.loads(f[4:].decode("utf-8")) == {"type": "chat", "id": "id1", "payload": {"text": "héllo"}}
    assert "héllo".encode() in f  # UTF-8, not \\u escapes


def test_roundtrip_and_frame_bytes_kept() -> None:
    f = make_frame("a", [1, 2, None])
    (ev, end) = decode_all(f)
    assert isinstance(ev, Envelope) and ev.type == "a" and ev.payload == [1, 2, None]
    assert ev.frame == f
    assert end == EndOfStream()


def test_byte_by_byte() -> None:
    frames = [make_frame("t", i) for i in range(5)]
    d = EnvelopeDecoder()
    seen: list[Any] = []
    for b in b"".join(frames):
        d.receive_data(bytes([b]))
        seen += d.events()
    assert [e.payload for e in seen] == list(range(5))


def test_need_more_data_is_no_event() -> None:
    d = EnvelopeDecoder()
    d.receive_data(make_frame("x", "y")[:-1])
    assert d.events() == []
    assert not d.done


def test_missing_payload_is_null_and_extra_keys_ignored() -> None:
    (ev, _) = decode_all(frame_of(b'{"type":"a","id":"1","extra":5}'))
    assert ev == Envelope("a", "1", None)


def test_oversize_rejected_from_header_alone() -> None:
    d = EnvelopeDecoder(max_frame=100)
    d.receive_data(struct.pack(">I", 101))
    (err,) = d.events()
    assert isinstance(err, ProtocolError) and err.reason == "frame-too-large"
    assert d.done and d.buffered == 0
    d.receive_data(make_frame("a"))  # dead after an error
    assert d.events() == []


def test_exactly_max_frame_accepted() -> None:
    pad = 1000 - len(encode(Envelope("a", "1", ""))[4:])
    f = encode(Envelope("a", "1", "x" * pad), max_frame=1000)
    body = f[4:]
    assert len(body) == 1000
    (ev, _) = decode_all(frame_of(body), max_frame=1000)
    assert isinstance(ev, Envelope)
    with pytest.raises(EnvelopeError) as ei:
        encode(Envelope("a", "1", "x" * (pad + 1)), max_frame=1000)
    assert ei.value.reason == "frame-too-large"


@pytest.mark.parametrize("body,reason", [
    (b"", "invalid-json"),
    (b"\xff\xfe", "invalid-utf8"),
    (b"{not json", "invalid-json"),
    (b'{"type":"a","id":"1","payload":NaN}', "invalid-json"),
    (b'{"type":"a","id":"1","payload":Infinity}', "invalid-json"),
    (b"[1,2]", "bad-envelope"),
    (b'"str"', "bad-envelope"),
    (b'{"id":"1","payload":1}', "bad-envelope"),
    (b'{"type":"","id":"1"}', "bad-envelope"),
    (b'{"type":5,"id":"1"}', "bad-envelope"),
    (b'{"type":"a","payload":1}', "bad-envelope"),
    (b'{"type":"a","id":7}', "bad-envelope"),
    (b"[" * 100_000 + b"]" * 100_000, "invalid-json"),  # nesting bomb: no RecursionError escapes
])
def test_malformed_bodies(body: bytes, reason: str) -> None:
    evs = decode_all(frame_of(body) + make_frame("after"))
    assert len(evs) == 1
    assert isinstance(evs[0], ProtocolError) and evs[0].reason == reason


def test_long_type_rejected() -> None:
    (err, *_) = decode_all(frame_of(json.dumps({"type": "t" * (MAX_TYPE_LENGTH + 1), "id": "1"}).encode()))
    assert isinstance(err, ProtocolError) and err.reason == "bad-envelope"


def test_truncated_at_eof() -> None:
    f = make_frame("a", "b")
    for cut in (1, 3, 4, len(f) - 1):
        evs = decode_all(make_frame("ok") + f[:cut])
        assert isinstance(evs[0], Envelope)
        assert isinstance(evs[1], ProtocolError) and evs[1].reason == "truncated"


def test_subscription_payload() -> None:
    assert subscription_type(Envelope(SUBSCRIBE, "1", {"type": "news"})) == "news"
    for bad in (None, "news", {"type": 3}, {"type": ""}, {}, {"type": "__subscribe"}):
        with pytest.raises(EnvelopeError):
            subscription_type(Envelope(SUBSCRIBE, "1", bad))


def test_binary_payload_is_base64_as_in_node() -> None:
    """SPEC §7: binary data in payloads is base64 — byte for byte what the Node adapter sends."""
    import base64
    import subprocess
    from pathlib import Path

    blob = bytes(range(256)) * 3
    payload = {"blob": blob, "parts": [bytearray(b"\x00\xff"), memoryview(b"abc")], "n": 1}
    f = encode(Envelope("bin", "id7", payload))
    (ev, _) = decode_all(f)
    assert ev.payload == {"blob": base64.b64encode(blob).decode(), "parts": ["AP8=", "YWJj"], "n": 1}
    node = subprocess.run(
        ["node", "-e", "const {encodeFrame} = require('./lib/framing');"
         "const blob = Buffer.alloc(768); for (let i = 0; i < 768; i++) blob[i] = i % 256;"
         "process.stdout.write(encodeFrame({type: 'bin', id: 'id7', payload: {blob,"
         " parts: [Uint8Array.from([0, 255]), Buffer.from('abc')], n: 1}}).toString('base64'))"],
        cwd=Path(__file__).parent.parent / "bindings" / "node", capture_output=True, timeout=30, check=True)
    assert base64.b64decode(node.stdout) == f


def test_encode_rejects_non_json() -> None:
    with pytest.raises(EnvelopeError):
        encode(Envelope("a", "1", {1, 2}))
    with pytest.raises(EnvelopeError):
        encode(Envelope("a", "1", float("nan")))
    with pytest.raises(EnvelopeError):
        encode(Envelope("", "1", None))


# -- property-based ----------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=10), kids, max_size=5),
    max_leaves=30,
)
types = st.text(min_size=1, max_size=40)
envelopes = st.builds(Envelope, types, st.text(max_size=40), json_values)


@settings(max_examples=300, deadline=None)
@given(st.lists(envelopes, max_size=8), st.data())
def test_any_split_roundtrips(envs: list[Envelope], data: st.DataObject) -> None:
    wire = b"".join(encode(e) for e in envs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    d = EnvelopeDecoder()
    got: list[Any] = []
    prev = 0
    for c in [*cuts, len(wire)]:
        d.receive_data(wire[prev:c])
        got += d.events()
        prev = c
    d.receive_eof()
    got += d.events()
    assert got[-1] == EndOfStream()
    assert got[:-1] == envs


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 64))
def test_random_bytes_never_raise(blob: bytes, max_frame: int) -> None:
    d = EnvelopeDecoder(max_frame)
    d.receive_data(blob)
    d.receive_eof()
    evs = d.events()
    # exactly one terminal event, always last, nothing after it
    terminal = [e for e in evs if not isinstance(e, Envelope)]
    assert len(terminal) == 1 and evs[-1] is terminal[0]
    assert d.done


@settings(max_examples=200, deadline=None)
@given(st.lists(envelopes, min_size=1, max_size=4), st.binary(min_size=1, max_size=50))
def test_garbage_after_valid_frames(envs: list[Envelope], junk: bytes) -> None:
    wire = b"".join(encode(e) for e in envs)
    evs = decode_all(wire + junk)
    # every valid frame before the junk is delivered intact, then exactly one error or a valid frame
    assert evs[:len(envs)] == envs
    assert isinstance(evs[-1], (ProtocolError, EndOfStream))


@settings(max_examples=200, deadline=None)
@given(envelopes, st.integers(0, 20))
def test_oversize_by_limit(env: Envelope, slack: int) -> None:
    f = encode(env)
    size = len(f) - 4
    (ev, *_) = decode_all(f, max_frame=size)
    assert ev == env
    if size > 1:
        (err, *_) = decode_all(f, max_frame=max(1, size - 1 - slack))
        assert isinstance(err, ProtocolError) and err.reason == "frame-too-large"
