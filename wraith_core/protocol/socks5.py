"""SOCKS5 server-side handshake (RFC 1928) with optional RFC 1929 auth, sans-I/O.

Usage::

    conn = Socks5Server(credentials=None)
    conn.receive_data(data)
    for event in conn.events():          # ConnectRequest | HandshakeFailed
        ...
    sock.write(conn.data_to_send())
    conn.reply(Reply.SUCCEEDED)          # once the target is open (or a failure code)

Only CONNECT is supported; anything else is answered with the matching reply
code and the handshake fails. Bytes that follow the CONNECT request (a client
that sends optimistically) are kept in ``trailing_data``.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass

VERSION = 5
MAX_HANDSHAKE = 1024  # no valid greeting + request is longer than this


class Reply(enum.IntEnum):
    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    TTL_EXPIRED = 6
    COMMAND_NOT_SUPPORTED = 7
    ADDRESS_TYPE_NOT_SUPPORTED = 8


class _State(enum.Enum):
    GREETING = "greeting"
    AUTH = "auth"
    REQUEST = "request"
    WAIT_REPLY = "wait_reply"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class ConnectRequest:
    host: str
    port: int
    kind: str  # "ipv4" | "ipv6" | "domain"


@dataclass(frozen=True)
class HandshakeFailed:
    reason: str


Event = ConnectRequest | HandshakeFailed

_NO_AUTH = 0x00
_USERPASS = 0x02
_NO_ACCEPTABLE = 0xFF


class Socks5Server:
    def __init__(self, credentials: tuple[bytes, bytes] | None = None) -> None:
        self._creds = credentials
        self._state = _State.GREETING
        self._in = bytearray()
        self._out = bytearray()
        self._events: list[Event] = []
        self.trailing_data = b""

    # -- public ---------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state.value

    @property
    def failed(self) -> bool:
        return self._state is _State.FAILED

    def receive_data(self, data: bytes) -> None:
        if self._state in (_State.WAIT_REPLY, _State.DONE):
            self.trailing_data += data
            return
        if self._state is _State.FAILED:
            return
        self._in += data
        self._advance()
        if self._state not in (_State.WAIT_REPLY, _State.DONE, _State.FAILED) and len(self._in) > MAX_HANDSHAKE:
            self._fail("handshake too long")

    def events(self) -> list[Event]:
        ev, self._events = self._events, []
        return ev

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def reply(self, code: Reply) -> None:
        """Answer the CONNECT request. Bind address is reported as 0.0.0.0:0."""
        if self._state is not _State.WAIT_REPLY:
            raise RuntimeError(f"reply() in state {self._state.value}")
        self._out += bytes([VERSION, int(code), 0, 1, 0, 0, 0, 0, 0, 0])
        self._state = _State.DONE if code == Reply.SUCCEEDED else _State.FAILED

    # -- state machine ----------------------------------------------------------

    def _fail(self, reason: str, reply: Reply | None = None) -> None:
        if reply is not None:
            self._out += bytes([VERSION, int(reply), 0, 1, 0, 0, 0, 0, 0, 0])
        self._state = _State.FAILED
        self._in.clear()
        self._events.append(HandshakeFailed(reason))

    def _advance(self) -> None:
        while True:
            before = self._state
            if before is _State.GREETING:
                self._greeting()
            elif before is _State.AUTH:
                self._auth()
            elif before is _State.REQUEST:
                self._request()
            if self._state is before or self._state in (_State.WAIT_REPLY, _State.FAILED):
                return

    def _greeting(self) -> None:
        buf = self._in
        if len(buf) < 2:
            return
        if buf[0] != VERSION:
            self._fail(f"not SOCKS5 (version byte {buf[0]})")
            return
        nmethods = buf[1]
        if nmethods == 0:
            self._out += bytes([VERSION, _NO_ACCEPTABLE])
            self._fail("no authentication methods offered")
            return
        if len(buf) < 2 + nmethods:
            return
        methods = set(buf[2 : 2 + nmethods])
        del buf[: 2 + nmethods]
        wanted = _USERPASS if self._creds is not None else _NO_AUTH
        if wanted not in methods:
            self._out += bytes([VERSION, _NO_ACCEPTABLE])
            self._fail("no acceptable authentication method")
            return
        self._out += bytes([VERSION, wanted])
        self._state = _State.AUTH if wanted == _USERPASS else _State.REQUEST

    def _auth(self) -> None:
        buf = self._in
        if len(buf) < 2:
            return
        if buf[0] != 1:
            self._out += b"\x01\x01"
            self._fail("bad username/password auth version")
            return
        ulen = buf[1]
        if len(buf) < 2 + ulen + 1:
            return
        plen = buf[2 + ulen]
        total = 3 + ulen + plen
        if len(buf) < total:
            return
        user = bytes(buf[2 : 2 + ulen])
        pw = bytes(buf[3 + ulen : total])
        del buf[:total]
        assert self._creds is not None
        if not (_consteq(user, self._creds[0]) & _consteq(pw, self._creds[1])):
            self._out += b"\x01\x01"
            self._fail("authentication failed")
            return
        self._out += b"\x01\x00"
        self._state = _State.REQUEST

    def _request(self) -> None:
        buf = self._in
        if len(buf) < 4:
            return
        if buf[0] != VERSION:
            self._fail(f"bad request version {buf[0]}", Reply.GENERAL_FAILURE)
            return
        cmd, atyp = buf[1], buf[3]
        if atyp == 1:
            need = 4 + 4 + 2
        elif atyp == 4:
            need = 4 + 16 + 2
        elif atyp == 3:
            if len(buf) < 5:
                return
            need = 5 + buf[4] + 2
        else:
            self._fail(f"unsupported address type {atyp}", Reply.ADDRESS_TYPE_NOT_SUPPORTED)
            return
        if len(buf) < need:
            return
        if cmd != 1:
            self._fail(f"unsupported command {cmd}", Reply.COMMAND_NOT_SUPPORTED)
            return
        port = int.from_bytes(buf[need - 2 : need], "big")
        if atyp == 1:
            host, kind = str(ipaddress.IPv4Address(bytes(buf[4:8]))), "ipv4"
        elif atyp == 4:
            host, kind = str(ipaddress.IPv6Address(bytes(buf[4:20]))), "ipv6"
        else:
            raw = bytes(buf[5 : need - 2])
            try:
                host = raw.decode("ascii")
            except UnicodeDecodeError:
                self._fail("domain name is not ASCII", Reply.GENERAL_FAILURE)
                return
            if not host or _BAD_NAME.search(host):
                self._fail("invalid domain name", Reply.GENERAL_FAILURE)
                return
            kind = "domain"
        if port == 0:
            self._fail("port 0", Reply.GENERAL_FAILURE)
            return
        self.trailing_data = bytes(buf[need:])
        buf.clear()
        self._state = _State.WAIT_REPLY
        self._events.append(ConnectRequest(host, port, kind))


_BAD_NAME = re.compile(r"[\x00/\\ \t\r\n]")


def _consteq(a: bytes, b: bytes) -> bool:
    import hmac

    return hmac.compare_digest(a, b)
