"""The SOCKS5 codec is sans-I/O: tested byte by byte and with generated garbage, no sockets."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wraith_core.protocol.socks5 import ConnectRequest, HandshakeFailed, Reply, Socks5Server


def request(atyp: int, addr: bytes, port: int, cmd: int = 1) -> bytes:
    return bytes([5, cmd, 0, atyp]) + addr + struct.pack(">H", port)


def feed_all(c: Socks5Server, data: bytes, step: int) -> list:
    events = []
    for i in range(0, len(data), step):
        c.receive_data(data[i : i + step])
        events += c.events()
    return events


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize("atyp,addr,host,kind", [
    (1, bytes([10, 1, 2, 3]), "10.1.2.3", "ipv4"),
    (4, bytes(15) + b"\x01", "::1", "ipv6"),
    (3, b"\x0bexample.org", "example.org", "domain"),
])
def test_connect_any_split(step: int, atyp: int, addr: bytes, host: str, kind: str) -> None:
    c = Socks5Server()
    data = b"\x05\x02\x00\x02" + request(atyp, addr, 8080) + b"early bytes"
    events = feed_all(c, data, step)
    assert events == [ConnectRequest(host, 8080, kind)]
    assert c.data_to_send() == b"\x05\x00"
    assert c.trailing_data == b"early bytes"
    c.reply(Reply.SUCCEEDED)
    assert c.data_to_send() == b"\x05\x00\x00\x01" + bytes(6)
    assert c.state == "done"


@pytest.mark.parametrize("code", list(Reply)[1:])
def test_failure_replies(code: Reply) -> None:
    c = Socks5Server()
    c.receive_data(b"\x05\x01\x00" + request(1, b"\x7f\x00\x00\x01", 1))
    c.events()
    c.data_to_send()
    c.reply(code)
    assert c.data_to_send()[:2] == bytes([5, code])
    assert c.failed


def test_reply_before_request_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        Socks5Server().reply(Reply.SUCCEEDED)


def test_no_acceptable_method() -> None:
    c = Socks5Server()
    c.receive_data(b"\x05\x01\x02")  # only user/pass offered, none configured
    assert c.data_to_send() == b"\x05\xff"
    assert isinstance(c.events()[0], HandshakeFailed)


def test_zero_methods_and_wrong_version() -> None:
    c = Socks5Server()
    c.receive_data(b"\x05\x00")
    assert c.data_to_send() == b"\x05\xff" and c.failed
    c = Socks5Server()
    c.receive_data(b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00")  # SOCKS4
    assert c.failed and c.data_to_send() == b""


def test_unsupported_command_and_address_type() -> None:
    for cmd in (2, 3, 9):
        c = Socks5Server()
        c.receive_data(b"\x05\x01\x00" + request(1, b"\x01\x02\x03\x04", 80, cmd=cmd))
        assert c.data_to_send()[2:4] == bytes([5, Reply.COMMAND_NOT_SUPPORTED])
        assert c.failed
    c = Socks5Server()
    c.receive_data(b"\x05\x01\x00\x05\x01\x00\x07")
    assert c.data_to_send()[2:4] == bytes([5, Reply.ADDRESS_TYPE_NOT_SUPPORTED])


@pytest.mark.parametrize("name", [b"", b"a\x00b", b"\xff\xfe", b"has space", b"a/b"])
def test_bad_domain_names(name: bytes) -> None:
    c = Socks5Server()
    c.receive_data(b"\x05\x01\x00" + bytes([5, 1, 0, 3, len(name)]) + name + b"\x00\x50")
    assert c.failed
    assert c.data_to_send()[2:4] == bytes([5, Reply.GENERAL_FAILURE])


def test_port_zero_refused() -> None:
    c = Socks5Server()
    c.receive_data(b"\x05\x01\x00" + request(1, b"\x01\x02\x03\x04", 0))
    assert c.failed


def test_max_length_domain_is_fine() -> None:
    name = b"a" * 255
    c = Socks5Server()
    c.receive_data(b"\x05\x01\x00" + bytes([5, 1, 0, 3, 255]) + name + b"\x01\xbb")
    assert c.events() == [ConnectRequest("a" * 255, 443, "domain")]


def test_userpass_auth() -> None:
    good = Socks5Server((b"alice", b"s3cret"))
    good.receive_data(b"\x05\x02\x00\x02\x01\x05alice\x06s3cret" + request(1, b"\x7f\x00\x00\x01", 22))
    assert good.data_to_send() == b"\x05\x02\x01\x00"
    assert isinstance(good.events()[0], ConnectRequest)
    bad = Socks5Server((b"alice", b"s3cret"))
    bad.receive_data(b"\x05\x01\x02\x01\x05alice\x05wrong")
    assert bad.data_to_send() == b"\x05\x02\x01\x01"
    assert bad.failed
    noauth = Socks5Server((b"alice", b"s3cret"))
    noauth.receive_data(b"\x05\x01\x00")
    assert noauth.data_to_send() == b"\x05\xff"


def test_handshake_length_bounded() -> None:
    c = Socks5Server()
    c.receive_data(b"\x05\x01\x00")
    c.receive_data(b"\x05\x01\x00\x03\xff" + b"a" * 100)  # incomplete but legal so far
    assert not c.failed
    c = Socks5Server()
    c.receive_data(b"\x05\xff" + bytes(255) + b"x" * 2000)
    assert c.failed or c.state == "request"


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=64))
def test_garbage_never_crashes(data: bytes, step: int) -> None:
    c = Socks5Server()
    events = feed_all(c, data, step)
    out = c.data_to_send()
    assert len(out) <= 2 + 10 + 2
    for e in events:
        assert isinstance(e, (ConnectRequest, HandshakeFailed))
        if isinstance(e, ConnectRequest):
            assert 1 <= e.port <= 65535 and e.host
    assert len(events) <= 1 or isinstance(events[-1], HandshakeFailed)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([1, 3, 4]), st.binary(min_size=1, max_size=255), st.integers(1, 65535),
       st.integers(1, 50))
def test_valid_requests_parse_under_any_split(atyp: int, raw: bytes, port: int, step: int) -> None:
    if atyp == 1:
        addr = raw[:4].ljust(4, b"\x00")
    elif atyp == 4:
        addr = raw[:16].ljust(16, b"\x00")
    else:
        raw = bytes(b % 26 + 97 for b in raw)
        addr = bytes([len(raw)]) + raw
    c = Socks5Server()
    events = feed_all(c, b"\x05\x01\x00" + request(atyp, addr, port), step)
    assert len(events) == 1 and isinstance(events[0], ConnectRequest)
    assert events[0].port == port
