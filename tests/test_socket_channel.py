"""SocketChannel (ssh/socket_channel.py): the channel fused with its socket, driven directly
with a fake SSH connection and a fake socket transport. Flow control both ways, half-close
both ways, resets that stay visible, and the protocol errors asyncssh's channels raise.
(End to end it carries every SOCKS5 connection: test_socks_e2e, test_backpressure,
test_forwards_halfclose, test_openssh_interop.)"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncssh
import pytest
from asyncssh.constants import (MSG_CHANNEL_CLOSE, MSG_CHANNEL_DATA, MSG_CHANNEL_EOF, MSG_CHANNEL_EXTENDED_DATA,
                                MSG_CHANNEL_FAILURE, MSG_CHANNEL_REQUEST, MSG_CHANNEL_SUCCESS,
                                MSG_CHANNEL_WINDOW_ADJUST)
from asyncssh.misc import ProtocolError
from asyncssh.packet import Boolean, SSHPacket, String, UInt32

from wraith_core.relay import HIGH_WATER, RelayEnd
from wraith_core.ssh.socket_channel import SocketChannel

WINDOW, PKTSIZE = 1 << 20, 1 << 15


class FakeConn:
    """What SocketChannel uses of asyncssh's connection (no lean send: packets are recorded)."""

    def __init__(self) -> None:
        self._transport: Any = object()
        self._channels: dict[int, Any] = {}
        self.sent: list[tuple[int, bytes]] = []
        self.pktlen = 0

    def add_channel(self, chan: Any) -> int:
        number = len(self._channels) + 7
        self._channels[number] = chan
        return number

    def _update_recv_pktlen(self, size: int) -> None:
        self.pktlen = size

    def send_packet(self, pkttype: int, *parts: bytes, handler: Any = None) -> None:
        self.sent.append((pkttype, b"".join(parts)))

    def types(self) -> list[int]:
        return [t for t, _ in self.sent]


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.events: list[str] = []
        self.paused = False

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, chunks: list[bytes]) -> None:
        for c in chunks:
            self.write(c)

    def write_eof(self) -> None:
        self.events.append("eof")

    def close(self) -> None:
        self.events.append("close")

    def abort(self) -> None:
        self.events.append("abort")

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def get_extra_info(self, name: str) -> Any:
        return None


def open_channel(send_window: int = WINDOW) -> tuple[FakeConn, SocketChannel, FakeTransport]:
    conn = FakeConn()
    chan = SocketChannel(conn, WINDOW, PKTSIZE)
    chan.opened(3, send_window, PKTSIZE)
    t = FakeTransport()
    chan.connection_made(t)
    return conn, chan, t


def packet(*parts: bytes) -> SSHPacket:
    return SSHPacket(b"".join(parts))


def data_packet(data: bytes) -> SSHPacket:
    return packet(String(data))


def sent_data(conn: FakeConn) -> bytes:
    return b"".join(body[8:] for t, body in conn.sent if t == MSG_CHANNEL_DATA)


async def test_registered_on_its_connection() -> None:
    conn, chan, _t = open_channel()
    assert conn._channels == {chan.recv_chan: chan} and conn.pktlen == PKTSIZE


async def test_socket_bytes_wait_for_the_window_and_reading_pauses() -> None:
    conn, chan, t = open_channel(send_window=1000)
    chan.data_received(b"a" * 600)
    assert sent_data(conn) == b"a" * 600
    chan.data_received(b"b" * (HIGH_WATER + 1000))  # 400 fit, the rest waits
    assert sent_data(conn) == b"a" * 600 + b"b" * 400 and t.paused
    chan.eof_received()  # queued behind the data
    assert MSG_CHANNEL_EOF not in conn.types()
    for _ in range(HIGH_WATER // PKTSIZE + 2):
        chan.process_packet(MSG_CHANNEL_WINDOW_ADJUST, 0, packet(UInt32(PKTSIZE)))
    assert sent_data(conn) == b"a" * 600 + b"b" * (HIGH_WATER + 1000)
    assert not t.paused and conn.types()[-1] == MSG_CHANNEL_EOF
    assert all(len(body) - 8 <= PKTSIZE for typ, body in conn.sent if typ == MSG_CHANNEL_DATA)


async def test_channel_data_and_the_window_we_grant() -> None:
    conn, chan, t = open_channel()
    chunk = b"x" * PKTSIZE
    for _ in range(WINDOW // PKTSIZE // 2):
        chan.process_packet(MSG_CHANNEL_DATA, 0, data_packet(chunk))
    assert MSG_CHANNEL_WINDOW_ADJUST not in conn.types()
    chan.pause_writing()  # the socket's buffer is full: no more window
    chan.process_packet(MSG_CHANNEL_DATA, 0, data_packet(chunk))
    assert MSG_CHANNEL_WINDOW_ADJUST not in conn.types()
    chan.resume_writing()
    assert conn.sent[-1] == (MSG_CHANNEL_WINDOW_ADJUST, UInt32(3) + UInt32(WINDOW // 2 + PKTSIZE))
    assert bytes(t.written) == chunk * (WINDOW // PKTSIZE // 2 + 1)


async def test_window_exceeded_is_a_protocol_error() -> None:
    _conn, chan, _t = open_channel()
    for _ in range(WINDOW // PKTSIZE):
        chan.pause_writing()
        chan.process_packet(MSG_CHANNEL_DATA, 0, data_packet(b"y" * PKTSIZE))
    with pytest.raises(ProtocolError, match="Window exceeded"):
        chan.process_packet(MSG_CHANNEL_DATA, 0, data_packet(b"z"))


async def test_half_close_both_ways_then_close() -> None:
    conn, chan, t = open_channel()
    chan.process_packet(MSG_CHANNEL_EOF, 0, packet())
    assert t.events == ["eof"]
    chan.data_received(b"reply after the peer's EOF")  # half-close: this direction still flows
    assert sent_data(conn) == b"reply after the peer's EOF"
    chan.eof_received()
    assert conn.types()[-2:] == [MSG_CHANNEL_EOF, MSG_CHANNEL_CLOSE] and t.events == ["eof", "close"]
    assert chan.recv_chan in conn._channels  # until the peer's CLOSE
    chan.process_packet(MSG_CHANNEL_CLOSE, 0, packet())
    assert conn._channels == {} and conn.types().count(MSG_CHANNEL_CLOSE) == 1
    chan.connection_lost(None)
    assert t.events == ["eof", "close"]


async def test_close_without_eof_resets_the_socket() -> None:
    conn, chan, t = open_channel()
    chan.process_packet(MSG_CHANNEL_CLOSE, 0, packet())
    assert t.events == ["abort"] and conn.types() == [MSG_CHANNEL_CLOSE] and conn._channels == {}


async def test_socket_reset_closes_the_channel_at_once() -> None:
    conn, chan, _t = open_channel(send_window=0)
    chan.data_received(b"queued, never sent")
    chan.connection_lost(ConnectionResetError())
    assert conn.types() == [MSG_CHANNEL_CLOSE]
    chan.process_packet(MSG_CHANNEL_DATA, 0, data_packet(b"late"))  # in flight: dropped
    chan.process_packet(MSG_CHANNEL_CLOSE, 0, packet())
    assert conn._channels == {}


async def test_connection_lost_resets_the_socket() -> None:
    conn, chan, t = open_channel()
    chan.process_connection_close(asyncssh.ConnectionLost("gone"))
    assert t.events == ["abort"] and conn._channels == {}


async def test_connection_lost_after_both_eofs_is_a_clean_close() -> None:
    conn, chan, t = open_channel(send_window=0)
    chan.data_received(b"waits for window")
    chan.eof_received()
    chan.process_packet(MSG_CHANNEL_EOF, 0, packet())
    chan.process_connection_close(None)
    assert t.events == ["eof", "abort"]  # our EOF never went out: not clean
    conn2, chan2, t2 = open_channel()
    chan2.eof_received()
    chan2.process_packet(MSG_CHANNEL_EOF, 0, packet())
    assert t2.events == ["eof", "close"]


async def test_channel_data_before_the_socket_is_held() -> None:
    conn = FakeConn()
    chan = SocketChannel(conn, WINDOW, PKTSIZE)
    chan.opened(3, WINDOW, PKTSIZE)
    chan.process_packet(MSG_CHANNEL_DATA, 0, data_packet(b"early "))
    chan.process_packet(MSG_CHANNEL_DATA, 0, data_packet(b"bytes"))
    chan.process_packet(MSG_CHANNEL_EOF, 0, packet())
    t = FakeTransport()
    chan.connection_made(t)
    assert bytes(t.written) == b"early bytes" and t.events == ["eof"]


async def test_channel_closed_before_the_socket_is_ready() -> None:
    conn = FakeConn()
    chan = SocketChannel(conn, WINDOW, PKTSIZE)
    chan.opened(3, WINDOW, PKTSIZE)
    chan.process_packet(MSG_CHANNEL_DATA, 0, data_packet(b"cut"))
    chan.process_packet(MSG_CHANNEL_CLOSE, 0, packet())
    t = FakeTransport()
    chan.connection_made(t)
    await asyncio.sleep(0)  # reset a loop pass later: the loop is still setting the transport up
    assert t.events == ["abort"] and conn._channels == {}


async def test_requests_and_unexpected_messages() -> None:
    conn, chan, _t = open_channel()
    chan.process_packet(MSG_CHANNEL_REQUEST, 0, packet(String(b"keepalive@openssh.com"), Boolean(True)))
    assert conn.sent == [(MSG_CHANNEL_FAILURE, UInt32(3))]
    chan.process_packet(MSG_CHANNEL_REQUEST, 0, packet(String(b"x"), Boolean(False)))
    assert len(conn.sent) == 1
    with pytest.raises(ProtocolError):
        chan.process_packet(MSG_CHANNEL_EXTENDED_DATA, 0, packet(UInt32(1), String(b"e")))
    with pytest.raises(ProtocolError):
        chan.process_packet(MSG_CHANNEL_SUCCESS, 0, packet())
    chan.process_packet(MSG_CHANNEL_EOF, 0, packet())
    with pytest.raises(ProtocolError):
        chan.process_packet(MSG_CHANNEL_EOF, 0, packet())
    with pytest.raises(ProtocolError):
        chan.process_packet(MSG_CHANNEL_DATA, 0, data_packet(b"after EOF"))


async def test_lean_data_path() -> None:
    _conn, chan, t = open_channel()
    body = bytes((4, MSG_CHANNEL_DATA)) + UInt32(chan.recv_chan) + String(b"lean")
    assert chan.lean_data(body + b"pad!", len(body))
    assert not chan.lean_data(body + b"pad!", len(body) - 1)  # length disagrees: the slow path decides
    assert bytes(t.written) == b"lean"


async def test_open_answers_on_the_client() -> None:
    answers: list[BaseException | None] = []
    conn = FakeConn()
    chan = SocketChannel(conn, WINDOW, PKTSIZE, answers.append)
    with pytest.raises(ProtocolError):
        chan.process_packet(MSG_CHANNEL_DATA, 0, data_packet(b"before the confirmation"))
    chan.process_open_confirmation(5, WINDOW, PKTSIZE, packet())
    assert answers == [None]
    with pytest.raises(ProtocolError, match="not being opened"):
        chan.process_open_confirmation(5, WINDOW, PKTSIZE, packet())

    chan2 = SocketChannel(conn, WINDOW, PKTSIZE, answers.append)
    chan2.process_open_failure(asyncssh.OPEN_CONNECT_FAILED, "refused", "")
    assert isinstance(answers[-1], asyncssh.ChannelOpenError) and chan2.recv_chan not in conn._channels

    chan3 = SocketChannel(conn, WINDOW, PKTSIZE, answers.append)
    chan3.process_open_confirmation(6, WINDOW, PKTSIZE, packet(b"junk"))
    assert isinstance(answers[-1], ValueError) and conn.sent[-1] == (MSG_CHANNEL_CLOSE, UInt32(6))

    chan4 = SocketChannel(conn, WINDOW, PKTSIZE, answers.append)
    chan4.process_connection_close(None)
    assert isinstance(answers[-1], ConnectionResetError) and chan4.recv_chan not in conn._channels


async def test_half_open_relay_is_torn_down_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RelayEnd, "half_open_timeout", 0.2)
    conn, chan, t = open_channel()
    chan.eof_received()
    for _ in range(4):  # bytes still moving: kept
        await asyncio.sleep(0.1)
        chan.process_packet(MSG_CHANNEL_DATA, 0, data_packet(b"."))
    assert t.events == []
    await asyncio.sleep(0.5)
    assert t.events == ["abort"] and conn.types()[-1] == MSG_CHANNEL_CLOSE


async def test_lean_confirmation() -> None:
    answers: list[BaseException | None] = []
    conn = FakeConn()
    chan = SocketChannel(conn, WINDOW, PKTSIZE, answers.append)
    plain = bytes((4, 91)) + UInt32(chan.recv_chan) + UInt32(9) + UInt32(WINDOW) + UInt32(PKTSIZE)
    assert chan.lean_confirm(plain) and answers == [None] and chan.send_hdr == UInt32(9)
    chan2 = SocketChannel(conn, WINDOW, PKTSIZE, answers.append)
    zero = bytes((4, 91)) + UInt32(chan2.recv_chan) + UInt32(9) + UInt32(WINDOW) + UInt32(0)
    assert not chan2.lean_confirm(zero) and len(answers) == 1  # asyncssh's path refuses it


async def test_socket_that_speaks_before_the_channel_is_open() -> None:
    """The server's dialed targets (host names, --proxy): the socket exists first; what it
    sends, and its EOF, go out once the channel is confirmed, in order."""
    conn = FakeConn()
    chan = SocketChannel(conn, WINDOW, PKTSIZE)
    t = FakeTransport()
    chan.connection_made(t)
    chan.data_received(b"220 greeting ")
    chan.data_received(b"before the answer")
    chan.eof_received()
    assert conn.sent == []
    chan.opened(3, WINDOW, PKTSIZE)
    assert sent_data(conn) == b"220 greeting before the answer" and conn.types()[-1] == MSG_CHANNEL_EOF


async def test_discard_leaves_no_trace() -> None:
    conn = FakeConn()
    chan = SocketChannel(conn, WINDOW, PKTSIZE)
    t = FakeTransport()
    chan.connection_made(t)
    chan.discard()
    assert conn._channels == {} and conn.sent == [] and t.events == ["abort"]


async def test_half_open_relay_with_flow_controlled_bytes_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """Half-open, and bytes move only as flow control lets them: the peer's window
    adjustments (our queue drains) and the socket taking what we wrote (we grant
    window). Both are activity: the idle timer must not cut such a relay."""
    monkeypatch.setattr(RelayEnd, "half_open_timeout", 0.2)
    conn, chan, t = open_channel(send_window=0)
    chan.process_packet(MSG_CHANNEL_EOF, 0, packet())  # the peer is done sending: half-open
    chan.data_received(b"q" * (HIGH_WATER + 1))  # waits for the peer's window; reading pauses
    assert t.paused
    for _ in range(6):  # window trickles in: the queue drains, no socket read, no channel data
        await asyncio.sleep(0.1)
        chan.process_packet(MSG_CHANNEL_WINDOW_ADJUST, 0, packet(UInt32(PKTSIZE)))
    assert t.events == ["eof"]
    conn2, chan2, t2 = open_channel()
    chan2.eof_received()  # our socket is done sending: half-open the other way
    chan2.pause_writing()
    chan2.process_packet(MSG_CHANNEL_DATA, 0, data_packet(b"d" * (WINDOW - 1)))  # no window back
    for _ in range(6):  # the socket drains slowly: all we see is resume_writing
        await asyncio.sleep(0.1)
        chan2.resume_writing()
        chan2.pause_writing()
    assert t2.events == []
    await asyncio.sleep(0.5)  # and once nothing moves any more, it goes
    assert t2.events == ["abort"] and conn2.types()[-1] == MSG_CHANNEL_CLOSE


async def test_window_granted_only_once_the_socket_takes_held_data() -> None:
    """Channel data held before the socket's transport existed is handed over at once;
    if that fills the socket's buffer past high water, the window waits for it to drain."""
    conn = FakeConn()
    chan = SocketChannel(conn, WINDOW, PKTSIZE)
    chan.opened(3, WINDOW, PKTSIZE)
    chan.process_packet(MSG_CHANNEL_DATA, 0, data_packet(b"h" * (WINDOW - 10)))

    class Filling(FakeTransport):
        def writelines(self, chunks: list[bytes]) -> None:
            super().writelines(chunks)
            chan.pause_writing()  # what a real transport does past its high-water mark

    t = Filling()
    chan.connection_made(t)
    assert len(t.written) == WINDOW - 10 and MSG_CHANNEL_WINDOW_ADJUST not in conn.types()
    chan.resume_writing()
    assert conn.types() == [MSG_CHANNEL_WINDOW_ADJUST]


async def test_a_full_connection_send_buffer_pauses_the_sockets_that_feed_it() -> None:
    """The SSH connection's transport reports its own send buffer (pause_writing and
    resume_writing on the connection): while it is full, sockets that send into it stop
    being read, whatever window the peer grants; they resume when it drains, unless
    they still wait for the window."""
    conn, chan, t = open_channel()
    conn.pause_writing()
    chan.data_received(b"x" * 100)
    assert sent_data(conn) == b"x" * 100 and t.paused
    conn.resume_writing()
    assert not t.paused
    conn2, chan2, t2 = open_channel(send_window=0)
    chan2.data_received(b"y" * (HIGH_WATER + 1))  # paused: no window
    conn2.pause_writing()
    chan2.data_received(b"z")
    conn2.resume_writing()
    assert t2.paused  # still waiting for the window
    chan2.process_packet(MSG_CHANNEL_WINDOW_ADJUST, 0, packet(UInt32(WINDOW)))
    assert not t2.paused


async def test_window_adjustments_never_pass_2_to_the_32() -> None:
    conn, chan, _t = open_channel(send_window=0xFFFF_0000)
    for _ in range(3):
        chan.process_packet(MSG_CHANNEL_WINDOW_ADJUST, 0, packet(UInt32(0xFFFF_FFFF)))
    assert chan.send_window == 0xFFFF_FFFF
