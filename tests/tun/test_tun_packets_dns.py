"""Packet codec, virtual DNS and bad-input handling (no devices)."""

from __future__ import annotations

import struct

import pytest
from dnslib import DNSQuestion, QTYPE, RCODE, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from wraith_tun import ip
from wraith_tun.dns import VirtualDns

A = bytes([10, 0, 0, 1])
B = bytes([10, 80, 0, 1])


def good_tcp(payload: bytes = b"hi") -> bytes:
    return ip.build_tcp(A, B, 1234, 80, 1, 2, ip.ACK, 1000, payload)


def test_checksum_matches_rfc1071_reference() -> None:
    def ref(data: bytes) -> int:
        if len(data) % 2:
            data += b"\0"
        s = sum(struct.unpack(f"!{len(data) // 2}H", data))
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        return ~s & 0xFFFF

    for data in [b"", b"\x00\x01", b"\xff\xff", bytes(range(255)), b"\x12\x34\x56"]:
        got = ip.checksum(data)
        assert got == ref(data) or {got, ref(data)} == {0, 0xFFFF}


def test_roundtrip_tcp_with_options() -> None:
    pkt = ip.build_tcp(A, B, 1, 2, 0xFFFFFFFF, 7, ip.SYN, 512, b"", ip.tcp_syn_options(1460, 7))
    seg = ip.parse_packet(pkt)
    assert isinstance(seg, ip.TcpSegment)
    assert (seg.seq, seg.ack, seg.flags, seg.window) == (0xFFFFFFFF, 7, ip.SYN, 512)
    assert seg.options.mss == 1460 and seg.options.wscale == 7


def test_roundtrip_udp_and_icmp_unreachable() -> None:
    dg = ip.parse_packet(ip.build_udp(A, B, 5000, 9999, b"payload"))
    assert isinstance(dg, ip.UdpDatagram) and dg.payload == b"payload"
    icmp = ip.build_icmp_port_unreachable(dg)
    assert icmp[9] == ip.PROTO_ICMP and icmp[12:16] == B and icmp[16:20] == A
    assert icmp[20:22] == b"\x03\x03"
    assert ip.checksum(icmp[20:]) in (0, 0xFFFF) or ip._verify(icmp[20:])
    assert icmp[28:] == dg.ip_header  # quotes the offending header + 8 bytes


@pytest.mark.parametrize("mangle", [
    lambda p: p[:10],  # truncated IP header
    lambda p: p[:30],  # truncated TCP header
    lambda p: p[:-1] + bytes([p[-1] ^ 1]),  # payload bit flip: bad TCP checksum
    lambda p: p[:10] + bytes([p[10] ^ 0xFF]) + p[11:],  # bad IP header checksum
    lambda p: bytes([0x65]) + p[1:],  # not IPv4
    lambda p: p[:2] + struct.pack("!H", 4000) + p[4:],  # total length beyond the buffer
    lambda p: ip._ip_header(A, B, 6, len(p) - 20, False)[:6] + b"\x20\x00" + p[8:],  # MF fragment
    lambda p: b"",
    lambda p: b"\x45" + b"\x00" * 30,
])
def test_bad_packets_raise_badpacket(mangle) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ip.BadPacket):
        ip.parse_packet(mangle(good_tcp()))


def test_fragment_offset_dropped() -> None:
    p = bytearray(ip.build_udp(A, B, 1, 53, b"x" * 20))
    p[6:8] = struct.pack("!H", 0x0010)  # offset 16*8
    p[10:12] = b"\0\0"
    p[10:12] = struct.pack("!H", ip.checksum(bytes(p[:20])))
    with pytest.raises(ip.BadPacket, match="fragment"):
        ip.parse_packet(bytes(p))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_escapes_as_other_exceptions(data: bytes) -> None:
    try:
        ip.parse_packet(data)
    except ip.BadPacket:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 59), st.binary(min_size=1, max_size=8))
def test_corrupted_valid_packets_are_rejected_or_parse(pos: int, junk: bytes) -> None:
    p = bytearray(good_tcp(b"0123456789abcdef"))
    p[pos : pos + len(junk)] = junk
    try:
        ip.parse_packet(bytes(p))
    except ip.BadPacket:
        pass


# ---- virtual DNS -----------------------------------------------------------------------


def ask(dns: VirtualDns, name: str, qtype: str = "A", now: float = 0.0) -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    raw = dns.handle(q.pack(), now)
    assert raw is not None
    r = DNSRecord.parse(raw)
    assert r.header.id == q.header.id and r.header.qr == 1
    return r


def test_a_queries_get_stable_fake_addresses_and_reverse_lookup() -> None:
    dns = VirtualDns()
    r1 = ask(dns, "Example.COM")
    r2 = ask(dns, "example.com.")
    r3 = ask(dns, "other.test")
    a1, a2, a3 = (str(r.a.rdata) for r in (r1, r2, r3))
    assert a1 == a2 and a1 != a3
    assert a1.startswith("198.18.") or a1.startswith("198.19.")
    assert dns.name_for(bytes(map(int, a1.split("."))), 1.0) == "example.com"
    ptr = ask(dns, ".".join(reversed(a1.split("."))) + ".in-addr.arpa", "PTR")
    assert str(ptr.rr[0].rdata) == "example.com."


def test_aaaa_and_others_answer_empty_noerror() -> None:
    dns = VirtualDns()
    for qtype in ("AAAA", "MX", "TXT"):
        r = ask(dns, "example.com", qtype)
        assert r.header.rcode == RCODE.NOERROR and not r.rr


def test_mappings_last_until_their_address_is_needed() -> None:
    """A program that resolved once may keep using the address long after: the mapping
    lasts until the pool needs that address for another name. Addresses never handed out
    name nothing."""
    dns = VirtualDns()
    addr = dns.address_for("a.test", 0.0)
    assert addr is not None
    assert dns.name_for(addr, 50.0) == "a.test"
    assert dns.name_for(addr, 100000.0) == "a.test"  # long unused: still there
    assert dns.name_for(bytes([198, 18, 200, 200]), 0.0) is None  # never handed out


def test_a_full_pool_answers_new_names_at_once() -> None:
    """Once every address was handed out, new names got SERVFAIL until a mapping had gone
    unused for 10 minutes, and one program asking unique names again and again kept it so for
    every other program. Now the least recently used address is recycled at once."""
    dns = VirtualDns(network="198.18.0.0/29")  # 6 usable addresses
    addrs = [dns.address_for(f"h{i}.test", float(i)) for i in range(6)]
    assert None not in addrs and len(set(addrs)) == 6
    assert dns.name_for(addrs[0], 6.0) == "h0.test"  # a use: h1 is now the least recently used
    for i in range(40):  # the flood: unique names, each asked twice (a refresh)
        for _ in range(2):
            r = ask(dns, f"flood{i}.test", now=10.0 + i)
            assert r.header.rcode == RCODE.NOERROR and r.rr, i
        if i == 0:
            assert str(r.a.rdata) == "198.18.0.2"  # h1's address went first
    r = ask(dns, "intranet.corp", now=60.0)  # another program, right away
    assert r.header.rcode == RCODE.NOERROR and r.rr


def test_a_full_pool_never_takes_an_address_a_flow_holds() -> None:
    """Recycling must not re-point an address a live flow uses (the app may connect again)."""
    dns = VirtualDns(network="198.18.0.0/29")
    addrs = [dns.address_for(f"h{i}.test", float(i)) for i in range(6)]
    held = [a for a in addrs[:2] if a is not None]
    for a in held:
        dns.hold(a)  # live flows to h0 and h1, the least recently used
    dns.hold(held[0])  # two flows to h0
    for i in range(40):
        assert dns.address_for(f"flood{i}.test", 10.0 + i) not in held
    assert [dns.name_for(a, 61.0) for a in held] == ["h0.test", "h1.test"]
    dns.release(held[1])  # h1's flow ended: its address is free to go again
    assert held[1] in {dns.address_for(f"after{i}.test", 80.0) for i in range(5)}
    dns.release(held[0])  # one of h0's two flows ended: still held
    for i in range(5):
        assert dns.address_for(f"last{i}.test", 90.0) != held[0]
    assert dns.name_for(held[0], 91.0) == "h0.test"


def test_an_exhausted_pool_keeps_answering_after_the_mappings_age() -> None:
    """Every address handed out, then a connection to each (which used to drop its mapping
    and lose the address for good): new names still get addresses, recycled LRU."""
    dns = VirtualDns(network="198.18.0.0/29")
    addrs = [dns.address_for(f"h{i}.test", 0.0) for i in range(6)]
    for a in addrs:
        assert a is not None and dns.name_for(a, 500.0) is not None
    late = [dns.address_for(f"late{i}.test", 700.0) for i in range(6)]
    assert sorted(late) == sorted(addrs)  # (bytes | None: a None would fail the sort)


def test_a_pool_held_entirely_by_live_flows_gets_servfail() -> None:
    dns = VirtualDns(network="198.18.0.0/30")  # 2 usable addresses
    for name in ("a.test", "b.test"):
        addr = dns.address_for(name, 0.0)
        assert addr is not None
        dns.hold(addr)
    r = ask(dns, "c.test", now=1.0)
    assert r.header.rcode == RCODE.SERVFAIL and not r.rr
    assert sorted(dns.name_for(a, 2.0) or "" for a in (bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2]))) == [
        "a.test", "b.test"]


def test_crafted_compression_pointers_cost_nothing() -> None:
    """One datagram: a name of 16,000 one-byte labels and thousands of questions pointing
    at it. dnslib's parser took 80 s and 4.5 GB for this; it is refused on sight now (more
    than one question, and a query's only name never needs a pointer)."""
    import struct
    import time

    name = b"\x01a" * 16000 + b"\x00"
    questions = b"\xc0\x0c\x00\x01\x00\x01" * 5000
    bomb = struct.pack("!6H", 1, 0x0100, 5001, 0, 0, 0) + name + b"\x00\x01\x00\x01" + questions
    pointer = struct.pack("!6H", 2, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01"
    long_name = struct.pack("!6H", 3, 0x0100, 1, 0, 0, 0) + (b"\x3f" + b"a" * 63) * 5 + b"\x00\x00\x01\x00\x01"
    dns = VirtualDns()
    t0 = time.perf_counter()
    assert dns.handle(bomb, 0.0) is None  # longer than any query
    assert dns.handle(bomb[:4000], 0.0) is not None  # within the size: FORMERR (5001 questions)
    assert DNSRecord.parse(dns.handle(bomb[:4000], 0.0) or b"").header.rcode == RCODE.FORMERR
    assert dns.handle(pointer, 0.0) is None
    assert dns.handle(long_name, 0.0) is None  # a name over 255 bytes
    assert time.perf_counter() - t0 < 1.0 and len(dns) == 0


def test_one_question_per_query() -> None:
    """Resolvers ask one question per query; many in one (a reply too big for a datagram,
    thousands of fake addresses handed out by one packet) get FORMERR and no address."""
    dns = VirtualDns()
    q = DNSRecord.question("a.test")
    for i in range(3):
        q.add_question(DNSQuestion(f"x{i}.test"))
    r = DNSRecord.parse(dns.handle(q.pack(), 0.0) or b"")
    assert r.header.rcode == RCODE.FORMERR and not r.rr and len(dns) == 0


@pytest.mark.parametrize("junk", [b"", b"\x00" * 5, b"\xff" * 40, DNSRecord.question("x.test").pack()[:-3]])
def test_garbage_queries_are_dropped(junk: bytes) -> None:
    assert VirtualDns().handle(junk, 0.0) is None


def test_responses_are_not_answered() -> None:
    q = DNSRecord.question("x.test")
    assert VirtualDns().handle(q.reply().pack(), 0.0) is None


def test_qtype_any_gets_an_address() -> None:
    r = ask(VirtualDns(), "any.test", "ANY")
    assert r.rr and r.rr[0].rtype == QTYPE.A


# ---- IPv6 ------------------------------------------------------------------------------

A6 = bytes.fromhex("fd777772616900000000000000000002")
B6 = bytes.fromhex("fd800000000000000000000000000001")


def test_ipv6_tcp_and_udp_roundtrip() -> None:
    seg = ip.parse_packet(ip.build_tcp(A6, B6, 1, 2, 3, 4, ip.ACK, 100, b"six"))
    assert isinstance(seg, ip.TcpSegment) and seg.src == A6 and seg.payload == b"six"
    dg = ip.parse_packet(ip.build_udp(A6, B6, 5, 53, b"q"))
    assert isinstance(dg, ip.UdpDatagram) and dg.dst == B6 and dg.payload == b"q"


def test_ipv6_icmp_port_unreachable() -> None:
    dg = ip.parse_packet(ip.build_udp(A6, B6, 5000, 9999, b"x" * 2000))
    assert isinstance(dg, ip.UdpDatagram)
    icmp = ip.build_icmp_port_unreachable(dg)
    assert icmp[0] >> 4 == 6 and icmp[6] == ip.PROTO_ICMPV6 and icmp[8:24] == B6 and icmp[24:40] == A6
    assert icmp[40:42] == b"\x01\x04"
    assert len(icmp) <= ip.IPV6_MIN_MTU  # the quote is trimmed
    assert ip._verify(ip._pseudo(B6, A6, ip.PROTO_ICMPV6, len(icmp) - 40) + icmp[40:])


def test_ipv6_bad_packets() -> None:
    good = ip.build_tcp(A6, B6, 1, 2, 3, 4, ip.ACK, 100, b"six")
    for bad in (good[:39], good[:4] + b"\xff\xff" + good[6:], good[:-1] + b"!",
                good[:6] + bytes([44]) + good[7:]):  # fragment header
        with pytest.raises(ip.BadPacket):
            ip.parse_packet(bad)
    udp = bytearray(ip.build_udp(A6, B6, 5, 6, b"zz"))
    udp[46:48] = b"\0\0"  # a zero UDP checksum is not allowed over IPv6
    with pytest.raises(ip.BadPacket):
        ip.parse_packet(bytes(udp))


def test_unicast_test_for_icmp_errors() -> None:
    def v4(a: str) -> bytes:
        return bytes(map(int, a.split(".")))

    for addr in ("224.0.0.251", "239.255.255.250", "255.255.255.255", "0.0.0.0"):
        assert not ip.is_unicast(v4(addr)), addr
    assert not ip.is_unicast(v4("10.0.0.255"), frozenset({v4("10.0.0.255")}))
    assert ip.is_unicast(v4("10.0.0.255")) and ip.is_unicast(v4("10.80.0.1"))
    assert not ip.is_unicast(bytes.fromhex("ff0200000000000000000000000000fb")) and not ip.is_unicast(bytes(16))
    assert ip.is_unicast(B6)


def test_ipv6_flow_uses_ipv6_mss() -> None:
    from wraith_tun import tcp

    syn = ip.parse_packet(ip.build_tcp(A6, B6, 1, 2, 100, 0, ip.SYN, 65535, b"", ip.tcp_syn_options(65000, 7)))
    assert isinstance(syn, ip.TcpSegment)
    conn = tcp.TcpConnection(syn, 0.0, tcp.TcpConfig(mtu=9000), iss=1)
    conn.accept(0.0)
    (sa_raw,) = conn.packets_to_send()
    sa = ip.parse_packet(sa_raw)
    assert isinstance(sa, ip.TcpSegment) and sa.options.mss == 9000 - 60 and sa.dst == A6
    assert conn.mss == 8940
