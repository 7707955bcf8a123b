"""Sans-I/O userspace TCP endpoint: segments in -> packets out + stream events.

One :class:`TcpConnection` is the passive (server) end of one TCP flow that an
application started through the TUN. It never touches sockets or clocks: every
call that can start or fire a timer takes ``now`` (seconds, monotonic) and the
caller asks :meth:`TcpConnection.next_deadline` when to call
:meth:`TcpConnection.on_timer` again.

Sequence numbers are kept internally as unbounded integers (wire values are
unwrapped against the current reference point), so comparisons are ordinary
``<`` / ``>``.

Memory per flow is bounded by ``TcpConfig.rcv_buf`` (in-order unread data plus
out-of-order segments never exceed it; the advertised window is what is left)
and ``TcpConfig.snd_buf`` (the caller checks :attr:`send_space` before
:meth:`send`).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

from . import ip
from .ip import ACK, FIN, PSH, RST, SYN, TcpSegment

MOD = 1 << 32
HALF = 1 << 31
# Out-of-order segments held per flow. On a TUN the app's kernel reorders rarely; a
# peer sending many tiny out-of-order segments would otherwise cost ~70 bytes of
# bookkeeping per payload byte and a sort per in-order segment.
MAX_OOO_SEGMENTS = 64
# Smallest MSS we honour (the app's SYN may announce less): Linux's floor idea
# (CVE-2019-11479) — 1-byte segments would cost a packet per byte.
MIN_MSS_V4, MIN_MSS_V6 = 536, 1220


def unwrap(wire: int, ref: int) -> int:
    """The unbounded sequence number closest to ``ref`` whose low 32 bits are ``wire``."""
    return ref + ((wire - ref + HALF) % MOD) - HALF


class State(enum.Enum):
    SYN_RCVD = "SYN_RCVD"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN_WAIT_1"
    FIN_WAIT_2 = "FIN_WAIT_2"
    CLOSING = "CLOSING"
    TIME_WAIT = "TIME_WAIT"
    CLOSE_WAIT = "CLOSE_WAIT"
    LAST_ACK = "LAST_ACK"
    CLOSED = "CLOSED"


_CAN_SEND = {State.ESTABLISHED, State.CLOSE_WAIT, State.FIN_WAIT_1, State.LAST_ACK, State.CLOSING}
_CAN_RECEIVE = {State.ESTABLISHED, State.FIN_WAIT_1, State.FIN_WAIT_2}
_OPEN_FOR_WRITE = {State.SYN_RCVD, State.ESTABLISHED, State.CLOSE_WAIT}


# ---- events -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Established:
    """The three-way handshake completed."""


@dataclass(frozen=True, slots=True)
class DataReceived:
    """New in-order bytes can be taken with :meth:`TcpConnection.read`."""


@dataclass(frozen=True, slots=True)
class EofReceived:
    """The app sent FIN (half-close); it comes after all data has been read."""


@dataclass(frozen=True, slots=True)
class SendSpace:
    """Acknowledged data freed room in the send buffer."""


@dataclass(frozen=True, slots=True)
class Reset:
    """The flow was aborted (RST from the app, or retransmissions gave up)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Closed:
    """The flow is finished and its state can be forgotten."""


Event = Established | DataReceived | EofReceived | SendSpace | Reset | Closed


@dataclass(slots=True)
class TcpConfig:
    mtu: int = 1500
    rcv_buf: int = 256 * 1024  # bytes held for the SOCKS side (in order + out of order)
    snd_buf: int = 256 * 1024  # bytes from the SOCKS side not yet acked by the app
    wscale: int = 7  # our window scale shift, used when the app offers scaling
    rto_initial: float = 1.0
    rto_min: float = 0.2
    rto_max: float = 30.0
    max_retries: int = 8
    time_wait: float = 2.0  # 2*MSL, short: the peer is a local application
    initial_cwnd_segments: int = 10
    checksums: bool = True  # False when the device takes our word for it (checksum offload)

    @property
    def mss(self) -> int:
        """Our MSS over IPv4 (IPv6 headers take 20 bytes more)."""
        return self.mtu - 40


class TcpConnection:
    """The passive end of one TCP flow (see module doc)."""

    def __init__(self, syn: TcpSegment, now: float, config: TcpConfig | None = None, iss: int | None = None):
        cfg = config or TcpConfig()
        self.config = cfg
        self.local_ip, self.local_port = syn.dst, syn.dport  # what the app connected to
        self.remote_ip, self.remote_port = syn.src, syn.sport  # the app
        self.state = State.SYN_RCVD
        self.accepted = False
        self._out: list[bytes] = []
        self._events: list[Event] = []
        # receive side
        self.irs = syn.seq
        self.rcv_nxt = syn.seq + 1
        self._rcvbuf = bytearray()
        self._ooo: dict[int, bytes] = {}
        self._ooo_bytes = 0
        self._peer_fin_seq: int | None = None  # seq of the app's FIN once seen (maybe out of order)
        self.peer_fin = False  # FIN received in order
        self._eof_reported = False
        self._adv_edge = self.rcv_nxt  # right edge of the window we advertised
        self._ack_pending = False
        # options
        if syn.options.wscale is not None:
            self.snd_wscale, self.rcv_wscale = syn.options.wscale, cfg.wscale
        else:
            self.snd_wscale, self.rcv_wscale = 0, 0
        v6 = len(syn.src) == 16
        self.our_mss = cfg.mtu - (60 if v6 else 40)
        floor = MIN_MSS_V6 if v6 else MIN_MSS_V4
        self.mss = min(max(syn.options.mss or floor, floor), self.our_mss)
        # send side
        self.iss = (int.from_bytes(os.urandom(4), "big") if iss is None else iss) & 0xFFFFFFFF
        self.snd_una = self.iss
        self.snd_nxt = self.iss
        self.snd_max = self.iss
        self.snd_wnd = syn.window  # window in a SYN is never scaled
        self.snd_max_wnd = max(self.snd_wnd, 1)
        self._wl1 = syn.seq
        self._wl2 = self.iss
        self._sndbuf = bytearray()
        self._buf_seq = self.iss + 1  # sequence number of _sndbuf[0]
        self._fin_queued = False
        self.cwnd = cfg.initial_cwnd_segments * self.mss
        self.ssthresh = 1 << 30
        self._dupacks = 0
        # timers
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = cfg.rto_initial
        self.retries = 0
        self._rto_deadline: float | None = None
        self._persist = False
        self._rtt_sample: tuple[int, float] | None = None
        self._tw_deadline: float | None = None
        self.created = now
        self.last_activity = now  # last segment from the app or bytes for it (idle timeout)

    # ---- public API: caller -> connection ------------------------------------

    @property
    def key(self) -> tuple[bytes, int, bytes, int]:
        return (self.remote_ip, self.remote_port, self.local_ip, self.local_port)

    def accept(self, now: float) -> None:
        """The SOCKS side connected: answer the SYN with SYN-ACK."""
        if self.state is not State.SYN_RCVD or self.accepted:
            return
        self.accepted = True
        self.snd_nxt = self.snd_max = self.iss + 1
        self._send_synack()
        self._arm_rto(now)

    def refuse(self) -> None:
        """The SOCKS side refused: answer the SYN with RST (the app sees ECONNREFUSED)."""
        if self.state is State.CLOSED:
            return
        if self.state is State.SYN_RCVD and not self.accepted:
            self._emit(0, self.rcv_nxt, RST | ACK, window=0)
            self._close(None)
        else:
            self.abort()

    def send(self, data: bytes | memoryview, now: float) -> None:
        """Queue bytes for the app. The caller keeps within :attr:`send_space`."""
        if not data or self.state not in _OPEN_FOR_WRITE or self._fin_queued:
            return
        self.last_activity = now
        self._sndbuf += data
        self._output(now)

    @property
    def send_space(self) -> int:
        if self.state not in _OPEN_FOR_WRITE or self._fin_queued:
            return 0
        return max(0, self.config.snd_buf - len(self._sndbuf))

    @property
    def unacked(self) -> int:
        """Bytes queued for the app that it has not acknowledged yet."""
        return len(self._sndbuf)

    def shutdown(self, now: float) -> None:
        """No more data for the app: send FIN after the queued bytes (half-close)."""
        if self._fin_queued or self.state not in _OPEN_FOR_WRITE:
            return
        self._fin_queued = True
        if self.state is State.CLOSE_WAIT:
            self.state = State.LAST_ACK
        elif self.state is State.ESTABLISHED:
            self.state = State.FIN_WAIT_1
        elif self.state is State.SYN_RCVD:
            pass  # FIN goes out once the handshake completes
        self._output(now)

    def abort(self) -> None:
        """Send RST and forget the flow."""
        if self.state is State.CLOSED:
            return
        if self.state is not State.SYN_RCVD or self.accepted:
            self._emit(self.snd_nxt, self.rcv_nxt, RST | ACK, window=0)
        else:
            self._emit(0, self.rcv_nxt, RST | ACK, window=0)
        self._close(Reset("aborted"))

    def read(self, max_bytes: int = -1) -> bytes:
        """Take received in-order bytes (opens the receive window)."""
        if max_bytes < 0 or max_bytes >= len(self._rcvbuf):
            data = bytes(self._rcvbuf)
            self._rcvbuf.clear()
        else:
            data = bytes(self._rcvbuf[:max_bytes])
            del self._rcvbuf[:max_bytes]
        if data and self.state in _CAN_RECEIVE:
            # window update when the edge moves by a useful amount (receiver SWS avoidance)
            new_edge = self.rcv_nxt + self._rcv_wnd()
            if new_edge - self._adv_edge >= min(self.config.rcv_buf // 2, self.mss):
                self._ack_pending = True
        self._maybe_report_eof()
        return data

    @property
    def readable(self) -> int:
        return len(self._rcvbuf)

    @property
    def at_eof(self) -> bool:
        """The app half-closed and every byte before its FIN has been read."""
        return self.peer_fin and not self._rcvbuf

    def packets_to_send(self) -> list[bytes]:
        """Drain packets for the TUN (a pure ACK is added if one is owed)."""
        if self._ack_pending and self.state is not State.CLOSED:
            self._emit(self.snd_nxt, self.rcv_nxt, ACK)
        out, self._out = self._out, []
        return out

    def events(self) -> list[Event]:
        ev, self._events = self._events, []
        return ev

    def next_deadline(self) -> float | None:
        if self.state is State.TIME_WAIT:
            return self._tw_deadline
        return self._rto_deadline

    @property
    def memory(self) -> int:
        """Bytes of payload this flow holds right now."""
        return len(self._rcvbuf) + self._ooo_bytes + len(self._sndbuf)

    # ---- segment arrival -----------------------------------------------------

    def receive(self, seg: TcpSegment, now: float) -> None:
        st = self.state
        if st is State.CLOSED:
            return
        self.last_activity = now
        flags = seg.flags
        seq = unwrap(seg.seq, self.rcv_nxt)

        if st is State.SYN_RCVD and not self.accepted:
            # only the app giving up (RST) matters before we answered the SYN
            if flags & RST:
                self._close(Reset("reset by app"))
            return

        if flags & RST:
            wnd = self._rcv_wnd()
            if seq == self.rcv_nxt or (st is State.SYN_RCVD and seq == self.irs + 1):
                if st is State.TIME_WAIT:
                    self._close(None, graceful=True)
                else:
                    self._close(Reset("reset by app"))
            elif self.rcv_nxt < seq < self.rcv_nxt + max(wnd, 1):
                self._ack_pending = True  # RFC 5961 challenge ACK
            return

        if flags & SYN:
            if st is State.SYN_RCVD and seq == self.irs:
                self._send_synack()  # our SYN-ACK was lost
            else:
                self._ack_pending = True  # challenge ACK
            return

        if st is State.TIME_WAIT:
            if flags & FIN:  # the app did not get our ACK of its FIN
                self._ack_pending = True
                self._tw_deadline = now + self.config.time_wait
            return

        payload = seg.payload
        seg_len = len(payload) + (1 if flags & FIN else 0)
        wnd = self._rcv_wnd()
        # a bare FIN at the expected place takes no buffer space: accept it even in a zero window
        acceptable = self._acceptable(seq, seg_len, wnd) or (seg_len == 1 and not payload and seq == self.rcv_nxt)
        if not acceptable:
            # out of window (old duplicate or zero window): its ACK may still be news
            if flags & ACK and seq <= self.rcv_nxt + wnd:
                self._process_ack(seg, seq, now)
            self._ack_pending = True
            self._output(now)
            return

        if not flags & ACK:
            return
        if not self._process_ack(seg, seq, now):
            return
        if self.state is State.CLOSED or self.state is State.TIME_WAIT and not flags & FIN:
            return

        if payload and self.state in _CAN_RECEIVE and not self.peer_fin:
            self._receive_data(seq, payload)
        if flags & FIN and self.state in _CAN_RECEIVE | {State.CLOSE_WAIT, State.CLOSING, State.LAST_ACK, State.TIME_WAIT}:
            fin_seq = seq + len(payload)
            if self._peer_fin_seq is None and self.rcv_nxt <= fin_seq <= self.rcv_nxt + max(wnd, 0):
                self._peer_fin_seq = fin_seq
                self._trim_ooo(fin_seq)  # nothing lies past the FIN, whatever came before it
            self._ack_pending = True
        self._check_fin(now)
        self._output(now)

    def _acceptable(self, seq: int, seg_len: int, wnd: int) -> bool:
        nxt = self.rcv_nxt
        if seg_len == 0:
            return seq == nxt if wnd == 0 else nxt <= seq < nxt + wnd or seq == nxt
        if wnd == 0:
            return False
        end = seq + seg_len - 1
        return nxt <= seq < nxt + wnd or nxt <= end < nxt + wnd or (seq < nxt and end >= nxt + wnd)

    def _process_ack(self, seg: TcpSegment, seq: int, now: float) -> bool:
        """Handle the ACK field; False means drop the rest of the segment."""
        ack = unwrap(seg.ack, self.snd_una)
        if self.state is State.SYN_RCVD:
            if self.snd_una < ack <= self.snd_max:
                self.snd_una = ack
                self.state = State.ESTABLISHED
                self._events.append(Established())
                self._rto_deadline = None
                self.retries = 0
                self._update_window(seg, seq, ack, force=True)
                if self._fin_queued:
                    self.state = State.FIN_WAIT_1
                return True
            self._emit(ack, 0, RST, window=0)
            return False
        if ack > self.snd_max:
            self._ack_pending = True  # acks something we never sent
            return False
        old_wnd = self.snd_wnd
        if ack > self.snd_una:
            self._ack_advanced(ack, now)
        elif ack == self.snd_una and not seg.payload and not seg.flags & FIN:
            wnd = seg.window << self.snd_wscale
            if self.snd_max > self.snd_una and wnd == old_wnd:
                self._dupacks += 1
                if self._dupacks == 3:
                    self._fast_retransmit()
        if ack >= self.snd_una:  # an older ACK says nothing of the window now (RFC 1122 §4.2.2.20)
            self._update_window(seg, seq, ack)
        if self._persist:
            self.retries = 0  # the app answers our probes: it is alive, just not reading
            if self.snd_wnd > 0:
                self._persist = False
                self._rto_deadline = None
        return True

    def _update_window(self, seg: TcpSegment, seq: int, ack: int, force: bool = False) -> None:
        if force or self._wl1 < seq or (self._wl1 == seq and self._wl2 <= ack):
            self.snd_wnd = seg.window << self.snd_wscale
            self.snd_max_wnd = max(self.snd_max_wnd, self.snd_wnd)
            self._wl1, self._wl2 = seq, ack

    def _ack_advanced(self, ack: int, now: float) -> None:
        acked = ack - self.snd_una
        self.snd_una = ack
        if self.snd_nxt < ack:
            self.snd_nxt = ack
        n = min(max(ack - self._buf_seq, 0), len(self._sndbuf))
        if n:
            del self._sndbuf[:n]
            self._buf_seq += n
            self._events.append(SendSpace())
        self._dupacks = 0
        self.retries = 0
        # RTT (Karn: samples only from segments never retransmitted)
        if self._rtt_sample is not None and ack >= self._rtt_sample[0]:
            self._rtt_update(now - self._rtt_sample[1])
            self._rtt_sample = None
        # congestion window: slow start / congestion avoidance
        if self.cwnd < self.ssthresh:
            self.cwnd += acked
        else:
            self.cwnd += max(1, self.mss * self.mss // self.cwnd)
        self.cwnd = min(self.cwnd, 1 << 30)
        self._rto_deadline = None if self.snd_una >= self.snd_max else now + self.rto
        fin_acked = self._fin_queued and self.snd_una == self._fin_seq + 1
        if fin_acked:
            if self.state is State.FIN_WAIT_1:
                self.state = State.FIN_WAIT_2
            elif self.state is State.CLOSING:
                self._enter_time_wait(now)
            elif self.state is State.LAST_ACK:
                self._close(None, graceful=True)

    def _rtt_update(self, r: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = r, r / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
            self.srtt = 0.875 * self.srtt + 0.125 * r
        self.rto = min(max(self.srtt + 4 * self.rttvar, self.config.rto_min), self.config.rto_max)

    def _fast_retransmit(self) -> None:
        flight = self.snd_max - self.snd_una
        self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.ssthresh
        self._rtt_sample = None
        self._retransmit_head()

    def _retransmit_head(self) -> None:
        off = self.snd_una - self._buf_seq
        n = min(self.mss, len(self._sndbuf) - off) if off >= 0 else 0
        if n > 0:
            data = bytes(self._sndbuf[off : off + n])
            fin = self._fin_queued and self.snd_una + n == self._fin_seq and self.snd_max > self._fin_seq
            self._emit(self.snd_una, self.rcv_nxt, ACK | PSH | (FIN if fin else 0), data)
        elif self._fin_queued and self.snd_una == self._fin_seq:
            self._emit(self.snd_una, self.rcv_nxt, ACK | FIN)

    def _receive_data(self, seq: int, payload: bytes) -> None:
        nxt = self.rcv_nxt
        if seq < nxt:  # drop what we already have
            payload = payload[nxt - seq :]
            seq = nxt
        wnd = self._rcv_wnd()
        edge = nxt + wnd if self._peer_fin_seq is None else min(nxt + wnd, self._peer_fin_seq)
        if seq + len(payload) > edge:  # never hold more than the window (nor past a FIN)
            payload = payload[: max(0, edge - seq)]
        if not payload:
            return
        self._ack_pending = True
        if seq == nxt:
            self._rcvbuf += payload
            self.rcv_nxt = nxt + len(payload)
            self._merge_ooo()
            self._events.append(DataReceived())
        else:
            old = self._ooo.get(seq)
            if old is not None and len(old) >= len(payload):
                return  # duplicate
            if old is None and len(self._ooo) >= MAX_OOO_SEGMENTS:
                return  # too many pieces: the app will retransmit
            extra = len(payload) - (len(old) if old else 0)
            if self._ooo_bytes + extra + len(self._rcvbuf) > self.config.rcv_buf:
                return  # over budget: the app will retransmit
            self._ooo[seq] = payload
            self._ooo_bytes += extra

    def _trim_ooo(self, end: int) -> None:
        """Drop stored out-of-order bytes at or past ``end`` (the app's FIN): merged, they
        would carry rcv_nxt past the FIN, which then never counts, and the flow never closes."""
        for s in [s for s in self._ooo if s + len(self._ooo[s]) > end]:
            data = self._ooo.pop(s)
            self._ooo_bytes -= len(data)
            if s < end:
                self._ooo[s] = data[: end - s]
                self._ooo_bytes += end - s

    def _merge_ooo(self) -> None:
        progressed = True
        while self._ooo and progressed:
            progressed = False
            for s in sorted(self._ooo):
                if s > self.rcv_nxt:
                    break
                data = self._ooo.pop(s)
                self._ooo_bytes -= len(data)
                end = s + len(data)
                if end > self.rcv_nxt:
                    self._rcvbuf += data[self.rcv_nxt - s :]
                    self.rcv_nxt = end
                progressed = True

    def _check_fin(self, now: float) -> None:
        if self.peer_fin or self._peer_fin_seq is None or self._peer_fin_seq != self.rcv_nxt:
            return
        self.peer_fin = True
        self.rcv_nxt += 1
        self._ack_pending = True
        self._ooo.clear()
        self._ooo_bytes = 0
        if self.state is State.ESTABLISHED:
            self.state = State.CLOSE_WAIT
        elif self.state is State.FIN_WAIT_1:
            fin_acked = self.snd_una == self._fin_seq + 1
            if fin_acked:
                self._enter_time_wait(now)
            else:
                self.state = State.CLOSING
        elif self.state is State.FIN_WAIT_2:
            self._enter_time_wait(now)
        self._maybe_report_eof()

    def _maybe_report_eof(self) -> None:
        if self.peer_fin and not self._rcvbuf and not self._eof_reported:
            self._eof_reported = True
            self._events.append(EofReceived())

    # ---- timers ----------------------------------------------------------------

    def on_timer(self, now: float) -> None:
        if self.state is State.TIME_WAIT:
            if self._tw_deadline is not None and now >= self._tw_deadline:
                self._close(None, graceful=True)
            return
        if self._rto_deadline is None or now < self._rto_deadline:
            return
        self.retries += 1
        if self.retries > self.config.max_retries:
            self._emit(self.snd_nxt, self.rcv_nxt, RST | ACK, window=0)
            self._close(Reset("retransmission timeout"))
            return
        self.rto = min(self.rto * 2, self.config.rto_max)
        self._rto_deadline = now + self.rto
        if self.state is State.SYN_RCVD:
            self._send_synack()
            return
        if self._persist:
            if self.snd_wnd > 0:  # held back by silly-window avoidance only: send anyway
                self._persist = False
                self._rto_deadline = None
                self._output(now, force_one=True)
            else:
                # zero-window probe: an old sequence number makes the app re-announce its window
                self._emit(self.snd_una - 1, self.rcv_nxt, ACK)
            return
        flight = self.snd_max - self.snd_una
        self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.mss
        self._rtt_sample = None
        self.snd_nxt = self.snd_una  # go back N; the app's cumulative ACKs skip what it has
        self._output(now, force_one=True)

    # ---- output ------------------------------------------------------------------

    @property
    def _fin_seq(self) -> int:
        return self._buf_seq + len(self._sndbuf)

    def _rcv_wnd(self) -> int:
        # Out-of-order bytes already lie inside [rcv_nxt, rcv_nxt + this): counting them
        # again would pull the right edge back (RFC 7323 §2.4) and drop what the app sent
        # inside the window it was offered. Their memory is capped in _receive_data.
        return max(0, self.config.rcv_buf - len(self._rcvbuf))

    def _adv_window(self) -> int:
        wnd = self._rcv_wnd()
        self._adv_edge = max(self._adv_edge, self.rcv_nxt + wnd)
        return min(wnd >> self.rcv_wscale, 0xFFFF)

    def _emit(self, seq: int, ack: int, flags: int, payload: bytes = b"", window: int | None = None, options: bytes = b"") -> None:
        if window is None:
            window = self._adv_window()
        if flags & ACK:
            self._ack_pending = False
        self._out.append(
            ip.build_tcp(
                self.local_ip, self.remote_ip, self.local_port, self.remote_port,
                seq, ack, flags, window, payload, options, self.config.checksums,
            )
        )

    def _send_synack(self) -> None:
        wscale = self.rcv_wscale if self.snd_wscale or self.rcv_wscale else None
        opts = ip.tcp_syn_options(self.our_mss, wscale)
        self._emit(self.iss, self.rcv_nxt, SYN | ACK, window=min(self._rcv_wnd(), 0xFFFF), options=opts)

    def _arm_rto(self, now: float) -> None:
        if self._rto_deadline is None:
            self._rto_deadline = now + self.rto

    def _output(self, now: float, force_one: bool = False) -> None:
        if self.state not in _CAN_SEND:
            return
        data_end = self._fin_seq
        while True:
            limit = self.snd_una + (max(min(self.snd_wnd, self.cwnd), self.mss) if force_one else min(self.snd_wnd, self.cwnd))
            unsent = data_end - self.snd_nxt
            if unsent > 0:
                n = min(unsent, self.mss, limit - self.snd_nxt)
                if force_one and n <= 0 and self.snd_nxt == self.snd_una:
                    n = min(unsent, self.mss)
                if n <= 0:
                    break
                if n < self.mss and n < unsent and n < self.snd_max_wnd // 2 and not force_one:
                    break  # sender silly-window avoidance
                off = self.snd_nxt - self._buf_seq
                data = bytes(self._sndbuf[off : off + n])
                last = self.snd_nxt + n == data_end
                fin = self._fin_queued and last
                if self._rtt_sample is None and self.snd_nxt >= self.snd_max:
                    self._rtt_sample = (self.snd_nxt + n, now)
                self._emit(self.snd_nxt, self.rcv_nxt, ACK | (PSH if last else 0) | (FIN if fin else 0), data)
                self.snd_nxt += n + (1 if fin else 0)
                self.snd_max = max(self.snd_max, self.snd_nxt)
                force_one = False
                if fin:
                    break
            elif self._fin_queued and self.snd_nxt == data_end:
                self._emit(self.snd_nxt, self.rcv_nxt, ACK | FIN)
                self.snd_nxt += 1
                self.snd_max = max(self.snd_max, self.snd_nxt)
                break
            else:
                break
        if self.snd_max > self.snd_una:
            self._persist = False
            self._arm_rto(now)
        elif data_end > self.snd_nxt:  # blocked by a zero (or silly) window
            if not self._persist:
                self._persist = True
                self._rto_deadline = now + self.rto

    # ---- state helpers -------------------------------------------------------------

    def _enter_time_wait(self, now: float) -> None:
        self.state = State.TIME_WAIT
        self._rto_deadline = None
        self._tw_deadline = now + self.config.time_wait

    def _close(self, why: Reset | None, graceful: bool = False) -> None:
        """Forget the flow. After a graceful close the bytes the app sent but the caller has
        not read yet stay readable (the SOCKS side may be slower than the app's FIN)."""
        self.state = State.CLOSED
        self._rto_deadline = None
        self._tw_deadline = None
        self._ack_pending = False
        if not graceful:
            self._rcvbuf.clear()
        self._sndbuf.clear()
        self._ooo.clear()
        self._ooo_bytes = 0
        if why is not None:
            self._events.append(why)
        self._events.append(Closed())


def rst_for(seg: TcpSegment, checksums: bool = True) -> bytes | None:
    """The RST answering a segment that matches no flow (None for a RST)."""
    if seg.flags & RST:
        return None
    if seg.flags & ACK:
        return ip.build_tcp(seg.dst, seg.src, seg.dport, seg.sport, seg.ack, 0, RST, 0, b"", b"", checksums)
    return ip.build_tcp(seg.dst, seg.src, seg.dport, seg.sport, 0, seg.seq + seg.seg_len, RST | ACK, 0, b"", b"",
                        checksums)


class TcpStack:
    """Demultiplexes segments to flows; answers strays with RST."""

    def __init__(self, config: TcpConfig | None = None, max_flows: int = 4096):
        self.config = config or TcpConfig()
        self.max_flows = max_flows
        self.flows: dict[tuple[bytes, int, bytes, int], TcpConnection] = {}
        self.out: list[bytes] = []  # RSTs for strays

    def receive(self, seg: TcpSegment, now: float) -> tuple[TcpConnection | None, bool]:
        """Feed one segment. Returns (flow or None, True if the flow is new and awaits accept/refuse)."""
        key = (seg.src, seg.sport, seg.dst, seg.dport)
        conn = self.flows.get(key)
        is_syn = seg.flags & (SYN | ACK | RST) == SYN
        if conn is not None and conn.state is State.CLOSED:
            del self.flows[key]
            conn = None
        if conn is not None and is_syn and conn.state is State.TIME_WAIT:
            if unwrap(seg.seq, conn.rcv_nxt) > conn.rcv_nxt:  # new incarnation of the 4-tuple
                conn._close(None)
                del self.flows[key]
                conn = None
        if conn is None:
            if is_syn:
                if len(self.flows) >= self.max_flows:
                    rst = rst_for(seg, self.config.checksums)
                    if rst:
                        self.out.append(rst)
                    return None, False
                conn = TcpConnection(seg, now, self.config)
                self.flows[key] = conn
                return conn, True
            rst = rst_for(seg, self.config.checksums)
            if rst:
                self.out.append(rst)
            return None, False
        conn.receive(seg, now)
        return conn, False

    def forget(self, conn: TcpConnection) -> None:
        if self.flows.get(conn.key) is conn:
            del self.flows[conn.key]
