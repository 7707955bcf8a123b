"""The lean receive loop (ssh/lean_recv.py) against packets sealed the way the lean sender
and asyncssh seal them: channel packets reach the same handlers with the same sequence
numbers, anything else is left to asyncssh's path with the nonce in step, and every bad
packet ends the connection with asyncssh's own error."""

from __future__ import annotations

import asyncio
import os
import types
from typing import Any

import pytest
from asyncssh.connection import SSHConnection
from asyncssh.constants import DISC_MAC_ERROR, DISC_PROTOCOL_ERROR
from asyncssh.encryption import GCMEncryption

from wraith_core.ssh import lean_recv
from wraith_core.ssh.speedups import _GCM, _send_lean

KEY, IV = os.urandom(16), os.urandom(12)
DATA, EOF, CONFIRM, GLOBAL_REQUEST = 94, 96, 91, 80


class _Sender:
    """The sending side: whatever _send_lean writes."""

    def __init__(self) -> None:
        self._send_encryption = GCMEncryption(_GCM(KEY, IV))  # type: ignore[arg-type]
        self._compressor = None
        self._kex_complete = self._auth_complete = True
        self._rekey_bytes, self._rekey_bytes_sent, self._rekey_seconds, self._rekey_time = 1 << 30, 0, 0, 0.0
        self._send_enchdrlen, self._send_blocksize, self._send_seq = 1, 16, 3
        self.wire = b""

    def _send(self, data: bytes) -> None:
        self.wire += bytes(data)

    def packet(self, pkttype: int, body: bytes) -> bytes:
        before = len(self.wire)
        assert _send_lean(self, pkttype, (body,))
        return self.wire[before:]


class _Chan:
    def __init__(self, events: list[Any]) -> None:
        self.events = events

    def process_packet(self, pkttype: int, seq: int, packet: Any) -> bool:
        self.events.append(("chan", pkttype, seq, packet.get_remaining_payload()))
        return True


class _Receiver:
    """The attributes of asyncssh's connection the lean loop uses; asyncssh's own
    ``_recv_data`` is recorded instead of run."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self._recv_encryption = GCMEncryption(_GCM(KEY, IV))  # type: ignore[arg-type]
        self._recv_blocksize = self._recv_macsize = 16
        self._decompressor = None
        self._auth_complete = True
        self._auth_final = False
        self._inpbuf = b""
        self._recv_seq = 3
        self._max_recv_pktlen = 300_000
        self._channels = {5: _Chan(self.events)}
        self._transport: object | None = object()
        self._recv_handler = types.MethodType(SSHConnection._recv_pkthdr, self)

    def _recv_data(self) -> None:
        self.events.append(("asyncssh", self._inpbuf))

    def _reset_keepalive_timer(self) -> None:
        pass

    def _send_disconnect(self, code: int, reason: str, lang: str) -> None:
        self.events.append(("disconnect", code, reason))

    def _force_close(self, exc: Exception) -> None:
        self._transport = None
        self._inpbuf = b""

    def internal_error(self) -> None:
        self.events.append(("internal error",))

    def eof_received(self) -> None:
        self.events.append(("eof",))

    def connection_lost(self, exc: Exception | None = None) -> None:
        self.events.append(("lost", exc))

    def process_packet(self, pkttype: int, seq: int, packet: Any) -> bool:
        self.events.append(("conn", pkttype, seq, packet.get_remaining_payload()))
        return True

    def feed(self, data: bytes) -> None:
        self._inpbuf += data  # as asyncssh's data_received
        self._recv_data()


def _receiver() -> _Receiver:
    conn = _Receiver()
    lean_recv.install(conn, _GCM)
    assert conn._recv_data.__name__ == "recv_data"  # installed
    return conn


CHAN5 = (5).to_bytes(4, "big")


def test_channel_packets_in_order_across_reads() -> None:
    tx, rx = _Sender(), _receiver()
    body = CHAN5 + (100_000).to_bytes(4, "big") + os.urandom(100_000)
    wire = tx.packet(CONFIRM, b"\x00\x00\x00\x07" + CHAN5 + b"\x00\x20\x00\x00\x00\x00\x80\x00")
    wire += tx.packet(DATA, body) + tx.packet(EOF, CHAN5)
    for i in range(0, len(wire), 7000):  # arrives in pieces, packets split across reads
        rx.feed(wire[i:i + 7000])
    assert rx.events == [
        ("conn", CONFIRM, 3, b"\x00\x00\x00\x07" + CHAN5 + b"\x00\x20\x00\x00\x00\x00\x80\x00"),
        ("chan", DATA, 4, body[4:]),
        ("chan", EOF, 5, b""),
    ]
    assert rx._recv_seq == 6 and rx._inpbuf == b"" and rx._auth_final


def test_other_packets_go_to_asyncssh_with_the_nonce_in_step() -> None:
    tx, rx = _Sender(), _receiver()
    eof = tx.packet(EOF, CHAN5)
    request = tx.packet(GLOBAL_REQUEST, b"\x00\x00\x00\x05hello\x01")
    rx.feed(eof + request)
    assert rx.events[0] == ("chan", EOF, 3, b"")
    assert rx.events[1] == ("asyncssh", request)  # left at the front, unconsumed
    # asyncssh's own decryptor, with the cipher the lean loop used, opens it: nonce in step
    plain = rx._recv_encryption.decrypt_packet(4, request[:16], request[16:-16], 4, request[-16:])
    assert plain is not None and plain[1] == GLOBAL_REQUEST


def _disconnect_of(rx: _Receiver, wire: bytes) -> tuple[int, str]:
    rx.feed(wire)
    got = [e for e in rx.events if e[0] == "disconnect"]
    assert len(got) == 1 and rx._transport is None
    return got[0][1], got[0][2]


def test_bad_tag_is_asyncssh_mac_error() -> None:
    tx, rx = _Sender(), _receiver()
    wire = bytearray(tx.packet(DATA, CHAN5 + b"\x00\x00\x00\x02hi"))
    wire[-1] ^= 1
    assert _disconnect_of(rx, bytes(wire)) == (DISC_MAC_ERROR, "MAC verification failed")
    assert not [e for e in rx.events if e[0] == "chan"]


def test_zero_padding_is_refused_as_asyncssh_would() -> None:
    """asyncssh takes the payload as ``[1:-padding]``: with no padding that is empty and the
    packet fails; the lean loop refuses it too (never delivers its bytes)."""
    rx = _receiver()
    plain = bytes([0, EOF]) + CHAN5 + bytes(10)  # 16 bytes: a whole block, padding length 0
    header = len(plain).to_bytes(4, "big")
    sealed, tag = _GCM(KEY, IV).encrypt_and_sign(header, plain)  # header + ciphertext, tag
    assert _disconnect_of(rx, sealed + tag) == (DISC_PROTOCOL_ERROR, "Invalid packet padding")
    assert not [e for e in rx.events if e[0] == "chan"]


def test_a_channel_class_with_its_own_data_handling_gets_asyncssh_s_path() -> None:
    """A channel subclass that overrides ``_accept_data`` (asyncssh's TUN channel strips a
    header there) is not fed by the lean shortcut."""
    from asyncssh.channel import SSHTCPChannel

    class _Own(SSHTCPChannel):  # type: ignore[type-arg]
        def _accept_data(self, data: bytes, datatype: Any = None) -> None:
            self._session.data_received(b"own:" + data, datatype)

    tx, rx = _Sender(), _receiver()
    chan = _real_channel(rx, window=1000)
    chan.__class__ = _Own
    rx.feed(tx.packet(DATA, CHAN5 + (3).to_bytes(4, "big") + b"abc"))
    assert chan._session.got == [b"own:abc"]


@pytest.mark.parametrize("case", ["oversized", "unknown channel", "short channel message", "truncated data"])
def test_bad_packets_are_asyncssh_protocol_errors(case: str) -> None:
    tx, rx = _Sender(), _receiver()
    if case == "oversized":
        wire = (400_000).to_bytes(4, "big") + bytes(64)
        expected = "Max packet size exceeded"
    elif case == "unknown channel":
        wire = tx.packet(EOF, (6).to_bytes(4, "big"))
        expected = "Invalid channel number 6 received"
    elif case == "short channel message":
        wire = tx.packet(EOF, b"\x00\x05")
        expected = "Incomplete channel request received"
    else:  # the handler's own decoding fails: asyncssh's PacketDecodeError becomes a protocol error
        rx._channels[5] = SSHConnection.__new__(SSHConnection)  # type: ignore[assignment]
        rx._channels[5].process_packet = _raise_decode_error  # type: ignore[method-assign]
        wire = tx.packet(DATA, CHAN5 + b"\x00\x00\x00\x09hi")
        expected = "Incomplete packet"
    assert _disconnect_of(rx, wire) == (DISC_PROTOCOL_ERROR, expected)


def _raise_decode_error(*_args: object) -> bool:
    from asyncssh.packet import PacketDecodeError

    raise PacketDecodeError("Incomplete packet")


def test_not_used_outside_its_state() -> None:
    tx, rx = _Sender(), _receiver()
    rx._recv_handler = lambda: False  # asyncssh is waiting for an async packet handler
    wire = tx.packet(EOF, CHAN5)
    rx.feed(wire)
    assert rx.events == [("asyncssh", wire)]
    rx2 = _receiver()
    rx2._auth_complete = False
    rx2.feed(wire)
    assert rx2.events == [("asyncssh", wire)]


class _Session:
    def __init__(self) -> None:
        self.got: list[bytes] = []

    def data_received(self, data: bytes, datatype: object) -> None:
        self.got.append(data)


def _real_channel(rx: _Receiver, window: int) -> Any:
    """asyncssh's own SSHTCPChannel on the fake connection, open, with a recording session."""
    from asyncssh.channel import SSHTCPChannel
    from asyncssh.logging import logger

    sent: list[tuple[int, bytes]] = []
    rx.logger = logger  # type: ignore[attr-defined]
    rx.add_channel = lambda chan: 5  # type: ignore[attr-defined]
    rx.send_packet = lambda pkttype, *args, handler=None: sent.append((pkttype, b"".join(args)))  # type: ignore[attr-defined]
    chan = SSHTCPChannel(rx, None, None, "strict", window, 1 << 15)  # type: ignore[arg-type]  # no loop needed here
    chan._send_chan, chan._send_state, chan._recv_state, chan._recv_paused = 9, "open", "open", False
    chan._session = _Session()
    chan.sent = sent
    rx._channels[5] = chan
    return chan


def test_data_to_an_asyncssh_channel_window_and_adjust() -> None:
    tx, rx = _Sender(), _receiver()
    chan = _real_channel(rx, window=1000)
    first, second = os.urandom(400), os.urandom(300)
    rx.feed(tx.packet(DATA, CHAN5 + (400).to_bytes(4, "big") + first))
    assert chan._session.got == [first] and chan._recv_window == 600 and chan.sent == []
    rx.feed(tx.packet(DATA, CHAN5 + (300).to_bytes(4, "big") + second))
    # asyncssh's _deliver_data: 300 left is below half the window, so it is topped up
    assert chan._session.got == [first, second] and chan._recv_window == 1000
    assert chan.sent == [(93, (9).to_bytes(4, "big") + (700).to_bytes(4, "big"))]  # WINDOW_ADJUST 700
    assert rx._recv_seq == 5


def test_data_paused_channel_goes_through_asyncssh() -> None:
    tx, rx = _Sender(), _receiver()
    chan = _real_channel(rx, window=1000)
    chan._recv_paused = True
    rx.feed(tx.packet(DATA, CHAN5 + (3).to_bytes(4, "big") + b"abc"))
    assert chan._session.got == [] and chan._recv_buf == [(b"abc", None)] and chan._recv_window == 997


@pytest.mark.parametrize("case", ["window exceeded", "length past the end", "bytes after the data"])
def test_bad_data_packets(case: str) -> None:
    tx, rx = _Sender(), _receiver()
    chan = _real_channel(rx, window=100)
    if case == "window exceeded":
        body, expected = CHAN5 + (200).to_bytes(4, "big") + bytes(200), "Window exceeded"
    elif case == "length past the end":
        body, expected = CHAN5 + (50).to_bytes(4, "big") + bytes(10), "Incomplete packet"
    else:
        body, expected = CHAN5 + (5).to_bytes(4, "big") + bytes(9), "Unexpected data at end of packet"
    assert _disconnect_of(rx, tx.packet(DATA, body)) == (DISC_PROTOCOL_ERROR, expected)
    assert chan._session.got == []


class _ConsumingReceiver(_Receiver):
    """asyncssh's path stood in for by one that decrypts what it is given, packet by packet
    (keeping the nonce in step), records each packet, and takes them all."""

    def _recv_data(self) -> None:
        while self._inpbuf:
            n = 4 + int.from_bytes(self._inpbuf[:4], "big") + 16
            pkt, self._inpbuf = self._inpbuf[:n], self._inpbuf[n:]
            plain = self._recv_encryption.decrypt_packet(self._recv_seq, pkt[:16], pkt[16:-16], 4, pkt[-16:])
            assert plain is not None
            self.events.append(("asyncssh", plain[1]))
            self._recv_seq += 1
        self.events.append(("asyncssh returns",))


def test_asyncssh_s_packets_are_handed_over_one_at_a_time() -> None:
    """asyncssh's loop copies the rest of its input once per packet: given a read of thousands
    of small requests it takes quadratic time. It gets one packet per call; the lean loop
    goes on after it."""
    tx, rx = _Sender(), _ConsumingReceiver()
    lean_recv.install(rx, _GCM)
    request = b"\x00\x00\x00\x05hello\x01"
    rx.feed(tx.packet(EOF, CHAN5) + tx.packet(GLOBAL_REQUEST, request) + tx.packet(GLOBAL_REQUEST, request)
            + tx.packet(EOF, CHAN5))
    assert rx.events == [
        ("chan", EOF, 3, b""),
        ("asyncssh", GLOBAL_REQUEST), ("asyncssh returns",),
        ("asyncssh", GLOBAL_REQUEST), ("asyncssh returns",),
        ("chan", EOF, 6, b""),
    ]
    assert rx._inpbuf == b"" and rx._recv_seq == 7


class _PausableTransport:
    def __init__(self) -> None:
        self.reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return False


async def test_a_long_read_is_handled_over_several_loop_passes() -> None:
    """One read can hold thousands of small packets: a connection handles at most
    TURN_PACKETS per loop pass (not reading meanwhile), so others get their turns."""
    tx, rx = _Sender(), _receiver()
    transport = rx._transport = _PausableTransport()
    count = 3 * lean_recv.TURN_PACKETS + 10
    rx.feed(b"".join(tx.packet(EOF, CHAN5) for _ in range(count)))
    assert len(rx.events) == lean_recv.TURN_PACKETS and not transport.reading
    for passes in range(1, 10):
        await asyncio.sleep(0)
        if len(rx.events) == count:
            break
    assert passes == 3 and transport.reading
    assert [e[2] for e in rx.events] == list(range(3, 3 + count))  # in order, sequence numbers in step
    assert rx._inpbuf == b""


class _TLSTransport(_PausableTransport):
    def get_extra_info(self, name: str) -> object:
        return object() if name == "sslcontext" else None


@pytest.mark.parametrize("end", ["eof_received", "connection_lost"])
async def test_what_waits_for_a_turn_is_handled_before_the_end(end: str) -> None:
    """Over TLS the transport is not paused for a turn (a paused TLS transport ends at the
    peer's FIN without handing over what it holds): it goes on delivering, that waits in the
    input buffer, and an EOF or the end of the connection first has all of it handled."""
    tx, rx = _Sender(), _receiver()
    transport = rx._transport = _TLSTransport()
    count = 2 * lean_recv.TURN_PACKETS + 10
    data = b"".join(tx.packet(EOF, CHAN5) for _ in range(count))
    rx.feed(data[:len(data) // 2])
    assert len(rx.events) == lean_recv.TURN_PACKETS and transport.reading  # a turn waits, reading goes on
    rx.feed(data[len(data) // 2:])  # delivered meanwhile: waits for the turn
    assert len(rx.events) == lean_recv.TURN_PACKETS
    getattr(rx, end)()
    assert [e[2] for e in rx.events[:-1]] == list(range(3, 3 + count)) and rx.events[-1][0] in ("eof", "lost")
    assert rx._inpbuf == b""
