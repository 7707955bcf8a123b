"""Virtual DNS: A queries get fake addresses from 198.18.0.0/15 (RFC 2544 benchmark space).

The shim remembers name <-> address; a TCP flow to a fake address becomes a
SOCKS5h CONNECT with the name, so the real lookup happens on the server side.
Parsing and building DNS messages is dnslib's job, not ours.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
from collections import OrderedDict
from dataclasses import dataclass

from dnslib import PTR, QTYPE, RCODE, RR, A, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

log = logging.getLogger("wraith_tun")

FAKE_NET = ipaddress.IPv4Network("198.18.0.0/15")
# A query is a header and one question, perhaps an EDNS record: anything longer is not one.
MAX_QUERY = 4096


@dataclass(slots=True)
class _Entry:
    name: str
    used: float  # last time the mapping was handed out or connected to


def _name_of(labels: list[bytes]) -> str | None:
    parts = []
    for raw in labels:
        try:
            part = raw.decode("ascii")
        except UnicodeDecodeError:
            return None
        if not part or not all(33 <= ord(c) < 127 for c in part):
            return None
        parts.append(part.lower())
    name = ".".join(parts)
    return name if 0 < len(name) <= 253 else None


@dataclass(slots=True)
class _Query:
    ident: int
    rd: int
    labels: list[bytes]  # the question's name (empty when the query has no single question)
    qtype: int
    qclass: int


def _parse_query(query: bytes) -> _Query | None:
    """The header and the single question of a query, read by hand: dnslib's parser
    follows compression pointers without a bound (one crafted 64 KB datagram took
    80 s and 4.5 GB), and a query's only name never needs one. None: drop it."""
    if not 12 <= len(query) <= MAX_QUERY:
        return None
    ident, flags, qdcount, ancount, nscount, arcount = struct.unpack_from("!6H", query)
    if flags & 0x8000 or (flags >> 11) & 0xF:  # a response, or not a standard query
        return None
    rd = (flags >> 8) & 1
    if qdcount != 1 or ancount or nscount or arcount > 1:
        return _Query(ident, rd, [], 0, 0)  # FORMERR
    pos, labels, size = 12, [], 0
    while True:
        if pos >= len(query):
            return None
        n = query[pos]
        pos += 1
        if n == 0:
            break
        if n > 63 or pos + n > len(query):  # a compression pointer (or reserved bits), or truncated
            return None
        size += n + 1
        if size > 255:
            return None
        labels.append(bytes(query[pos:pos + n]))
        pos += n
    if pos + 4 > len(query):
        return None
    qtype, qclass = struct.unpack_from("!HH", query, pos)
    return _Query(ident, rd, labels, qtype, qclass)


class VirtualDns:
    """Name <-> fake address memory plus the query responder (sans-I/O)."""

    def __init__(self, network: str = "198.18.0.0/15", ttl: int = 30):
        self.network = ipaddress.IPv4Network(network)
        self.ttl = ttl  # what answers say
        self._first = int(self.network.network_address) + 1
        self._last = int(self.network.broadcast_address) - 1
        self._next = self._first
        self._by_ip: OrderedDict[int, _Entry] = OrderedDict()  # oldest use first
        self._by_name: dict[str, int] = {}
        self._held: dict[int, int] = {}  # address -> live flows to it: never recycled
        self._warned = False
        self.queries = 0

    # ---- memory ------------------------------------------------------------------

    def is_fake(self, addr: bytes) -> bool:
        return len(addr) == 4 and ipaddress.IPv4Address(addr) in self.network

    def address_for(self, name: str, now: float) -> bytes | None:
        """The fake address for ``name``; None only when a live flow holds every address."""
        ip = self._by_name.get(name)
        if ip is None:
            ip = self._allocate(now)
            if ip is None:
                return None
            self._by_name[name] = ip
            self._by_ip[ip] = _Entry(name, now)
        else:
            self._touch(ip, now)
        return ip.to_bytes(4, "big")

    def name_for(self, addr: bytes, now: float) -> str | None:
        """The name behind a fake address (counts as a use), or None if unknown.
        A mapping lasts until its address is needed for another name (``_allocate``):
        programs that resolve once and keep the address (JVMs, proxies' upstreams) go on
        reaching their host for as long as the pool is not used up."""
        ip = int.from_bytes(addr, "big")
        entry = self._by_ip.get(ip)
        if entry is None:
            return None
        self._touch(ip, now)
        return entry.name

    def hold(self, addr: bytes) -> None:
        """A flow to ``addr`` started: its address must keep naming the same host while it lives
        (its SOCKS5 CONNECT used the name, but the app may open more connections to the address)."""
        ip = int.from_bytes(addr, "big")
        self._held[ip] = self._held.get(ip, 0) + 1

    def release(self, addr: bytes) -> None:
        ip = int.from_bytes(addr, "big")
        n = self._held.get(ip, 0) - 1
        if n > 0:
            self._held[ip] = n
        else:
            self._held.pop(ip, None)

    def __len__(self) -> int:
        return len(self._by_ip)

    def _touch(self, ip: int, now: float) -> None:
        self._by_ip[ip].used = now
        self._by_ip.move_to_end(ip)

    def _drop(self, ip: int) -> None:
        entry = self._by_ip.pop(ip)
        if self._by_name.get(entry.name) == ip:
            del self._by_name[entry.name]

    def _allocate(self, now: float) -> int | None:
        if self._next <= self._last:
            ip = self._next
            self._next += 1
            return ip
        # Pool used up (131070 names): recycle the least recently used mapping that no live flow
        # holds. Refusing instead (SERVFAIL until mappings aged) let one program flooding unique
        # names deny every other program new names for as long as it kept flooding; LRU order
        # means a flood recycles its own old names first once the others are in use.
        for _ in range(len(self._by_ip)):
            ip, entry = next(iter(self._by_ip.items()))
            if ip in self._held:
                self._by_ip.move_to_end(ip)  # in use: as good as just used (and skipped in O(1) next time)
                continue
            if now - entry.used < self.ttl and not self._warned:
                self._warned = True  # an answer younger than its TTL is re-pointed: say why, once
                log.warning("virtual DNS: all %d addresses in use; recycling ones handed out less than %d s ago "
                            "(something is asking for very many names)", len(self._by_ip), self.ttl)
            self._drop(ip)
            return ip
        return None

    # ---- responder -----------------------------------------------------------------

    def handle(self, query: bytes, now: float) -> bytes | None:
        """Answer one DNS query datagram; None means drop it (not a parsable query)."""
        parsed = _parse_query(query)
        if parsed is None:
            return None
        self.queries += 1
        reply = DNSRecord(DNSHeader(id=parsed.ident, qr=1, aa=1, ra=1, rd=parsed.rd))
        if not parsed.labels:  # one question is what resolvers send; more would make a reply too
            reply.header.rcode = RCODE.FORMERR  # big to send (and hand out addresses by thousands)
        else:
            reply.add_question(DNSQuestion(DNSLabel(parsed.labels), parsed.qtype, parsed.qclass))
        for q in reply.questions:
            name = _name_of(parsed.labels)
            if name is None:
                reply.header.rcode = RCODE.FORMERR
                continue
            if q.qclass != 1:
                continue
            if q.qtype == QTYPE.A or q.qtype == QTYPE.ANY:
                addr = self.address_for(name, now)
                if addr is None:
                    reply.header.rcode = RCODE.SERVFAIL
                    continue
                reply.add_answer(RR(q.qname, QTYPE.A, rdata=A(ipaddress.IPv4Address(addr).exploded), ttl=self.ttl))
            elif q.qtype == QTYPE.PTR:
                target = self._reverse(name, now)
                if target is not None:
                    reply.add_answer(RR(q.qname, QTYPE.PTR, rdata=PTR(target), ttl=self.ttl))
            # AAAA and everything else: NOERROR with no answer. Names always get IPv4 fake
            # addresses; IPv6 through the TUN is for programs that dial IPv6 literals.
        try:
            packed: bytes = reply.pack()
        except Exception:
            return None
        return packed

    def _reverse(self, name: str, now: float) -> str | None:
        if not name.endswith(".in-addr.arpa"):
            return None
        parts = name[: -len(".in-addr.arpa")].split(".")
        if len(parts) != 4:
            return None
        try:
            addr = ipaddress.IPv4Address(".".join(reversed(parts)))
        except ValueError:
            return None
        if addr not in self.network:
            return None
        return self.name_for(addr.packed, now)
