"""Sans-I/O tests of the userspace TCP engine: no devices, no sockets, explicit time."""

from __future__ import annotations

import hashlib
import heapq
import random

import pytest

from wraith_tun import ip, tcp
from wraith_tun.ip import ACK, FIN, PSH, RST, SYN

APP = bytes([10, 0, 0, 1])
DST = bytes([10, 80, 0, 1])
APORT, DPORT = 40000, 80
ISN = 1000
ISS = 5000


def mk(flags: int, seq: int, ack: int = 0, payload: bytes = b"", window: int = 65535,
       mss: int | None = 1460, wscale: int | None = None) -> ip.TcpSegment:
    """Build the app's segment as wire bytes and parse it back (exercises the codec too)."""
    opts = ip.tcp_syn_options(mss, wscale) if flags & SYN and mss else b""
    seg = ip.parse_packet(ip.build_tcp(APP, DST, APORT, DPORT, seq, ack, flags, window, payload, opts))
    assert isinstance(seg, ip.TcpSegment)
    return seg


def out(conn: tcp.TcpConnection) -> list[ip.TcpSegment]:
    segs = []
    for pkt in conn.packets_to_send():
        s = ip.parse_packet(pkt)
        assert isinstance(s, ip.TcpSegment)
        assert (s.src, s.dst, s.sport, s.dport) == (DST, APP, DPORT, APORT)
        segs.append(s)
    return segs


def kinds(events: list[tcp.Event]) -> list[type]:
    return [type(e) for e in events]


def established(cfg: tcp.TcpConfig | None = None, window: int = 65535, wscale: int | None = None,
                isn: int = ISN, iss: int = ISS, mss: int = 1460) -> tcp.TcpConnection:
    conn = tcp.TcpConnection(mk(SYN, isn, window=window, wscale=wscale, mss=mss), 0.0, cfg, iss=iss)
    conn.accept(0.0)
    (synack,) = out(conn)
    assert synack.flags == SYN | ACK and synack.seq == iss and synack.ack == (isn + 1) & 0xFFFFFFFF
    conn.receive(mk(ACK, isn + 1, iss + 1, window=window), 0.01)
    assert conn.state is tcp.State.ESTABLISHED
    assert tcp.Established in kinds(conn.events())
    assert out(conn) == []
    return conn


# ---- handshake -----------------------------------------------------------------------------


def test_syn_waits_for_socks_then_synack_with_options() -> None:
    stack = tcp.TcpStack(tcp.TcpConfig(mtu=1500))
    conn, new = stack.receive(mk(SYN, ISN, wscale=8, mss=9000), 0.0)
    assert new and conn is not None and conn.state is tcp.State.SYN_RCVD
    assert out(conn) == []  # nothing until the SOCKS side says yes
    # the app retries its SYN meanwhile: still nothing, same flow
    again, new2 = stack.receive(mk(SYN, ISN, wscale=8), 0.5)
    assert again is conn and not new2 and out(conn) == []
    conn.accept(1.0)
    (sa,) = out(conn)
    assert sa.flags == SYN | ACK and sa.ack == ISN + 1
    assert sa.options.mss == 1460  # our MTU, not the app's
    assert sa.options.wscale == 7
    assert conn.mss == 1460 and conn.snd_wscale == 8


def test_no_window_scaling_unless_offered() -> None:
    conn = tcp.TcpConnection(mk(SYN, ISN), 0.0, iss=ISS)
    conn.accept(0.0)
    (sa,) = out(conn)
    assert sa.options.wscale is None and conn.rcv_wscale == 0


def test_refusal_becomes_rst() -> None:
    conn = tcp.TcpConnection(mk(SYN, ISN), 0.0, iss=ISS)
    conn.refuse()
    (rst,) = out(conn)
    assert rst.flags == RST | ACK and rst.ack == ISN + 1
    assert kinds(conn.events()) == [tcp.Closed]
    assert conn.state is tcp.State.CLOSED


def test_synack_retransmitted_with_backoff_then_gives_up() -> None:
    cfg = tcp.TcpConfig(rto_initial=1.0, max_retries=3)
    conn = tcp.TcpConnection(mk(SYN, ISN), 0.0, cfg, iss=ISS)
    conn.accept(0.0)
    assert len(out(conn)) == 1
    assert conn.next_deadline() == 1.0
    conn.on_timer(0.9)
    assert out(conn) == []
    times = []
    for _ in range(3):
        t = conn.next_deadline()
        assert t is not None
        conn.on_timer(t)
        (sa,) = out(conn)
        assert sa.flags == SYN | ACK
        times.append(t)
    assert times == [1.0, 3.0, 7.0]  # 1 s, then doubling
    conn.on_timer(conn.next_deadline() or 0)
    (rst,) = out(conn)
    assert rst.flags & RST
    assert kinds(conn.events()) == [tcp.Reset, tcp.Closed]


def test_duplicate_syn_after_accept_repeats_synack() -> None:
    conn = tcp.TcpConnection(mk(SYN, ISN), 0.0, iss=ISS)
    conn.accept(0.0)
    out(conn)
    conn.receive(mk(SYN, ISN), 0.1)
    (sa,) = out(conn)
    assert sa.flags == SYN | ACK and sa.seq == ISS


def test_app_reset_before_accept() -> None:
    conn = tcp.TcpConnection(mk(SYN, ISN), 0.0, iss=ISS)
    conn.receive(mk(RST, ISN + 1), 0.1)
    assert kinds(conn.events()) == [tcp.Reset, tcp.Closed]


# ---- receiving ---------------------------------------------------------------------------------


def test_in_order_data_is_acked_and_readable() -> None:
    conn = established()
    conn.receive(mk(ACK | PSH, ISN + 1, ISS + 1, b"hello"), 0.1)
    assert kinds(conn.events()) == [tcp.DataReceived]
    (a,) = out(conn)
    assert a.flags == ACK and a.ack == ISN + 6 and a.payload == b""
    assert conn.read() == b"hello"


def test_out_of_order_duplicate_and_overlapping_segments() -> None:
    conn = established()
    base = ISN + 1
    data = bytes(range(256)) * 8  # 2048 bytes
    pieces = [(0, 500), (500, 1000), (1000, 1500), (1500, 2048)]
    # deliver 3rd, 2nd, dup 3rd, 4th, overlapping 250..1100, then 1st
    order = [2, 1, 2, 3]
    for i in order:
        a, b = pieces[i]
        conn.receive(mk(ACK, base + a, ISS + 1, data[a:b]), 0.1)
        (dup,) = out(conn)
        assert dup.ack == base  # duplicate ACKs point at the hole
    conn.receive(mk(ACK, base + 250, ISS + 1, data[250:1100]), 0.1)
    out(conn)
    assert conn.readable == 0
    conn.receive(mk(ACK, base, ISS + 1, data[0:500]), 0.2)
    (ack,) = out(conn)
    assert ack.ack == base + 2048
    assert conn.read() == data
    # a stale retransmission of old data changes nothing but is re-acked
    conn.receive(mk(ACK, base, ISS + 1, data[:100]), 0.3)
    (re,) = out(conn)
    assert re.ack == base + 2048 and conn.readable == 0


def test_receive_window_bounds_memory_and_reopens() -> None:
    cfg = tcp.TcpConfig(rcv_buf=4096)
    conn = established(cfg)
    seq = ISN + 1
    for _ in range(4):
        conn.receive(mk(ACK, seq, ISS + 1, b"x" * 1024), 0.1)
        seq += 1024
    (a,) = out(conn)
    assert a.ack == seq and a.window == 0
    # data past a zero window is not taken (zero-window probe answered with ACK)
    conn.receive(mk(ACK, seq, ISS + 1, b"y"), 0.2)
    (probe_ack,) = out(conn)
    assert probe_ack.ack == seq and probe_ack.window == 0
    assert conn.memory == 4096
    assert conn.read(100) == b"x" * 100
    assert out(conn) == []  # 100 bytes is not worth a window update (SWS avoidance)
    conn.read()
    (upd,) = out(conn)
    assert upd.window == 4096 and upd.ack == seq


def test_fin_is_taken_even_in_a_zero_window() -> None:
    cfg = tcp.TcpConfig(rcv_buf=1024)
    conn = established(cfg)
    conn.receive(mk(ACK, ISN + 1, ISS + 1, b"x" * 1024), 0.1)
    assert out(conn)[0].window == 0
    conn.receive(mk(ACK | FIN, ISN + 1025, ISS + 1), 0.2)
    (a,) = out(conn)
    assert a.ack == ISN + 1026 and conn.state is tcp.State.CLOSE_WAIT
    assert conn.read() == b"x" * 1024 and conn.at_eof


def test_out_of_order_memory_is_bounded_by_window() -> None:
    cfg = tcp.TcpConfig(rcv_buf=4096)
    conn = established(cfg)
    # segments far beyond the window are refused outright
    conn.receive(mk(ACK, ISN + 1 + 8192, ISS + 1, b"z" * 1000), 0.1)
    out(conn)
    assert conn.memory == 0
    # segments inside the window but after a hole are kept, up to the window
    conn.receive(mk(ACK, ISN + 1 + 1000, ISS + 1, b"z" * 3096), 0.1)
    out(conn)
    assert conn.memory == 3096
    conn.receive(mk(ACK, ISN + 1 + 4096, ISS + 1, b"q" * 1000), 0.1)
    assert conn.memory == 3096


# ---- sending -------------------------------------------------------------------------------------


def test_send_respects_mss_and_peer_window() -> None:
    conn = established(window=3000, mss=1000)
    conn.send(b"a" * 10000, 0.1)
    segs = out(conn)
    assert [len(s.payload) for s in segs] == [1000, 1000, 1000]
    assert [s.seq for s in segs] == [ISS + 1, ISS + 1001, ISS + 2001]
    conn.receive(mk(ACK, ISN + 1, ISS + 2001, window=3000), 0.2)
    assert tcp.SendSpace in kinds(conn.events())
    segs = out(conn)
    assert [s.seq for s in segs] == [ISS + 3001, ISS + 4001]
    assert conn.unacked == 8000


def test_scaled_peer_window() -> None:
    conn = established(window=100, wscale=10, mss=1000)  # SYN window is unscaled: 100 bytes
    conn.receive(mk(ACK, ISN + 1, ISS + 1, window=4), 0.02)  # 4 << 10 = 4096
    conn.send(b"b" * 8000, 0.1)
    # 4 full segments fit in 4096; the 96-byte tail waits (sender silly-window avoidance)
    assert sum(len(s.payload) for s in out(conn)) == 4000


def test_retransmission_timeout_with_backoff() -> None:
    cfg = tcp.TcpConfig(rto_initial=1.0, rto_min=0.2)
    conn = established(cfg, mss=1000)
    conn.send(b"d" * 3000, 0.0)
    assert len(out(conn)) == 3
    assert conn.next_deadline() == pytest.approx(1.0)
    conn.on_timer(1.0)
    (r1,) = out(conn)  # only the head goes again (cwnd collapses to one segment)
    assert r1.seq == ISS + 1 and len(r1.payload) == 1000
    assert conn.next_deadline() == pytest.approx(3.0)
    conn.on_timer(3.0)
    (r2,) = out(conn)
    assert r2.seq == ISS + 1
    assert conn.next_deadline() == pytest.approx(7.0)
    # the app acks everything: no more retransmissions, timer stops
    conn.receive(mk(ACK, ISN + 1, ISS + 3001), 7.5)
    assert conn.next_deadline() is None and conn.unacked == 0
    conn.on_timer(20.0)
    assert out(conn) == []


def test_rto_follows_measured_rtt() -> None:
    cfg = tcp.TcpConfig(rto_initial=1.0, rto_min=0.2)
    conn = established(cfg, mss=1000)
    t = 1.0
    for _ in range(5):
        conn.send(b"r" * 1000, t)
        out(conn)
        conn.receive(mk(ACK, ISN + 1, conn.snd_nxt), t + 0.01)
        t += 1
    assert conn.srtt == pytest.approx(0.01, rel=0.01)
    assert conn.rto == pytest.approx(0.2)  # clamped at rto_min


def test_go_back_n_after_timeout_and_cumulative_ack_skips_ahead() -> None:
    cfg = tcp.TcpConfig(rto_initial=1.0)
    conn = established(cfg, mss=1000)
    conn.send(b"e" * 5000, 0.0)
    assert len(out(conn)) == 5
    conn.on_timer(1.0)
    (r,) = out(conn)
    assert r.seq == ISS + 1
    # the app had everything except the first segment: one ACK covers all
    conn.receive(mk(ACK, ISN + 1, ISS + 5001), 1.1)
    assert out(conn) == [] and conn.unacked == 0


def test_fast_retransmit_on_three_duplicate_acks() -> None:
    conn = established(mss=1000)
    conn.send(b"f" * 6000, 0.0)
    assert len(out(conn)) == 6
    conn.receive(mk(ACK, ISN + 1, ISS + 1001), 0.01)
    out(conn)
    for i in range(3):
        conn.receive(mk(ACK, ISN + 1, ISS + 1001), 0.02 + i * 0.001)
    segs = out(conn)
    assert [s.seq for s in segs] == [ISS + 1001]


def test_zero_window_persist_probe_and_reopen() -> None:
    cfg = tcp.TcpConfig(rto_initial=1.0)
    conn = established(cfg, mss=1000)
    conn.send(b"g" * 2000, 0.0)
    out(conn)
    conn.receive(mk(ACK, ISN + 1, ISS + 2001, window=0), 0.1)  # app stops reading
    conn.send(b"h" * 3000, 0.2)
    assert out(conn) == []
    when = conn.next_deadline()
    assert when is not None
    conn.on_timer(when)
    (probe,) = out(conn)
    assert probe.flags == ACK and probe.payload == b"" and probe.seq == ISS + 2000  # old seq: elicits an ACK
    conn.receive(mk(ACK, ISN + 1, ISS + 2001, window=0), when + 0.01)  # still closed
    assert conn.state is tcp.State.ESTABLISHED and out(conn) == []
    # probes continue with backoff while the app answers; the flow survives many of them
    for _ in range(20):
        when = conn.next_deadline()
        assert when is not None
        conn.on_timer(when)
        assert len(out(conn)) == 1
        conn.receive(mk(ACK, ISN + 1, ISS + 2001, window=0), when + 0.01)
    assert conn.state is tcp.State.ESTABLISHED
    conn.receive(mk(ACK, ISN + 1, ISS + 2001, window=65535), 400.0)
    assert sum(len(s.payload) for s in out(conn)) == 3000


# ---- closing ------------------------------------------------------------------------------------------


def test_app_half_close_then_we_keep_sending() -> None:
    conn = established()
    conn.receive(mk(ACK | FIN, ISN + 1, ISS + 1, b"req"), 0.1)
    assert conn.state is tcp.State.CLOSE_WAIT
    ev = kinds(conn.events())
    assert tcp.DataReceived in ev and tcp.EofReceived not in ev  # EOF only after the data is read
    (a,) = out(conn)
    assert a.ack == ISN + 5  # 3 bytes + FIN
    assert conn.read() == b"req" and conn.at_eof
    assert kinds(conn.events()) == [tcp.EofReceived]
    conn.send(b"response", 0.2)
    (d,) = out(conn)
    assert d.payload == b"response"
    conn.shutdown(0.3)
    (f,) = out(conn)
    assert f.flags & FIN and f.seq == ISS + 9
    assert conn.state is tcp.State.LAST_ACK
    conn.receive(mk(ACK, ISN + 5, ISS + 10), 0.4)
    assert conn.state is tcp.State.CLOSED
    assert tcp.Closed in kinds(conn.events())


def test_we_half_close_then_app_keeps_sending() -> None:
    cfg = tcp.TcpConfig(time_wait=2.0)
    conn = established(cfg)
    conn.send(b"banner", 0.1)
    conn.shutdown(0.1)
    segs = out(conn)
    assert segs[-1].flags & FIN and b"".join(s.payload for s in segs) == b"banner"
    conn.receive(mk(ACK, ISN + 1, ISS + 8), 0.2)
    assert conn.state is tcp.State.FIN_WAIT_2
    conn.receive(mk(ACK, ISN + 1, ISS + 8, b"more from app"), 0.3)
    assert conn.read() == b"more from app"
    out(conn)
    conn.receive(mk(ACK | FIN, ISN + 14, ISS + 8), 0.4)
    assert conn.state is tcp.State.TIME_WAIT
    (a,) = out(conn)
    assert a.ack == ISN + 15
    # a retransmitted FIN in TIME_WAIT is acked again and restarts the timer
    conn.receive(mk(ACK | FIN, ISN + 14, ISS + 8), 1.0)
    assert out(conn)[0].ack == ISN + 15
    assert conn.next_deadline() == pytest.approx(3.0)
    conn.on_timer(3.0)
    assert conn.state is tcp.State.CLOSED and tcp.Closed in kinds(conn.events())


def test_unread_bytes_survive_a_graceful_close_but_not_a_reset() -> None:
    cfg = tcp.TcpConfig(time_wait=1.0)
    conn = established(cfg)
    conn.shutdown(0.1)
    out(conn)
    conn.receive(mk(ACK | FIN, ISN + 1, ISS + 2, b"late bytes"), 0.2)  # acks our FIN, sends data + FIN
    assert conn.state is tcp.State.TIME_WAIT
    conn.on_timer(1.2)
    assert conn.state is tcp.State.CLOSED and tcp.Closed in kinds(conn.events())
    assert conn.read() == b"late bytes" and conn.at_eof
    other = established()
    other.receive(mk(ACK | PSH, ISN + 1, ISS + 1, b"lost"), 0.1)
    other.receive(mk(RST, ISN + 5, 0), 0.2)
    assert other.read() == b""


def test_simultaneous_close() -> None:
    conn = established()
    conn.shutdown(0.1)
    (f,) = out(conn)
    assert f.flags & FIN
    conn.receive(mk(ACK | FIN, ISN + 1, ISS + 1), 0.2)  # app's FIN crosses ours (does not ack it)
    assert conn.state is tcp.State.CLOSING
    out(conn)
    conn.receive(mk(ACK, ISN + 2, ISS + 2), 0.3)
    assert conn.state is tcp.State.TIME_WAIT


def test_lost_fin_is_retransmitted() -> None:
    cfg = tcp.TcpConfig(rto_initial=1.0)
    conn = established(cfg)
    conn.shutdown(0.0)
    out(conn)
    conn.on_timer(1.0)
    (f,) = out(conn)
    assert f.flags & FIN and f.seq == ISS + 1


def test_out_of_order_fin_waits_for_the_hole() -> None:
    conn = established()
    conn.receive(mk(ACK | FIN, ISN + 6, ISS + 1, b"world"), 0.1)
    assert conn.state is tcp.State.ESTABLISHED and not conn.peer_fin
    conn.receive(mk(ACK, ISN + 1, ISS + 1, b"hello"), 0.2)
    assert conn.read() == b"helloworld" and conn.at_eof
    assert conn.state is tcp.State.CLOSE_WAIT


def test_a_fin_before_stored_out_of_order_bytes_still_closes() -> None:
    """Bytes stored out of order past where the app's FIN later says the stream ends (a
    crafted sequence): they are dropped at the FIN, so filling the hole reaches the FIN
    and the flow closes, instead of merging past it and never counting it."""
    conn = established()
    conn.receive(mk(ACK, ISN + 6, ISS + 1, b"world and more"), 0.1)  # stored, past a hole
    conn.receive(mk(ACK | FIN, ISN + 6, ISS + 1, b"world"), 0.2)  # the stream ends after "world"
    conn.receive(mk(ACK, ISN + 1, ISS + 1, b"hello"), 0.3)
    assert conn.read() == b"helloworld" and conn.at_eof
    assert conn.state is tcp.State.CLOSE_WAIT


def test_rst_from_app_exact_inwindow_and_outside() -> None:
    conn = established()
    conn.receive(mk(RST, ISN + 100, 0), 0.1)  # in window, not exact: challenge ACK
    (c,) = out(conn)
    assert c.flags == ACK and conn.state is tcp.State.ESTABLISHED
    conn.receive(mk(RST, ISN + 10_000_000, 0), 0.1)  # outside: ignored
    assert out(conn) == [] and conn.state is tcp.State.ESTABLISHED
    conn.receive(mk(RST, ISN + 1, 0), 0.2)
    assert conn.state is tcp.State.CLOSED
    assert kinds(conn.events()) == [tcp.Reset, tcp.Closed]


def test_abort_sends_rst_and_drops_buffers() -> None:
    conn = established()
    conn.send(b"x" * 5000, 0.0)
    out(conn)
    conn.abort()
    (r,) = out(conn)
    assert r.flags & RST and conn.memory == 0 and conn.state is tcp.State.CLOSED


def test_stray_segments_get_rst_and_strays_rst_are_ignored() -> None:
    stack = tcp.TcpStack()
    conn, new = stack.receive(mk(ACK, 123, 456), 0.0)
    assert conn is None and not new
    (r,) = [ip.parse_packet(p) for p in stack.out]
    assert isinstance(r, ip.TcpSegment) and r.flags == RST and r.seq == 456
    stack.out.clear()
    stack.receive(mk(RST, 1, 0), 0.0)
    assert stack.out == []


def test_flow_limit_refuses_with_rst() -> None:
    stack = tcp.TcpStack(max_flows=1)
    a, _ = stack.receive(mk(SYN, ISN), 0.0)
    assert a is not None
    seg = mk(SYN, ISN)
    seg.sport = APORT + 1
    b, _ = stack.receive(seg, 0.0)
    assert b is None and len(stack.out) == 1


def test_new_syn_in_time_wait_starts_new_flow() -> None:
    stack = tcp.TcpStack()
    conn, _ = stack.receive(mk(SYN, ISN), 0.0)
    assert conn is not None
    conn.accept(0.0)
    out(conn)
    stack.receive(mk(ACK, ISN + 1, conn.iss + 1), 0.1)
    conn.shutdown(0.2)
    out(conn)
    stack.receive(mk(ACK | FIN, ISN + 1, conn.iss + 2), 0.3)
    assert conn.state is tcp.State.TIME_WAIT
    fresh, new = stack.receive(mk(SYN, ISN + 100000), 0.5)
    assert new and fresh is not conn and fresh is not None


def test_sequence_numbers_wrap_around() -> None:
    isn, iss = 0xFFFFFFF0, 0xFFFFFFF8
    conn = established(isn=isn, iss=iss, mss=1000)
    conn.receive(mk(ACK, (isn + 1) & 0xFFFFFFFF, (iss + 1) & 0xFFFFFFFF, b"A" * 100), 0.1)
    assert conn.read() == b"A" * 100
    (a,) = out(conn)
    assert a.ack == (isn + 101) & 0xFFFFFFFF
    conn.send(b"B" * 50, 0.2)
    (d,) = out(conn)
    assert d.seq == (iss + 1) & 0xFFFFFFFF
    conn.receive(mk(ACK, (isn + 101) & 0xFFFFFFFF, (iss + 51) & 0xFFFFFFFF), 0.3)
    assert conn.unacked == 0


# ---- a long transfer over a bad network -----------------------------------------------------------------


class LossyPeer:
    """A small, deliberately simple TCP app: go-back-N sender, cumulative-ACK receiver."""

    def __init__(self, upload: bytes, rng: random.Random, mss: int, window: int):
        self.rng = rng
        self.mss = mss
        self.window = window
        self.upload = upload
        self.snd_una = 0  # offsets into upload
        self.snd_nxt = 0
        self.peer_wnd = 0
        self.last_progress = 0.0
        self.fin_sent_acked = False
        self.received = bytearray()
        self.ooo: dict[int, bytes] = {}
        self.eof = False
        self.rcv_base = 0  # our ISS + 1 (wire)
        self.snd_base = ISN + 1

    def on_segment(self, s: ip.TcpSegment, now: float) -> list[ip.TcpSegment]:
        replies = []
        ack_off = (s.ack - self.snd_base) & 0xFFFFFFFF
        if ack_off <= len(self.upload) + 1 and ack_off > self.snd_una:
            self.snd_una = ack_off
            self.last_progress = now
        self.snd_una = max(self.snd_una, 0)
        self.peer_wnd = s.window << 7
        off = (s.seq - self.rcv_base) & 0xFFFFFFFF
        if s.payload or s.flags & FIN:
            if s.payload and off < 1 << 30:
                if off <= len(self.received) < off + len(s.payload):
                    self.received += s.payload[len(self.received) - off :]
                elif off > len(self.received):
                    self.ooo[off] = s.payload
                while True:
                    nxt = [k for k in self.ooo if k <= len(self.received)]
                    if not nxt:
                        break
                    for k in nxt:
                        d = self.ooo.pop(k)
                        if k + len(d) > len(self.received):
                            self.received += d[len(self.received) - k :]
            if s.flags & FIN and off + len(s.payload) == len(self.received):
                self.eof = True
            replies.append(self._seg(ACK))
        return replies

    def _seg(self, flags: int, seq_off: int | None = None, payload: bytes = b"") -> ip.TcpSegment:
        seq = self.snd_base + (self.snd_nxt if seq_off is None else seq_off)
        ack = self.rcv_base + len(self.received) + (1 if self.eof else 0)
        return mk(flags, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, payload, window=self.window >> 7)

    def sendable(self, now: float) -> list[ip.TcpSegment]:
        if now - self.last_progress > 0.3 and self.snd_nxt > self.snd_una:
            self.snd_nxt = self.snd_una  # timeout: go back N
            self.last_progress = now
        segs = []
        limit = self.snd_una + max(self.peer_wnd, 0)
        while self.snd_nxt < len(self.upload) and self.snd_nxt < limit:
            n = min(self.mss, len(self.upload) - self.snd_nxt, limit - self.snd_nxt)
            segs.append(self._seg(ACK, self.snd_nxt, self.upload[self.snd_nxt : self.snd_nxt + n]))
            self.snd_nxt += n
        if self.snd_nxt == len(self.upload) and self.snd_una == len(self.upload) and not self.fin_sent_acked:
            segs.append(self._seg(ACK | FIN, len(self.upload)))
        if self.snd_una == len(self.upload) + 1:
            self.fin_sent_acked = True
        return segs


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_long_transfer_both_ways_with_random_loss_dup_and_reorder(seed: int) -> None:
    rng = random.Random(seed)
    size = 400_000
    down = rng.randbytes(size)
    up = rng.randbytes(size)
    cfg = tcp.TcpConfig(mtu=1040, rcv_buf=32 * 1024, snd_buf=32 * 1024, rto_min=0.2, max_retries=30)
    conn = tcp.TcpConnection(mk(SYN, ISN, window=65535, wscale=7, mss=1000), 0.0, cfg, iss=ISS)
    peer = LossyPeer(up, rng, mss=1000, window=64 * 1024)
    peer.rcv_base = ISS + 1
    conn.accept(0.0)
    conn.receive(mk(ACK, ISN + 1, ISS + 1, window=(64 * 1024) >> 7), 0.0)
    out(conn)
    net: list[tuple[float, int, str, ip.TcpSegment]] = []  # (arrival, tiebreak, direction, segment)
    tie = 0

    def transmit(direction: str, segs: list[ip.TcpSegment], now: float) -> None:
        nonlocal tie
        for s in segs:
            r = rng.random()
            if r < 0.05:
                continue  # lost
            copies = 2 if r > 0.97 else 1  # duplicated
            for _ in range(copies):
                tie += 1
                heapq.heappush(net, (now + rng.uniform(0.001, 0.02), tie, direction, s))  # reordered by jitter

    sent = 0
    got = bytearray()
    now = 0.0
    step = 0.001
    shut = False
    while now < 300.0:
        now += step
        # our app side: feed the download and drain the upload, respecting space
        space = conn.send_space
        if sent < size and space:
            chunk = down[sent : sent + min(space, 7000)]
            conn.send(chunk, now)
            sent += len(chunk)
        if sent == size and not shut:
            conn.shutdown(now)
            shut = True
        got += conn.read()
        when = conn.next_deadline()
        if when is not None and now >= when:
            conn.on_timer(now)
        transmit("to_app", out(conn), now)
        transmit("to_us", peer.sendable(now), now)
        while net and net[0][0] <= now:
            _, _, direction, s = heapq.heappop(net)
            if direction == "to_app":
                transmit("to_us", peer.on_segment(s, now), now)
            else:
                conn.receive(s, now)
        conn.events()
        if conn.state in (tcp.State.TIME_WAIT, tcp.State.CLOSED) and peer.eof:
            break
    got += conn.read()
    assert hashlib.sha256(bytes(peer.received)).digest() == hashlib.sha256(down).digest()
    assert peer.eof
    assert hashlib.sha256(bytes(got)).digest() == hashlib.sha256(up).digest()
    assert conn.at_eof
    assert conn.state in (tcp.State.TIME_WAIT, tcp.State.CLOSED)


# ---- fuzz: any segment sequence keeps the engine sane ------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_segment = st.tuples(
    st.sampled_from([ACK, ACK | PSH, ACK | FIN, RST, SYN, ACK | RST, SYN | ACK, FIN, 0]),
    st.one_of(st.just(0), st.integers(-3000, 3000), st.integers(-70000, 70000)),  # seq vs what the engine expects
    st.one_of(st.just(0), st.integers(-3000, 0), st.integers(-70000, 70000)),  # ack vs what the engine sent
    st.binary(max_size=3000),
    st.integers(0, 65535),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_segment, st.sampled_from(["send", "read", "shutdown", "timer"])), max_size=40))
def test_random_segments_and_calls_never_break_invariants(steps: list[object]) -> None:
    cfg = tcp.TcpConfig(rcv_buf=8192, snd_buf=8192)
    conn = established(cfg, mss=1000)
    now = 0.1
    for step in steps:
        now += 0.05
        if step == "send":
            conn.send(b"s" * min(conn.send_space, 5000), now)
        elif step == "read":
            conn.read()
        elif step == "shutdown":
            conn.shutdown(now)
        elif step == "timer":
            when = conn.next_deadline()
            if when is not None:
                now = max(now, when)
                conn.on_timer(now)
        else:
            flags, dseq, dack, payload, window = step  # type: ignore[misc]
            seq = (conn.rcv_nxt + dseq) & 0xFFFFFFFF
            ack = (conn.snd_nxt + dack) & 0xFFFFFFFF
            conn.receive(mk(flags, seq, ack, payload, window=window, mss=None), now)
        for pkt in conn.packets_to_send():
            assert isinstance(ip.parse_packet(pkt), ip.TcpSegment)
        conn.events()
        assert conn.readable + conn._ooo_bytes <= cfg.rcv_buf
        assert conn.unacked <= cfg.snd_buf
        assert conn.snd_una <= conn.snd_nxt <= conn.snd_max


def test_out_of_order_pieces_are_capped() -> None:
    """Many tiny out-of-order segments: at most MAX_OOO_SEGMENTS are held (the rest are
    dropped, the app retransmits); filling the gap delivers what was held, in order."""
    conn = established()
    base = ISN + 1
    for i in range(1, 200):  # one byte each, every other byte: a gap before each
        conn.receive(mk(ACK, base + 2 * i, ISS + 1, bytes([i])), 0.1)
    assert len(conn._ooo) == tcp.MAX_OOO_SEGMENTS
    conn.receive(mk(ACK, base, ISS + 1, b"\x00" * 2), 0.2)  # fills the first gap only
    assert conn.read() == b"\x00\x00\x01"
    assert len(conn._ooo) == tcp.MAX_OOO_SEGMENTS - 1


@pytest.mark.parametrize("v6,announced,want", [(False, 1, 536), (False, 88, 536), (False, 1400, 1400),
                                               (True, 1, 1220), (True, None, 1220)])
def test_tiny_mss_is_raised_to_a_floor(v6: bool, announced: int | None, want: int) -> None:
    """An MSS of 1 would make every byte a packet (CVE-2019-11479's lesson): floor 536 / 1220."""
    if v6:
        syn = ip.parse_packet(ip.build_tcp(bytes(15) + b"\x02", bytes(15) + b"\x03", APORT, DPORT, ISN, 0, SYN,
                                           65535, b"", ip.tcp_syn_options(announced, None) if announced else b""))
    else:
        syn = mk(SYN, ISN, mss=announced)
    assert isinstance(syn, ip.TcpSegment)
    assert tcp.TcpConnection(syn, 0.0, None, iss=ISS).mss == want


def test_out_of_order_bytes_do_not_shrink_the_window() -> None:
    """A lost segment, then four that arrive: they lie inside the window we offered, so
    the window's right edge stays put (RFC 7323 §2.4), and once the hole is filled all
    five are taken. (Counting them twice moved the edge left and dropped 2,220 of 7,300.)"""
    cfg = tcp.TcpConfig(mtu=1500, rcv_buf=8000)
    conn = established(cfg)
    base, mss = ISN + 1, 1460
    segs = [(base + i * mss, bytes([65 + i]) * mss) for i in range(5)]
    for seq, data in segs[1:]:
        conn.receive(mk(ACK | PSH, seq, ISS + 1, data), 1.0)
        (ack,) = out(conn)
        assert ack.ack == base and ack.ack + ack.window == base + 8000  # same right edge
    conn.receive(mk(ACK | PSH, segs[0][0], ISS + 1, segs[0][1]), 1.1)
    out(conn)
    assert conn.rcv_nxt == base + 5 * mss


def test_an_old_ack_does_not_set_the_window() -> None:
    """A segment whose ACK is older than what is already acknowledged (reordered on the
    way) carries a stale window: it must not close or open the window we send into."""
    conn = established(window=65535)
    conn.send(b"x" * 3000, 0.0)
    out(conn)
    conn.receive(mk(ACK, ISN + 1, ISS + 1 + 3000, window=65535), 0.1)  # all acknowledged
    conn.receive(mk(ACK | PSH, ISN + 1, ISS + 1 + 3000, b"hi", window=65535), 0.2)
    # newer data, but an ACK from before (the app's stack reordered): its window 0 is stale
    conn.receive(mk(ACK | PSH, ISN + 3, ISS + 1 + 1000, b"yo", window=0), 0.3)
    assert conn.read() == b"hiyo" and conn.snd_wnd == 65535
