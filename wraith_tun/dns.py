"""Virtual DNS: A queries get fake addresses from 198.18.0.0/15 (RFC 2544 benchmark space).

The shim remembers name <-> address; a TCP flow to a fake address becomes a
SOCKS5h CONNECT with the name, so the real lookup happens on the server side.
Parsing and building DNS messages is dnslib's job, not ours.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass

from dnslib import PTR, QTYPE, RCODE, RR, A, DNSRecord

FAKE_NET = ipaddress.IPv4Network("198.18.0.0/15")


@dataclass(slots=True)
class _Entry:
    name: str
    expires: float


def _name_of(label: object) -> str | None:
    parts = []
    for raw in getattr(label, "label", ()):
        try:
            part = raw.decode("ascii")
        except UnicodeDecodeError:
            return None
        if not part or not all(33 <= ord(c) < 127 for c in part):
            return None
        parts.append(part.lower())
    name = ".".join(parts)
    return name if 0 < len(name) <= 253 else None


class VirtualDns:
    """Name <-> fake address memory plus the query responder (sans-I/O)."""

    def __init__(self, network: str = "198.18.0.0/15", ttl: int = 30, keep: float = 600.0):
        self.network = ipaddress.IPv4Network(network)
        self.ttl = ttl  # what answers say
        self.keep = keep  # how long a mapping survives after its last use
        self._first = int(self.network.network_address) + 1
        self._last = int(self.network.broadcast_address) - 1
        self._next = self._first
        self._by_ip: OrderedDict[int, _Entry] = OrderedDict()  # oldest use first
        self._by_name: dict[str, int] = {}
        self.queries = 0

    # ---- memory ------------------------------------------------------------------

    def is_fake(self, addr: bytes) -> bool:
        return len(addr) == 4 and ipaddress.IPv4Address(addr) in self.network

    def address_for(self, name: str, now: float) -> bytes | None:
        """The fake address for ``name``; None when every address is in use."""
        ip = self._by_name.get(name)
        if ip is None:
            ip = self._allocate(now)
            if ip is None:
                return None
            self._by_name[name] = ip
            self._by_ip[ip] = _Entry(name, now + self.keep)
        else:
            self._touch(ip, now)
        return ip.to_bytes(4, "big")

    def name_for(self, addr: bytes, now: float) -> str | None:
        """The name behind a fake address (refreshes its lifetime), or None if unknown/expired."""
        ip = int.from_bytes(addr, "big")
        entry = self._by_ip.get(ip)
        if entry is None:
            return None
        if entry.expires < now:
            self._drop(ip)
            return None
        self._touch(ip, now)
        return entry.name

    def __len__(self) -> int:
        return len(self._by_ip)

    def _touch(self, ip: int, now: float) -> None:
        self._by_ip[ip].expires = now + self.keep
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
        # pool used up: recycle the least recently used mapping, but only once it has gone
        # unused for ``keep``: a live address must never start naming another host (a local
        # program flooding queries could otherwise re-point another program's answer)
        oldest = next(iter(self._by_ip))
        if self._by_ip[oldest].expires >= now:
            return None
        self._drop(oldest)
        return oldest

    # ---- responder -----------------------------------------------------------------

    def handle(self, query: bytes, now: float) -> bytes | None:
        """Answer one DNS query datagram; None means drop it (not a parsable query)."""
        try:
            req = DNSRecord.parse(query)
        except Exception:  # dnslib raises assorted errors (DNSError, struct.error, ...) on garbage
            return None
        if req.header.qr or req.header.opcode != 0 or not req.questions:
            return None
        self.queries += 1
        reply = req.reply()
        reply.header.ra = 1
        if len(req.questions) != 1:  # what resolvers send; many would make a reply too big to send
            reply.questions = []
            reply.header.rcode = RCODE.FORMERR
        for q in reply.questions:
            name = _name_of(q.qname)
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
