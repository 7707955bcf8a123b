"""The asyncio driver with a datagram socketpair standing in for the TUN and an in-process SOCKS5 server."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from dnslib import DNSRecord

from wraith_tun import ip
from wraith_tun.budget import Budget
from wraith_tun.dns import VirtualDns
from wraith_tun.ip import ACK, FIN, PSH, RST, SYN
from wraith_tun.shim import VNET_HDR_LEN, Shim, ShimConfig
from wraith_tun.tcp import TcpConfig

APP = bytes([10, 0, 0, 1])
DST = bytes([10, 80, 0, 1])
BULK = 4_000_000


@dataclass
class FakeSocks:
    port: int = 0
    targets: list[tuple[str, int]] = field(default_factory=list)
    eofs: int = 0
    ends: list[str] = field(default_factory=list)
    received: list[bytes] = field(default_factory=list)

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            n = (await r.readexactly(2))[1]
            await r.readexactly(n)
            w.write(b"\x05\x00")
            _ver, _cmd, _rsv, atyp = await r.readexactly(4)
            if atyp == 1:
                host = socket.inet_ntoa(await r.readexactly(4))
            elif atyp == 4:
                host = socket.inet_ntop(socket.AF_INET6, await r.readexactly(16))
            else:
                ln = (await r.readexactly(1))[0]
                host = (await r.readexactly(ln)).decode()
            port = struct.unpack("!H", await r.readexactly(2))[0]
            self.targets.append((host, port))
            if port == 1:
                w.write(b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00")  # connection refused
                await w.drain()
                w.close()
                return
            if port == 3:  # a target that speaks first, in the same write as the SOCKS reply
                w.write(b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"220 banner\r\n")
                await r.read()
                w.close()
                return
            w.write(b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00")
            if port == 4:  # sends a little, then aborts (RST)
                w.write(b"partial")
                await w.drain()
                await asyncio.sleep(0.1)
                w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                w.transport.abort()  # with linger 0: a real RST
                return
            if port == 5:  # reports how the app's side ended
                try:
                    while await r.read(65536):
                        pass
                    self.ends.append("eof")
                except ConnectionError:
                    self.ends.append("reset")
                w.close()
                return
            if port == 6:  # half-closes at once, reads everything afterwards
                w.write_eof()
                data = b""
                while chunk := await r.read(65536):
                    data += chunk
                self.received.append(data)
                w.close()
                return
            if port == 2:  # bulk sender
                w.write(b"B" * BULK)
                await w.drain()
                w.close()
                return
            while data := await r.read(65536):  # echo until EOF, then close
                w.write(data)
                await w.drain()
            self.eofs += 1
            w.close()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            w.close()


class App:
    """A hand-driven TCP client on the far side of the fake TUN."""

    def __init__(self, sock: socket.socket, dport: int, dst: bytes = DST, sport: int = 40000, src: bytes = APP):
        self.sock, self.dport, self.dst, self.sport, self.src = sock, dport, dst, sport, src
        self.seq = 1000
        self.ack = 0

    def send(self, flags: int, payload: bytes = b"", window: int = 65535, seq: int | None = None) -> bytes:
        opts = ip.tcp_syn_options(1460, None) if flags & SYN else b""
        pkt = ip.build_tcp(self.src, self.dst, self.sport, self.dport, self.seq if seq is None else seq, self.ack, flags,
                           window, payload, opts)
        self.sock.send(pkt)
        return pkt

    async def recv(self, timeout: float = 5.0) -> ip.TcpSegment:
        loop = asyncio.get_running_loop()
        while True:
            raw = await asyncio.wait_for(loop.sock_recv(self.sock, 70000), timeout)
            p = ip.parse_packet(raw)
            if isinstance(p, ip.TcpSegment) and p.dport == self.sport:
                return p

    async def connect(self) -> ip.TcpSegment:
        self.send(SYN)
        sa = await self.recv()
        assert sa.flags == SYN | ACK, sa
        self.seq += 1
        self.ack = sa.seq + 1
        self.send(ACK)
        return sa


@dataclass
class Rig:
    shim: Shim
    socks: FakeSocks
    tun: socket.socket


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    fake = FakeSocks()
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    fake.port = server.sockets[0].getsockname()[1]
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    b.setblocking(False)
    cfg = ShimConfig(socks_host="127.0.0.1", socks_port=fake.port, tcp=TcpConfig(mtu=1500, time_wait=0.3), dns=VirtualDns())
    shim = Shim(a.fileno(), cfg)
    shim.start()
    try:
        yield Rig(shim, fake, b)
    finally:
        shim.stop()
        server.close()
        a.close()
        b.close()


async def test_echo_flow_with_garbage_interleaved(rig: Rig) -> None:
    app = App(rig.tun, 7)
    await app.connect()
    data_pkt = ip.build_tcp(APP, DST, app.sport, 7, app.seq, app.ack, ACK | PSH, 65535, b"evil")
    bad = [
        b"", b"\x45", b"garbage" * 10, data_pkt[:30],
        data_pkt[:-1] + b"!",  # bad TCP checksum: must never reach the SOCKS side
        bytes([0x45]) + data_pkt[1:6] + b"\x20" + data_pkt[7:],  # fragment bit (header checksum now wrong too)
    ]
    for junk in bad:
        rig.tun.send(junk) if junk else None
    app.send(ACK | PSH, b"ping")
    app.seq += 4
    got = b""
    while got != b"ping":
        s = await app.recv()
        if s.payload:
            got += s.payload
            app.ack = s.seq + len(s.payload)
    st = rig.shim.stats
    assert st.bad_packets + st.other_dropped == len([j for j in bad if j])  # "g..." looks like IPv6
    # half-close: our FIN reaches the echo server as EOF; it answers with FIN
    app.send(ACK | FIN)
    app.seq += 1
    fin = None
    while fin is None:
        s = await app.recv()
        if s.flags & FIN:
            fin = s
    assert rig.socks.eofs == 1
    app.ack = fin.seq + 1
    app.send(ACK)
    await asyncio.sleep(0.05)
    assert rig.shim.stats.flows_opened == 1 and rig.socks.targets == [("10.80.0.1", 7)]


async def test_socks_refusal_resets_the_syn(rig: Rig) -> None:
    app = App(rig.tun, 1)
    app.send(SYN)
    r = await app.recv()
    assert r.flags == RST | ACK and r.ack == app.seq + 1
    assert rig.shim.stats.flows_refused == 1
    assert not rig.shim.flows


async def test_virtual_dns_then_socks5h_connect_by_name(rig: Rig) -> None:
    loop = asyncio.get_running_loop()
    q = DNSRecord.question("Service.Internal.Test")
    rig.tun.send(ip.build_udp(APP, bytes([10, 0, 0, 2]), 5353, 53, q.pack()))
    raw = await asyncio.wait_for(loop.sock_recv(rig.tun, 4096), 5)
    dg = ip.parse_packet(raw)
    assert isinstance(dg, ip.UdpDatagram) and dg.sport == 53 and dg.dport == 5353 and dg.src == bytes([10, 0, 0, 2])
    fake = socket.inet_aton(str(DNSRecord.parse(dg.payload).a.rdata))
    app = App(rig.tun, 443, dst=fake)
    await app.connect()
    assert rig.socks.targets == [("service.internal.test", 443)]
    # a fake address nobody asked for is refused without bothering the SOCKS server
    stray = App(rig.tun, 443, dst=bytes([198, 19, 255, 1]), sport=40001)
    stray.send(SYN)
    r = await stray.recv()
    assert r.flags & RST and len(rig.socks.targets) == 1


async def test_a_packet_that_fails_costs_only_itself(rig: Rig, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Whatever goes wrong handling one packet (here: the DNS responder raising) is counted
    and logged once; the other packets of the same read batch are still handled."""
    loop = asyncio.get_running_loop()
    dns = rig.shim.cfg.dns
    assert dns is not None

    def broken(query: bytes, now: float) -> bytes | None:
        raise RuntimeError("responder bug")

    monkeypatch.setattr(dns, "handle", broken)
    bad = rig.shim.stats.bad_packets
    for port in (5001, 5002):  # two failing packets, then one that works, in one batch
        rig.tun.send(ip.build_udp(APP, bytes([10, 0, 0, 2]), port, 53, b"q"))
    rig.tun.send(ip.build_udp(APP, DST, 5000, 9999, b"hello"))
    raw = await asyncio.wait_for(loop.sock_recv(rig.tun, 4096), 5)
    assert raw[9] == ip.PROTO_ICMP and raw[20:22] == b"\x03\x03"
    assert rig.shim.stats.bad_packets == bad + 2
    assert sum("could not be handled" in r.getMessage() for r in caplog.records) == 1


async def test_other_udp_gets_icmp_port_unreachable(rig: Rig) -> None:
    loop = asyncio.get_running_loop()
    rig.tun.send(ip.build_udp(APP, DST, 5000, 9999, b"hello"))
    raw = await asyncio.wait_for(loop.sock_recv(rig.tun, 4096), 5)
    assert raw[9] == ip.PROTO_ICMP and raw[20:22] == b"\x03\x03"


async def test_slow_app_bounds_memory_and_gets_every_byte(rig: Rig) -> None:
    app = App(rig.tun, 2)
    await app.connect()
    received = 0
    window = 65535
    fin = False
    peak = 0
    stalls = 0
    while not fin:
        try:
            s = await app.recv(timeout=2.0)
        except asyncio.TimeoutError:
            stalls += 1
            assert stalls < 5, "transfer stalled"
            continue
        peak = max(peak, rig.shim.memory)
        if s.payload and s.seq == app.ack:
            received += len(s.payload)
            app.ack += len(s.payload)
        if s.flags & FIN and s.seq + len(s.payload) == app.ack:
            fin = True
            app.ack += 1
        if received and received % (256 * 1024) < 1460:
            await asyncio.sleep(0.01)  # a slow reader: SOCKS reading must pause meanwhile
        app.send(ACK, window=window)
    assert received == BULK
    # bounded: the send buffer (256 KiB) plus one SOCKS read, never the whole 4 MB
    assert 128 * 1024 < peak <= 256 * 1024 + 256 * 1024, peak


async def test_ipv6_flow_becomes_socks5_connect_to_ipv6_literal(rig: Rig) -> None:
    src6 = socket.inet_pton(socket.AF_INET6, "fd77:7772:6169::2")
    dst6 = socket.inet_pton(socket.AF_INET6, "fd80::1")
    app = App(rig.tun, 7, dst=dst6, src=src6)
    await app.connect()
    app.send(ACK | PSH, b"six")
    app.seq += 3
    got = b""
    while got != b"six":
        s = await app.recv()
        got += s.payload
        app.ack = s.seq + len(s.payload)
    assert rig.socks.targets == [("fd80::1", 7)]


async def test_target_that_speaks_first_loses_nothing(rig: Rig) -> None:
    app = App(rig.tun, 3)
    await app.connect()
    got = b""
    while got != b"220 banner\r\n":
        s = await app.recv()
        assert s.flags & RST == 0
        if s.payload:
            got += s.payload
            app.ack = s.seq + len(s.payload)
            app.send(ACK)


async def test_reset_from_the_socks_side_reaches_the_app(rig: Rig) -> None:
    app = App(rig.tun, 4)
    await app.connect()
    got, rst = b"", None
    while rst is None:
        s = await app.recv()
        if s.flags & RST:
            rst = s
        elif s.payload:
            got += s.payload
            app.ack = s.seq + len(s.payload)
            app.send(ACK)
    assert got == b"partial"  # what came before the reset is delivered, then RST (never a clean FIN)
    await asyncio.sleep(0.05)
    assert not rig.shim.flows


async def test_reset_from_the_app_reaches_the_socks_side(rig: Rig) -> None:
    app = App(rig.tun, 5)
    await app.connect()
    app.send(ACK | PSH, b"hello")
    app.seq += 5
    await asyncio.sleep(0.1)
    app.send(RST)
    for _ in range(50):
        if rig.socks.ends:
            break
        await asyncio.sleep(0.02)
    assert rig.socks.ends == ["reset"]
    assert not rig.shim.flows


async def test_bytes_still_buffered_at_close_reach_the_socks_side(rig: Rig) -> None:
    app = App(rig.tun, 6)
    await app.connect()
    fin = await app.recv()
    assert fin.flags & FIN  # the target half-closed first
    app.ack = fin.seq + 1
    app.send(ACK)
    (flow,) = rig.shim.flows.values()
    flow.pause_writing()  # as if the SOCKS socket were full: the bytes must wait in the flow
    app.send(ACK | PSH | FIN, b"D" * 5000)
    app.seq += 5001
    ack = await app.recv()
    assert ack.ack == app.seq
    for _ in range(100):  # TIME_WAIT (0.3 s here) ends the flow; the bytes must not die with it
        if rig.socks.received:
            break
        await asyncio.sleep(0.02)
    assert rig.socks.received == [b"D" * 5000]
    assert not rig.shim.flows


async def test_idle_flows_are_reset_both_ways(rig: Rig) -> None:
    rig.shim.cfg.idle_timeout = 0.4
    if rig.shim._sweeper is not None:
        rig.shim._sweeper.cancel()
    rig.shim._schedule_sweep()  # sweeps every 0.1 s now
    app = App(rig.tun, 5)
    await app.connect()
    t0 = asyncio.get_running_loop().time()
    r = await app.recv(timeout=5)
    assert r.flags & RST
    assert asyncio.get_running_loop().time() - t0 >= 0.35
    for _ in range(50):
        if rig.socks.ends:
            break
        await asyncio.sleep(0.02)
    assert rig.socks.ends == ["reset"]
    assert not rig.shim.flows


# ---- review findings -------------------------------------------------------------------------------


async def test_largest_packets_are_read_whole_with_a_virtio_header() -> None:
    """--mtu up to 65535 is allowed: a 65535-byte packet plus the 10-byte virtio header was read
    into 65536 bytes, cut short, counted bad, and its retransmissions were lost the same way."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    b.setblocking(False)
    shim = Shim(a.fileno(), ShimConfig(tcp=TcpConfig(mtu=65535)), vnet_hdr=True)
    shim.start()
    loop = asyncio.get_running_loop()
    try:
        big = ip.build_udp(APP, DST, 5000, 9999, b"x" * (65535 - 28))
        assert len(big) == 65535
        b.send(bytes(VNET_HDR_LEN) + big)
        b.send(bytes(VNET_HDR_LEN) + ip.build_udp(APP, DST, 5000, 9998, b"small"))  # answered second
        raw = (await asyncio.wait_for(loop.sock_recv(b, 70000), 5))[VNET_HDR_LEN:]
        assert raw[9] == ip.PROTO_ICMP and raw[20:22] == b"\x03\x03"
        assert struct.unpack("!H", raw[28 + 22 : 28 + 24])[0] == 9999  # the quoted UDP header: the big one
        assert shim.stats.bad_packets == 0
    finally:
        shim.stop()
        a.close()
        b.close()


def _framed(msg: bytes) -> bytes:
    return struct.pack("!H", len(msg)) + msg


async def test_dns_over_tcp_is_answered_here_never_through_socks(rig: Rig) -> None:
    """TCP/53 became a SOCKS5 CONNECT to 10.0.0.2:53 on the server's network (the query went to
    whichever host has that address there). It is answered like UDP/53 now, pipelined too."""
    app = App(rig.tun, 53, dst=bytes([10, 0, 0, 2]))
    await app.connect()
    queries = [DNSRecord.question("one.internal.test"), DNSRecord.question("two.internal.test")]
    msg = b"".join(_framed(q.pack()) for q in queries)
    app.send(ACK | PSH, msg)
    app.seq += len(msg)
    stream = b""
    answers: list[DNSRecord] = []
    while len(answers) < 2:
        s = await app.recv()
        if s.payload and s.seq == app.ack:
            stream += s.payload
            app.ack += len(s.payload)
            app.send(ACK)
        while len(stream) >= 2 and len(stream) >= 2 + struct.unpack("!H", stream[:2])[0]:
            n = struct.unpack("!H", stream[:2])[0]
            answers.append(DNSRecord.parse(stream[2 : 2 + n]))
            stream = stream[2 + n :]
    for q, r in zip(queries, answers):
        assert r.header.qr == 1 and r.header.id == q.header.id
        assert str(r.a.rdata).startswith("198.1")
    app.send(ACK | FIN)  # the client is done: the shim ends its side too
    app.seq += 1
    fin = await app.recv()
    while not fin.flags & FIN:
        fin = await app.recv()
    assert rig.socks.targets == [] and rig.shim.stats.dns_queries == 2
    # a length no query has: the stream cannot be followed, so it is reset
    bad = App(rig.tun, 53, dst=bytes([10, 0, 0, 2]), sport=40001)
    await bad.connect()
    bad.send(ACK | PSH, b"\x00\x05hello")
    r = await bad.recv()
    while not r.flags & RST:
        r = await bad.recv()
    assert rig.socks.targets == []


async def test_no_icmp_errors_about_multicast_or_broadcast(rig: Rig) -> None:
    """RFC 1122 3.2.2: no ICMP error about a datagram sent to a multicast or broadcast address
    (it went out with that address as its source); unicast still gets port unreachable."""
    loop = asyncio.get_running_loop()
    rig.shim.cfg.broadcast = frozenset({bytes([10, 0, 0, 255])})
    app6 = socket.inet_pton(socket.AF_INET6, "fd77:7772:6169::2")
    for src, dst, port in [
        (APP, bytes([224, 0, 0, 251]), 5353), (APP, bytes([239, 255, 255, 250]), 1900),
        (APP, bytes([255, 255, 255, 255]), 67), (APP, bytes([10, 0, 0, 255]), 137),
        (bytes(4), DST, 67),  # from 0.0.0.0: no host to tell
        (app6, socket.inet_pton(socket.AF_INET6, "ff02::fb"), 5353),
    ]:
        rig.tun.send(ip.build_udp(src, dst, 5353, port, b"q"))
    rig.tun.send(ip.build_udp(APP, DST, 5000, 9999, b"hello"))
    raw = await asyncio.wait_for(loop.sock_recv(rig.tun, 4096), 5)  # the first answer is about the last one
    assert raw[9] == ip.PROTO_ICMP and raw[20:22] == b"\x03\x03" and raw[12:16] == DST
    assert rig.shim.stats.udp_rejected == 7


async def test_a_flow_keeps_its_virtual_address_while_new_names_press_a_full_pool(rig: Rig) -> None:
    """Recycling addresses when the pool is full must never re-point one a live flow uses: a
    second connection by the same program to the same address must reach the same name."""
    dns = VirtualDns(network="198.18.0.0/29")  # 6 addresses
    rig.shim.cfg.dns = dns
    now = asyncio.get_running_loop().time()
    addr = dns.address_for("held.test", now)
    assert addr is not None
    first = App(rig.tun, 7, dst=addr)
    await first.connect()
    for i in range(20):
        assert dns.address_for(f"flood{i}.test", now) is not None  # every new name is answered
    second = App(rig.tun, 7, dst=addr, sport=40001)
    await second.connect()
    assert rig.socks.targets == [("held.test", 7), ("held.test", 7)]
    for app in (first, second):
        app.send(RST)
    for _ in range(100):
        if not rig.shim.flows:
            break
        await asyncio.sleep(0.02)
    assert not rig.shim.flows
    for i in range(6):  # the flows are gone: now the address may go to another name
        dns.address_for(f"later{i}.test", now)
    assert dns.name_for(addr, now) != "held.test"


async def test_all_flows_together_stay_within_the_buffer_budget_and_readers_progress(rig: Rig) -> None:
    """Per flow the bytes apps have not acknowledged were bounded, in total not: flows whose app
    never reads held ~350 KB each. With a budget, the total stays under it, and a flow whose app
    does read still gets every byte while the others are stalled."""
    limit = 1 << 20
    rig.shim.cfg.max_buffered, rig.shim.cfg.max_flows = limit, 16
    rig.shim.budget = Budget(limit, 16)  # a reserve of 32 KiB per flow
    stalled = [App(rig.tun, 2, sport=41000 + i) for i in range(6)]  # 6 x 256 KiB would be 1.5 MiB
    for app in stalled:
        await app.connect()  # and never acknowledges a byte
    for _ in range(250):  # wait until they have read what they may (not timed: a bounded poll)
        if rig.shim.memory >= limit // 2 + 4 * 32 * 1024:
            break
        await asyncio.sleep(0.02)
    assert rig.shim.memory >= limit // 2, rig.shim.memory
    reader = App(rig.tun, 2, sport=42000)
    await reader.connect()
    received, fin, peak, stalls = 0, False, 0, 0
    while not fin:
        try:
            s = await reader.recv(timeout=2.0)
        except asyncio.TimeoutError:
            stalls += 1
            assert stalls < 5, "the reading flow stalled"
            continue
        peak = max(peak, rig.shim.memory)
        if s.payload and s.seq == reader.ack:
            received += len(s.payload)
            reader.ack += len(s.payload)
        if s.flags & FIN and s.seq + len(s.payload) == reader.ack:
            fin = True
            reader.ack += 1
        reader.send(ACK)
    assert received == BULK
    assert peak <= limit, peak
    assert rig.shim.budget.held == sum(f.conn.unacked for f in rig.shim.flows.values())
