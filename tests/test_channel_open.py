"""ChannelManager.start_open's order: the first open builds the channel, checks the number
asyncssh gave it against the prediction and only then sends; later opens send first. A wrong
prediction after that (impossible with asyncssh as it is) closes the whole session rather
than leave an OPEN for a number that belongs to no channel, or to another one."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from wraith_core.relay import RelayEnd
from wraith_core.ssh import channels


class FakeChan:
    def __init__(self, conn: FakeConn, number: int, window: int, pktsize: int) -> None:
        self._open_waiter = None
        self._recv_chan, self._recv_window, self._recv_pktsize = number, window, pktsize
        self._recv_paused = "starting"
        self._session = None
        self.closed = False

    def _flush_recv_buf(self) -> None:
        pass

    def process_open_confirmation(self, *args: Any) -> None:
        pass

    def set_extra_info(self, **kw: Any) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class FakeConn:
    def __init__(self) -> None:
        self._next_recv_chan = 0
        self._channels: dict[int, Any] = {0: "in use", 1: "in use"}  # the next free number is 2
        self._transport = object()
        self.log: list[Any] = []
        self.skew = 0  # what asyncssh would add to our prediction (0: it agrees)

    def abort(self) -> None:
        self.log.append("abort")

    def send_packet(self, pkttype: int, *args: bytes) -> None:
        self.log.append(("send", int.from_bytes(args[1], "big")))

    def create_tcp_channel(self, window: int, max_pktsize: int) -> FakeChan:
        # asyncssh's add_channel: the first free number from _next_recv_chan
        while self._next_recv_chan in self._channels:
            self._next_recv_chan += 1
        number = self._next_recv_chan + self.skew
        self._next_recv_chan += 1
        self.log.append("create")
        chan = FakeChan(self, number, window, max_pktsize)
        self._channels[number] = chan
        return chan


def manager() -> tuple[channels.ChannelManager, FakeConn]:
    conn = FakeConn()
    session = SimpleNamespace(conn=conn, options=SimpleNamespace(window=1 << 20, max_pktsize=1 << 15), up_hooks=[])
    return channels.ChannelManager(session), conn  # type: ignore[arg-type]


def test_first_open_checks_then_later_opens_send_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channels, "_prediction_checked", [False])
    mgr, conn = manager()
    assert mgr.start_open(RelayEnd(), "10.0.0.1", 80, lambda failure: None)
    assert conn.log == ["create", ("send", 2)]
    conn.log.clear()
    assert mgr.start_open(RelayEnd(), "10.0.0.1", 80, lambda failure: None)
    assert conn.log == [("send", 3), "create"]


def test_first_open_with_a_wrong_prediction_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channels, "_prediction_checked", [False])
    mgr, conn = manager()
    conn.skew = 5
    assert not mgr.start_open(RelayEnd(), "10.0.0.1", 80, lambda failure: None)
    assert conn.log == ["create"]  # nothing sent, nothing aborted: open_relay takes over
    assert channels._prediction_checked == [False]


def test_wrong_prediction_after_the_check_closes_the_session(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channels, "_prediction_checked", [True])
    mgr, conn = manager()
    conn.skew = 1
    assert not mgr.start_open(RelayEnd(), "10.0.0.1", 80, lambda failure: None)
    assert conn.log == [("send", 2), "create", "abort"]


def test_session_down_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channels, "_prediction_checked", [True])
    mgr, conn = manager()
    conn._transport = None
    assert not mgr.start_open(RelayEnd(), "10.0.0.1", 80, lambda failure: None)
    assert conn.log == []
