"""The asyncio driver: TUN packets <-> sans-I/O TCP flows <-> SOCKS5 sockets.

The driver only moves bytes: parsing is :mod:`ip`, TCP is :mod:`tcp`, names
are :mod:`dns`. Backpressure in both directions:

* app -> SOCKS: bytes stay in the flow's receive buffer (shrinking the app's
  window) while the SOCKS socket's transport says ``pause_writing``.
* SOCKS -> app: the SOCKS socket is not read while the flow's send buffer
  (bytes the app has not acknowledged) is full, and each read is sized to what
  the flow may still hold, within a shim-wide :class:`~.budget.Budget`.

TCP/53 and UDP/53 in virtual DNS mode are answered here and never reach SOCKS.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass, field

from . import ip, tcp
from .budget import DEFAULT_LIMIT, Budget
from .dns import MAX_QUERY, VirtualDns
from .socks import SocksRefused, socks5_connect

log = logging.getLogger("wraith_tun")

READ_BATCH = 128
VNET_HDR_LEN = 10
# the largest IP packet (65535, whatever --mtu says) plus the virtio header: a shorter read
# truncates the packet, which then fails its checks and is lost with every retransmission
TUN_READ_SIZE = 65535 + VNET_HDR_LEN
SOCKS_READ_SIZE = 256 * 1024  # one shared buffer for every SOCKS read (asyncio's own read size)
# room a DNS-over-TCP flow needs before it answers the next query: an answer to one question
# is under 1 KiB, far below this
DNS_TCP_ROOM = 2 + MAX_QUERY
# virtio_net_hdr for our TCP packets: NEEDS_CSUM, checksum starts at byte 20 (the TCP
# header), field at +16; the field holds the pseudo-header sum and the kernel, delivering
# locally, trusts it (CHECKSUM_PARTIAL) instead of summing the payload again.
VNET_HDR_TCP4 = struct.pack("=BBHHHH", 1, 0, 0, 0, 20, 16)
VNET_HDR_TCP6 = struct.pack("=BBHHHH", 1, 0, 0, 0, 40, 16)
VNET_HDR_NONE = bytes(VNET_HDR_LEN)  # fully checksummed packets (UDP, ICMP)


@dataclass
class Stats:
    packets_in: int = 0
    packets_out: int = 0
    bad_packets: int = 0
    flows_opened: int = 0
    flows_refused: int = 0
    dns_queries: int = 0
    udp_rejected: int = 0
    other_dropped: int = 0


@dataclass
class ShimConfig:
    socks_host: str = "127.0.0.1"
    socks_port: int = 1080
    tcp: tcp.TcpConfig = field(default_factory=tcp.TcpConfig)
    max_flows: int = 4096
    connect_timeout: float = 30.0
    idle_timeout: float = 7440.0  # RFC 5382: a NAT keeps idle TCP for at least 2 h 4 min; 0 = never
    dns: VirtualDns | None = None
    max_buffered: int = DEFAULT_LIMIT  # bytes read from SOCKS and not yet acked by apps, all flows together
    # the TUN network's broadcast address (no ICMP errors about datagrams to it): the default
    # --tun-addr 10.0.0.1/24's; TunOptions.shim_config() fills in the real one
    broadcast: frozenset[bytes] = frozenset({bytes([10, 0, 0, 255])})


class Flow(asyncio.BufferedProtocol):
    """One TCP flow bridged to one SOCKS5 connection."""

    def __init__(self, shim: Shim, conn: tcp.TcpConnection):
        self.shim = shim
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at: float | None = None
        self.can_write = True  # SOCKS socket accepts more
        self.reading_paused = False
        self.eof_to_socks = False
        self.eof_from_socks = False
        self.charged = 0  # this flow's bytes in the shim's budget
        self.fake_addr: bytes | None = None  # a virtual DNS address this flow keeps from being recycled

    # -- SOCKS side ------------------------------------------------------------------

    async def open(self, host: str, port: int) -> None:
        shim = self.shim
        try:
            sock = await socks5_connect(shim.cfg.socks_host, shim.cfg.socks_port, host, port, shim.cfg.connect_timeout)
        except SocksRefused as e:
            log.debug("flow refused: %s", e)
            shim.stats.flows_refused += 1
            self.conn.refuse()
            shim.service(self)
            return
        except Exception as e:  # never leave the app's SYN hanging on a surprise
            log.warning("SOCKS5 connect failed unexpectedly: %r", e)
            shim.stats.flows_refused += 1
            self.conn.refuse()
            shim.service(self)
            return
        if self.conn.state is tcp.State.CLOSED:  # the app gave up meanwhile
            sock.close()
            return
        try:
            await shim.loop.create_connection(lambda: self, sock=sock)
        except OSError:
            sock.close()
            self.conn.refuse()
            shim.service(self)
            return
        self.conn.accept(shim.loop.time())
        shim.service(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses

    def get_buffer(self, sizehint: int) -> memoryview:
        # a read never brings more than the flow may hold (its free space, within the budget):
        # a whole socket read appended past a full buffer is what let memory outgrow both
        n = self.shim.read_allowance(self)
        return self.shim.read_buffer[: max(n, 1)]  # the transport wants at least one byte

    def buffer_updated(self, nbytes: int) -> None:
        shim = self.shim
        self.conn.send(shim.read_buffer[:nbytes], shim.loop.time())  # copied: the buffer is shared
        shim.service(self)

    def eof_received(self) -> bool:
        self.eof_from_socks = True
        self.conn.shutdown(self.shim.loop.time())
        self.shim.service(self)
        return True  # keep our writing side open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.conn.state is tcp.State.CLOSED:
            return
        if exc is not None or not (self.eof_from_socks and self.eof_to_socks):
            # the SOCKS side broke: the app must see it (RST), not a silent truncation
            self.conn.abort()
        self.shim.service(self)

    def pause_writing(self) -> None:
        self.can_write = False

    def resume_writing(self) -> None:
        self.can_write = True
        self.shim.service(self)

    # -- app -> SOCKS --------------------------------------------------------------------

    def pump_to_socks(self) -> None:
        conn, tr = self.conn, self.transport
        if tr is None or tr.is_closing():
            return
        while self.can_write and conn.readable:
            tr.write(conn.read())
        if conn.at_eof and not self.eof_to_socks and not conn.readable:
            self.eof_to_socks = True
            if tr.can_write_eof():
                tr.write_eof()
        if self.eof_to_socks and self.eof_from_socks:
            tr.close()  # flushes what is buffered

    def release(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        if self.transport is not None and not self.transport.is_closing():
            _abort_with_rst(self.transport)


class DnsOverTcp(Flow):
    """TCP/53 in virtual DNS mode, answered here like UDP/53 (resolvers retry over TCP). As a
    SOCKS5 CONNECT it would carry the query to whichever host has that address on the server's
    side. Messages carry a 2-byte length (RFC 1035 4.2.2); queries may be pipelined."""

    def __init__(self, shim: Shim, conn: tcp.TcpConnection, dns: VirtualDns):
        super().__init__(shim, conn)
        self.dns = dns
        self.frame = bytearray()  # the message being read: length field, then query

    def pump_to_socks(self) -> None:
        conn, shim = self.conn, self.shim
        now = shim.loop.time()
        # answer only while the app has room for an answer: one that pipelines queries without
        # reading the answers is held back by its own receive window, not by our memory
        while conn.readable and conn.send_space >= DNS_TCP_ROOM:
            want = 2 + int.from_bytes(self.frame[:2], "big") if len(self.frame) >= 2 else 2
            self.frame += conn.read(want - len(self.frame))
            if len(self.frame) < want:
                break
            if want == 2:
                if not 12 <= int.from_bytes(self.frame, "big") <= MAX_QUERY:  # not a query's length
                    conn.abort()
                    return
                continue
            shim.stats.dns_queries += 1
            answer = self.dns.handle(bytes(self.frame[2:]), now)
            self.frame.clear()
            if answer is None:  # not a query we answer: over UDP it is dropped, here the stream is lost
                conn.abort()
                return
            conn.send(len(answer).to_bytes(2, "big") + answer, now)
        if conn.at_eof and not self.eof_to_socks:
            self.eof_to_socks = True
            conn.shutdown(now)  # FIN after the last answer


def _abort_with_rst(tr: asyncio.Transport) -> None:
    """Close the SOCKS socket with RST, not FIN: an aborted flow must not look like a clean end."""
    sock = tr.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    tr.abort()


class Shim:
    def __init__(self, fd: int, cfg: ShimConfig, loop: asyncio.AbstractEventLoop | None = None,
                 vnet_hdr: bool = False):
        self.fd = fd
        self.cfg = cfg
        self.vnet_hdr = vnet_hdr  # the device speaks virtio_net_hdr: checksum offload both ways
        self.loop = loop or asyncio.get_running_loop()
        tcp_cfg = dataclasses.replace(cfg.tcp, checksums=not vnet_hdr)
        self.stack = tcp.TcpStack(tcp_cfg, cfg.max_flows)
        self.flows: dict[tcp.TcpConnection, Flow] = {}
        self.stats = Stats()
        self.budget = Budget(cfg.max_buffered, cfg.max_flows)
        self.read_buffer = memoryview(bytearray(SOCKS_READ_SIZE))
        self._squeezed = False  # some flow was paused by the budget (not by its own full buffer)
        self._failure_logged = False
        self._dirty: set[Flow] = set()
        self._running = False
        self._sweeper: asyncio.TimerHandle | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        os.set_blocking(self.fd, False)
        self.loop.add_reader(self.fd, self._on_readable)
        self._running = True
        self._schedule_sweep()

    def _schedule_sweep(self) -> None:
        if self.cfg.idle_timeout > 0:
            self._sweeper = self.loop.call_later(min(60.0, self.cfg.idle_timeout / 4), self._sweep_idle)

    def _sweep_idle(self) -> None:
        """Reset flows that saw no traffic for idle_timeout (both ways: RST to app and SOCKS)."""
        now = self.loop.time()
        for flow in list(self.flows.values()):
            conn = flow.conn
            if now - conn.last_activity > self.cfg.idle_timeout and conn.state is not tcp.State.TIME_WAIT:
                conn.abort()
                self.service(flow)
        self._schedule_sweep()

    def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        if self._sweeper is not None:
            self._sweeper.cancel()
        try:
            self.loop.remove_reader(self.fd)
        except (ValueError, OSError):
            pass
        for flow in list(self.flows.values()):
            flow.conn.abort()
            self._write(flow.conn.packets_to_send())
            flow.release()
            self._release_fake_addr(flow)
        self.flows.clear()
        self.budget.held = 0

    # -- TUN input -------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        now = self.loop.time()
        for _ in range(READ_BATCH):
            try:
                pkt = os.read(self.fd, TUN_READ_SIZE)
            except BlockingIOError:
                break
            except OSError as e:
                log.error("TUN read failed: %s", e)
                self.stop()
                return
            if not pkt:
                break
            try:
                if self.vnet_hdr:
                    # flags: NEEDS_CSUM (1, partial checksum by design) or DATA_VALID (2): the kernel vouches
                    verify = not pkt[0] & 3 if pkt else True
                    self.handle_packet(pkt[VNET_HDR_LEN:], now, verify)
                else:
                    self.handle_packet(pkt, now)
            except Exception:  # one packet we could not handle must not cost the rest of the batch
                self.stats.bad_packets += 1
                if not self._failure_logged:
                    self._failure_logged = True
                    log.exception("a packet could not be handled (counted in bad_packets; logged once)")
        dirty, self._dirty = self._dirty, set()
        for flow in dirty:
            self.service(flow)
        if self.stack.out:
            self._write(self.stack.out)
            self.stack.out = []

    def handle_packet(self, pkt: bytes, now: float, verify: bool = True) -> None:
        self.stats.packets_in += 1
        try:
            p = ip.parse_packet(pkt, verify)
        except ip.BadPacket:
            self.stats.bad_packets += 1
            return
        if isinstance(p, ip.TcpSegment):
            conn, new = self.stack.receive(p, now)
            if conn is None:
                return
            if new:
                self._open_flow(conn, now)
                return
            flow = self.flows.get(conn)
            if flow is not None:
                self._dirty.add(flow)
        elif isinstance(p, ip.UdpDatagram):
            self._handle_udp(p, now)
        else:
            self.stats.other_dropped += 1

    def _handle_udp(self, d: ip.UdpDatagram, now: float) -> None:
        dns = self.cfg.dns
        if dns is not None and d.dport == 53:
            self.stats.dns_queries += 1
            answer = dns.handle(d.payload, now)
            if answer is not None:
                self._write([ip.build_udp(d.dst, d.src, 53, d.sport, answer)])
            return
        self.stats.udp_rejected += 1
        # RFC 1122 3.2.2: no ICMP error about a datagram sent to a multicast or broadcast address
        # (mDNS, SSDP, DHCP...) or from a source that is no single host; its source would be wrong too
        if ip.is_unicast(d.dst, self.cfg.broadcast) and ip.is_unicast(d.src):
            self._write([ip.build_icmp_port_unreachable(d)])

    def _open_flow(self, conn: tcp.TcpConnection, now: float) -> None:
        dns = self.cfg.dns
        if dns is not None and conn.local_port == 53:  # DNS over TCP: answered here, like UDP/53
            flow: Flow = DnsOverTcp(self, conn, dns)
            self.flows[conn] = flow
            self.stats.flows_opened += 1
            conn.accept(now)
            self.service(flow)
            return
        flow = Flow(self, conn)
        self.flows[conn] = flow
        self.stats.flows_opened += 1
        dst = conn.local_ip
        host: str | None
        if dns is not None and dns.is_fake(dst):
            host = dns.name_for(dst, now)
            if host is not None:  # while the flow lives its address keeps naming this host
                dns.hold(dst)
                flow.fake_addr = dst
        else:
            host = str(ipaddress.ip_address(dst))
        if host is None:  # a fake address we never handed out (or forgot)
            self.stats.flows_refused += 1
            conn.refuse()
            self.service(flow)
            return
        flow.connect_task = self.loop.create_task(flow.open(host, conn.local_port))

    # -- per-flow servicing ----------------------------------------------------------------------------

    def service(self, flow: Flow) -> None:
        """Move bytes, react to the flow's events, write its packets, re-arm its timer."""
        conn = flow.conn
        if self.flows.get(conn) is not flow:
            return
        closed = reset = False
        for ev in conn.events():
            if isinstance(ev, tcp.Reset):
                reset = True
                if flow.transport is not None:
                    _abort_with_rst(flow.transport)
            elif isinstance(ev, tcp.Closed):
                closed = True
        if not closed:
            flow.pump_to_socks()
        self._write(conn.packets_to_send())
        self._account(flow)
        if closed or conn.state is tcp.State.CLOSED:
            self._forget(flow, graceful=not reset and conn.peer_fin)
            return
        self._update_reading(flow)
        when = conn.next_deadline()
        if when != flow.timer_at:
            if flow.timer is not None:
                flow.timer.cancel()
            flow.timer = self.loop.call_at(when, self._on_timer, flow) if when is not None else None
            flow.timer_at = when

    def _on_timer(self, flow: Flow) -> None:
        flow.timer = None
        flow.timer_at = None
        flow.conn.on_timer(self.loop.time())
        self.service(flow)

    # -- SOCKS reading within the budget ----------------------------------------------------------------

    def read_allowance(self, flow: Flow) -> int:
        conn = flow.conn
        return self.budget.allowance(conn.unacked, conn.send_space)

    def _account(self, flow: Flow) -> None:
        held = flow.conn.unacked
        if held != flow.charged:
            self.budget.charge(held - flow.charged)
            flow.charged = held
        self._maybe_unsqueeze()

    def _maybe_unsqueeze(self) -> None:
        if self._squeezed and self.budget.relaxed:
            self._squeezed = False
            self.loop.call_soon(self._retry_paused)

    def _update_reading(self, flow: Flow) -> None:
        """Pause the flow's SOCKS socket when it may not read now, resume it when it may again."""
        tr = flow.transport
        if tr is None or tr.is_closing() or flow.eof_from_socks:
            return
        may_read = self.read_allowance(flow) > 0
        if may_read and flow.reading_paused:
            flow.reading_paused = False
            tr.resume_reading()
        elif not may_read and not flow.reading_paused:
            flow.reading_paused = True
            tr.pause_reading()
            if flow.conn.send_space > 0:  # held by the budget: retry when it has room again
                self._squeezed = True

    def _retry_paused(self) -> None:
        for flow in list(self.flows.values()):
            if flow.reading_paused:
                self._update_reading(flow)

    def _release_fake_addr(self, flow: Flow) -> None:
        if flow.fake_addr is not None and self.cfg.dns is not None:
            self.cfg.dns.release(flow.fake_addr)
            flow.fake_addr = None

    def _forget(self, flow: Flow, graceful: bool = False) -> None:
        if self.flows.pop(flow.conn, None) is None:
            return
        self.stack.forget(flow.conn)
        self._release_fake_addr(flow)
        self.budget.charge(-flow.charged)
        flow.charged = 0
        self._maybe_unsqueeze()
        if flow.timer is not None:
            flow.timer.cancel()
            flow.timer = None
        if flow.connect_task is not None and not flow.connect_task.done():
            flow.connect_task.cancel()
        tr = flow.transport
        if tr is not None and not tr.is_closing():
            if graceful:
                # both FINs are done on the TUN side; hand what the app sent to the SOCKS socket
                # (at most the receive window) and let close() flush it, then EOF
                rest = flow.conn.read()
                if rest:
                    tr.write(rest)
                if not flow.eof_to_socks and tr.can_write_eof():
                    flow.eof_to_socks = True
                    tr.write_eof()
                tr.close()
            else:
                _abort_with_rst(tr)

    # -- TUN output -----------------------------------------------------------------------------------

    def _write(self, packets: list[bytes]) -> None:
        fd = self.fd
        vnet = self.vnet_hdr
        for pkt in packets:
            try:
                if vnet:
                    if pkt[0] >> 4 == 4:
                        hdr = VNET_HDR_TCP4 if pkt[9] == ip.PROTO_TCP else VNET_HDR_NONE
                    else:
                        hdr = VNET_HDR_TCP6 if pkt[6] == ip.PROTO_TCP else VNET_HDR_NONE
                    os.writev(fd, (hdr, pkt))
                else:
                    os.write(fd, pkt)
                self.stats.packets_out += 1
            except BlockingIOError:
                pass  # TCP retransmits; DNS clients retry
            except OSError as e:
                log.debug("TUN write failed: %s", e)

    @property
    def memory(self) -> int:
        return sum(f.conn.memory for f in self.flows.values())
