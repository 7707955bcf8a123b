"""The daemon's msgpack codec (wraith_core/protocol/ipc.py), sans-I/O, exhaustive + hypothesis."""

from __future__ import annotations

import os

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wraith_core.options import ConnectOptions, ServeOptions
from wraith_core.protocol import ipc


@pytest.mark.parametrize("n", [1, 255, 256, 65535, 65536, 300_000])
def test_data_fast_path_is_plain_msgpack(n: int) -> None:
    payload = bytes(range(256)) * (n // 256) + b"x" * (n % 256)
    raw = ipc.encode_data(payload)
    assert msgpack.unpackb(raw) == {"type": "data", "data": payload}
    assert raw == msgpack.packb({"type": "data", "data": payload}, use_bin_type=True)
    m = ipc.decode_client(raw)
    assert isinstance(m, ipc.Data) and m.data == payload


def test_roundtrip_every_message() -> None:
    msgs = [
        ipc.Open("connect", {"server": "h:1", "identity": b"k", "target": "t:2"}),
        ipc.Open("serve", {"hostKey": "/k"}),
        ipc.Open("accept", id="in3"),
        ipc.Open("events", topics=("session.",)),
        ipc.Open("events", topics=("s" * 256,) * 256),
        ipc.Open("events"),
        ipc.Opened("connect", "s1", {"target": "t:2", "session": "p1", "pooled": False}),
        ipc.Error("ECONNREFUSED", "refused"),
        ipc.Data(b"\x00\xff"),
        ipc.Eof(),
        ipc.Incoming("in1", {"remoteAddress": "127.0.0.1", "transport": "tcp", "user": "u",
                             "keyFingerprint": "SHA256:x"}),
        ipc.Event("session.up", 12.5, {"session": "p1"}),
    ]
    for m in msgs:
        assert ipc.decode(ipc.encode(m)) == m


def test_direction_rules() -> None:
    with pytest.raises(ipc.IPCError):
        ipc.decode_client(ipc.encode(ipc.Opened("connect", "s1")))
    with pytest.raises(ipc.IPCError):
        ipc.decode_daemon(ipc.encode(ipc.Open("events")))


@pytest.mark.parametrize("raw", [
    b"", b"\xc1", b"\x91\x01", b"\x80", b"\xa3abc", "text",
    msgpack.packb({"type": 1}), msgpack.packb({"type": "nope"}),
    msgpack.packb({"type": "open"}), msgpack.packb({"type": "open", "kind": "fly"}),
    msgpack.packb({"type": "open", "kind": "connect", "options": [1]}),
    msgpack.packb({"type": "open", "kind": "connect", "options": {1: 2}}, strict_types=False),
    msgpack.packb({"type": "open", "kind": "accept"}),
    msgpack.packb({"type": "open", "kind": "events", "topics": "x"}),
    msgpack.packb({"type": "open", "kind": "events", "topics": ["s."] * 257}),
    msgpack.packb({"type": "open", "kind": "events", "topics": ["s" * 257]}),
    msgpack.packb({"type": "data", "data": "str"}, use_bin_type=True),
    msgpack.packb({"type": "data", "data": b""}, use_bin_type=True),
    msgpack.packb({"type": "data"}),
    msgpack.packb({"type": "eof"}) + b"\x00",
    msgpack.packb({b"type": b"eof"}, use_bin_type=True),
])
def test_malformed_is_eproto(raw) -> None:
    with pytest.raises(ipc.IPCError) as ei:
        ipc.decode(raw)
    assert ei.value.code == "EPROTO"


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash(raw: bytes) -> None:
    try:
        ipc.decode(raw)
    except ipc.IPCError as exc:
        assert exc.code == "EPROTO"


_values = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
                       | st.binary(max_size=8),
                       lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                       max_leaves=8)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["type", "kind", "options", "id", "topics", "data", "x"]),
                       _values | st.sampled_from(["open", "data", "eof", "connect", "serve", "accept",
                                                  "events"]), max_size=5))
def test_random_maps_and_truncations(obj: dict) -> None:
    raw = msgpack.packb(obj, use_bin_type=True)
    for cut in {len(raw), len(raw) // 2, max(0, len(raw) - 1)}:
        try:
            ipc.decode_client(raw[:cut])
        except ipc.IPCError as exc:
            assert exc.code == "EPROTO"


def test_connect_options_map_to_the_dataclass() -> None:
    for camel, (snake, _) in ipc.CONNECT_OPTIONS.items():
        assert snake in ConnectOptions.field_names(), camel
    for camel, (snake, _) in ipc.SERVE_OPTIONS.items():
        assert snake in ServeOptions.field_names(), camel
    fields, target = ipc.connect_fields({"server": "h:1", "identity": b"key", "hostKey": "SHA256:x",
                                         "acceptAnyHostKey": False, "window": 1 << 22,
                                         "keepaliveInterval": 2, "peer": None})
    assert target == ipc.DEFAULT_TARGET
    assert fields == {"server": "h:1", "identity": b"key", "host_key": "SHA256:x",
                      "accept_any_host_key": False, "window": 1 << 22, "keepalive_interval": 2}
    assert ipc.serve_fields({"hostKey": "/k", "listen": "127.0.0.1:0"}) == {"key": "/k", "listen": "127.0.0.1:0"}
    assert ipc.serve_fields({"key": "/k"}) == {"key": "/k"}
    # the server's limits are all there (a new one is not forgotten): only tuning knobs are CLI-only
    served = {snake for snake, _ in ipc.SERVE_OPTIONS.values()}
    assert set(ServeOptions.field_names()) - served == {"ciphers", "connect_timeout", "drain_time",
                                                         "half_open_timeout", "stealth_timeout"}
    assert ipc.serve_fields({"maxStartups": "10:30:100", "maxForwardsPerConnection": 8,
                             "maxChannelsPerConnection": 100}) == {
        "max_startups": "10:30:100", "max_forwards_per_connection": 8, "max_channels_per_connection": 100}


@pytest.mark.parametrize("opts", [
    {"bogus": 1}, {"server": 5}, {"window": True}, {"window": "1"}, {"insecure": 1},
    {"identity": 3}, {"target": 5}, {"target": ""}, {"keepaliveInterval": float("nan")},
    {"socks5": "127.0.0.1:1080"}, {"forward": ["1:h:2"]},
])
def test_bad_connect_options_are_eusage(opts) -> None:
    with pytest.raises(ipc.IPCError) as ei:
        ipc.connect_fields(opts)
    assert ei.value.code == "EUSAGE"


def test_bad_serve_options_are_eusage() -> None:
    for opts in ({"hostKey": "/a", "key": "/b"}, {"server": "x"}, {"stealth": "yes"}):
        with pytest.raises(ipc.IPCError) as ei:
            ipc.serve_fields(opts)
        assert ei.value.code == "EUSAGE"


def test_client_copy_of_codec_agrees() -> None:
    from wraith_client import _ipc as c

    for n in (1, 300, 70000):
        raw = c.encode_data(b"z" * n)
        assert raw == ipc.encode_data(b"z" * n)
        assert c.decode(raw) == {"type": "data", "data": b"z" * n}
    assert c.EOF_BYTES == ipc.EOF_BYTES
    assert c.decode(ipc.encode(ipc.Error("EAUTH", "no"))) == {"type": "error", "code": "EAUTH", "message": "no"}
    with pytest.raises(c.ProtocolViolation):
        c.decode(b"\xc1")


@pytest.mark.parametrize("size", [1, 255, 256, 65535, 65536, 1 << 20])
def test_data_payload_fast_path_matches_the_decoder(size: int) -> None:
    """The daemon reads data messages without a copy; what it reads is what decode() reads."""
    payload = os.urandom(size)
    raw = ipc.encode_data(payload)
    view = ipc.data_payload(raw)
    assert view is not None and bytes(view) == payload == ipc.decode_client(raw).data  # type: ignore[union-attr]


@given(st.binary(max_size=64))
def test_data_payload_never_accepts_what_the_decoder_refuses(raw: bytes) -> None:
    for candidate in (raw, ipc.data_header(len(raw)) + raw, ipc.data_header(len(raw) + 1) + raw,
                      ipc.data_header(len(raw)) + raw + b"\x00"):
        view = ipc.data_payload(candidate)
        if view is None:
            continue
        msg = ipc.decode_client(candidate)  # must not raise
        assert isinstance(msg, ipc.Data) and msg.data == bytes(view)


def test_data_payload_leaves_other_encodings_to_the_decoder() -> None:
    import msgpack

    reordered = msgpack.packb({"data": b"x", "type": "data"}, use_bin_type=True)
    assert ipc.data_payload(reordered) is None and ipc.decode_client(reordered) == ipc.Data(b"x")
    assert ipc.data_payload(ipc.data_header(0)) is None  # empty: the decoder refuses it
    assert ipc.data_payload(ipc.EOF_BYTES) is None
    assert ipc.data_payload(bytearray(ipc.encode_data(b"abc"))) is None  # only bytes take the fast path
