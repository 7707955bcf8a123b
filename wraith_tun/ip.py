"""IPv4 / IPv6 / TCP / UDP / ICMP packet parsing and building (no I/O).

Everything the TUN carries goes through :func:`parse_packet`; anything that is
not a well-formed, checksum-correct, unfragmented IP packet raises
:class:`BadPacket` and is dropped by the caller. Addresses are raw bytes: 4 of
them for IPv4, 16 for IPv6, and the builders pick the IP version from that.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from itertools import count

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
IPV6_MIN_MTU = 1280

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20

_IP_HDR = struct.Struct("!BBHHHBBH4s4s")
_TCP_HDR = struct.Struct("!HHIIBBHHH")
_UDP_HDR = struct.Struct("!HHHH")
_IP6_HDR = struct.Struct("!IHBB16s16s")

_ip_ids = count(1)


class BadPacket(ValueError):
    """A packet that must be dropped (truncated, bad checksum, fragment, ...)."""


def checksum(data: bytes | bytearray | memoryview) -> int:
    """Internet checksum (RFC 1071) of ``data``.

    The ones'-complement sum of 16-bit big-endian words is congruent to the
    whole buffer read as one big-endian integer modulo 0xFFFF (2**16 == 1 mod
    0xFFFF), which lets C code do the summing.
    """
    if len(data) % 2:
        data = bytes(data) + b"\0"
    s = int.from_bytes(data, "big") % 0xFFFF
    return (~s) & 0xFFFF  # s == 0 yields 0xFFFF, valid for TCP and UDP alike


def _verify(data: bytes | bytearray | memoryview) -> bool:
    if len(data) % 2:
        data = bytes(data) + b"\0"
    return int.from_bytes(data, "big") % 0xFFFF == 0


def _pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 16:
        return src + dst + struct.pack("!IxxxB", length, proto)
    return src + dst + struct.pack("!BBH", 0, proto, length)


@dataclass(slots=True)
class TcpOptions:
    mss: int | None = None
    wscale: int | None = None


@dataclass(slots=True)
class TcpSegment:
    src: bytes  # 4 bytes, the app side
    dst: bytes  # 4 bytes, the address the app connected to
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int  # raw 16-bit field (unscaled)
    payload: bytes
    options: TcpOptions = field(default_factory=TcpOptions)

    @property
    def seg_len(self) -> int:
        return len(self.payload) + (1 if self.flags & SYN else 0) + (1 if self.flags & FIN else 0)


@dataclass(slots=True)
class UdpDatagram:
    src: bytes
    dst: bytes
    sport: int
    dport: int
    payload: bytes
    ip_header: bytes  # what an ICMP error quotes: IPv4 header + 8 bytes / IPv6 packet up to 1232 bytes


@dataclass(slots=True)
class OtherPacket:
    """A valid IP packet of a protocol we do not handle (ICMP, ...)."""

    src: bytes
    dst: bytes
    proto: int


Packet = TcpSegment | UdpDatagram | OtherPacket


def _parse_tcp_options(raw: bytes) -> TcpOptions:
    opts = TcpOptions()
    i = 0
    n = len(raw)
    while i < n:
        kind = raw[i]
        if kind == 0:  # end of options
            break
        if kind == 1:  # NOP
            i += 1
            continue
        if i + 1 >= n:
            raise BadPacket("truncated TCP option")
        length = raw[i + 1]
        if length < 2 or i + length > n:
            raise BadPacket("bad TCP option length")
        if kind == 2 and length == 4:
            opts.mss = struct.unpack_from("!H", raw, i + 2)[0]
        elif kind == 3 and length == 3:
            opts.wscale = min(raw[i + 2], 14)
        i += length
    return opts


def parse_packet(pkt: bytes, verify_l4: bool = True) -> Packet:
    """Parse one IP packet as read from the TUN; raise BadPacket to drop it.

    ``verify_l4=False`` skips TCP/UDP checksums the kernel vouched for (offload).
    """
    if not pkt:
        raise BadPacket("empty packet")
    version = pkt[0] >> 4
    if version == 4:
        return _parse_v4(pkt, verify_l4)
    if version == 6:
        return _parse_v6(pkt, verify_l4)
    raise BadPacket("not IP")


def _parse_v4(pkt: bytes, verify_l4: bool) -> Packet:
    if len(pkt) < 20:
        raise BadPacket("short packet")
    vihl, _tos, total, _ident, frag, _ttl, proto, _csum, src, dst = _IP_HDR.unpack_from(pkt)
    ihl = (vihl & 0xF) * 4
    if ihl < 20 or total < ihl or total > len(pkt):
        raise BadPacket("bad IPv4 lengths")
    if frag & 0x3FFF:  # MF set or non-zero offset
        raise BadPacket("fragment")
    if not _verify(memoryview(pkt)[:ihl]):
        raise BadPacket("bad IPv4 header checksum")
    return _parse_l4(proto, src, dst, pkt[ihl:total], verify_l4, pkt[: ihl + 8])


def _parse_v6(pkt: bytes, verify_l4: bool) -> Packet:
    if len(pkt) < 40:
        raise BadPacket("short IPv6 packet")
    _vtf, plen, nh, _hlim, src, dst = _IP6_HDR.unpack_from(pkt)
    if 40 + plen > len(pkt):
        raise BadPacket("bad IPv6 length")
    if nh == 44:
        raise BadPacket("fragment")
    # extension headers other than fragments are not followed: such packets are "other"
    return _parse_l4(nh, src, dst, pkt[40 : 40 + plen], verify_l4, pkt[: min(40 + plen, IPV6_MIN_MTU - 48)])


def _parse_l4(proto: int, src: bytes, dst: bytes, body: bytes, verify_l4: bool, quote: bytes) -> Packet:
    if proto == PROTO_TCP:
        if len(body) < 20:
            raise BadPacket("short TCP header")
        if verify_l4 and not _verify(_pseudo(src, dst, PROTO_TCP, len(body)) + body):
            raise BadPacket("bad TCP checksum")
        sport, dport, seq, ack, off, flags, window, _c, _urg = _TCP_HDR.unpack_from(body)
        doff = (off >> 4) * 4
        if doff < 20 or doff > len(body):
            raise BadPacket("bad TCP data offset")
        opts = _parse_tcp_options(body[20:doff]) if doff > 20 else TcpOptions()
        return TcpSegment(src, dst, sport, dport, seq, ack, flags & 0x3F, window, body[doff:], opts)
    if proto == PROTO_UDP:
        if len(body) < 8:
            raise BadPacket("short UDP header")
        sport, dport, ulen, csum = _UDP_HDR.unpack_from(body)
        if ulen < 8 or ulen > len(body):
            raise BadPacket("bad UDP length")
        body = body[:ulen]
        if len(src) == 16 and not csum:
            raise BadPacket("UDP over IPv6 without checksum")
        if verify_l4 and csum and not _verify(_pseudo(src, dst, PROTO_UDP, ulen) + body):
            raise BadPacket("bad UDP checksum")
        return UdpDatagram(src, dst, sport, dport, body[8:], quote)
    return OtherPacket(src, dst, proto)


def _ip_header(src: bytes, dst: bytes, proto: int, payload_len: int, df: bool) -> bytes:
    if len(src) == 16:
        return _IP6_HDR.pack(0x60000000, payload_len, proto, 64, src, dst)
    hdr = _IP_HDR.pack(
        0x45, 0, 20 + payload_len, next(_ip_ids) & 0xFFFF, 0x4000 if df else 0, 64, proto, 0, src, dst
    )
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]


def build_tcp(
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    payload: bytes = b"",
    options: bytes = b"",
    csum_needed: bool = True,
) -> bytes:
    """Build a complete IPv4+TCP packet (``options`` must be a multiple of 4 bytes).

    ``csum_needed=False`` writes only the pseudo-header sum into the checksum
    field (a "partial" checksum, as for CHECKSUM_PARTIAL / virtio_net_hdr
    NEEDS_CSUM): the kernel completes or trusts it, and no payload is summed.
    """
    doff = 20 + len(options)
    hdr = _TCP_HDR.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, (doff // 4) << 4, flags, window, 0, 0)
    seg_len = doff + len(payload)
    pseudo = _pseudo(src, dst, PROTO_TCP, seg_len)
    if csum_needed:
        csum = checksum(pseudo + hdr + options + payload)
    else:
        csum = int.from_bytes(pseudo, "big") % 0xFFFF
    tcp = hdr[:16] + struct.pack("!H", csum) + hdr[18:] + options
    return _ip_header(src, dst, PROTO_TCP, seg_len, True) + tcp + payload


def tcp_syn_options(mss: int, wscale: int | None) -> bytes:
    opts = struct.pack("!BBH", 2, 4, mss)
    if wscale is not None:
        opts += struct.pack("!BBBB", 1, 3, 3, wscale)
    return opts


def build_udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    ulen = 8 + len(payload)
    hdr = _UDP_HDR.pack(sport, dport, ulen, 0)
    csum = checksum(_pseudo(src, dst, PROTO_UDP, ulen) + hdr + payload)
    return _ip_header(src, dst, PROTO_UDP, ulen, False) + hdr[:6] + struct.pack("!H", csum) + payload


def is_unicast(addr: bytes, broadcast: frozenset[bytes] = frozenset()) -> bool:
    """False for addresses that name no single host: IPv4 0.0.0.0, multicast (224/4), the limited
    broadcast 255.255.255.255 and ``broadcast`` (the TUN network's own), IPv6 :: and ff00::/8."""
    if len(addr) == 16:
        return addr[0] != 0xFF and any(addr)
    return addr[0] & 0xF0 != 0xE0 and addr != b"\xff\xff\xff\xff" and any(addr) and addr not in broadcast


def build_icmp_port_unreachable(dgram: UdpDatagram) -> bytes:
    """ICMP (v4: type 3 code 3; v6: type 1 code 4) from the datagram's destination back to its source."""
    if len(dgram.src) == 16:
        body = struct.pack("!BBHI", 1, 4, 0, 0) + dgram.ip_header
        csum = checksum(_pseudo(dgram.dst, dgram.src, PROTO_ICMPV6, len(body)) + body)
        body = body[:2] + struct.pack("!H", csum) + body[4:]
        return _ip_header(dgram.dst, dgram.src, PROTO_ICMPV6, len(body), False) + body
    body = struct.pack("!BBHI", 3, 3, 0, 0) + dgram.ip_header
    body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    return _ip_header(dgram.dst, dgram.src, PROTO_ICMP, len(body), False) + body


def ip_header_len(pkt: bytes) -> int:
    return 40 if pkt[0] >> 4 == 6 else (pkt[0] & 0xF) * 4


def ip_proto(pkt: bytes) -> int:
    return pkt[6] if pkt[0] >> 4 == 6 else pkt[9]
