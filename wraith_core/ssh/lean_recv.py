"""Receiving channel packets without asyncssh's generic packet loop.

Under AES-GCM, once the session is authenticated, almost every packet is a
channel message: an open, its confirmation or failure, data, window
adjustments, EOF, close. asyncssh reads each through a general state machine
(header, then body; the input buffer copied twice per packet; the ciphertext
and tag joined again; every check for key exchange and authentication states;
packet logging; an ``isawaitable`` test on the handler's result). Here those
packets are decrypted in place from the input buffer and handed to the same
asyncssh handlers (the connection's for opens, the channel's for the rest),
with the same sequence numbers and the same errors: a bad tag is asyncssh's
``MACError``, an oversized packet, bad padding or an unknown channel its
``ProtocolError`` — all ending the connection as asyncssh's own loop does.

Any other packet (global requests, key exchange, ...), another cipher, a
decompressor, or packet-level debugging: the packet goes through asyncssh's own
path (after a decrypt here, the nonce counter is stepped back first), one packet
at a time, and the lean loop goes on after it when it still applies.
Installed per connection, as an instance attribute, like ``speedups``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .backlog import hold_reading, release_reading
from .internals import has_names

try:
    from asyncssh.connection import SSHConnection
    from asyncssh.channel import SSHChannel
    from asyncssh.constants import (MSG_CHANNEL_CLOSE, MSG_CHANNEL_DATA, MSG_CHANNEL_OPEN,
                                    MSG_CHANNEL_OPEN_CONFIRMATION, MSG_CHANNEL_OPEN_FAILURE,
                                    MSG_CHANNEL_WINDOW_ADJUST)
    from asyncssh.logging import SSHLogger
    from asyncssh.misc import DisconnectError, MACError, ProtocolError
    from asyncssh.packet import PacketDecodeError, SSHPacket

    _PKTHDR: Any = SSHConnection._recv_pkthdr
    _PROCESS_DATA: Any = SSHChannel._packet_handlers.get(MSG_CHANNEL_DATA)
    _ACCEPT_DATA: Any = SSHChannel._accept_data
    if not all(hasattr(SSHPacket(b""), n) for n in ("_idx", "_len")):  # pragma: no cover
        _PKTHDR = None
except ImportError:  # pragma: no cover - a future asyncssh without these names
    _PKTHDR = None

# what the lean loop reads and updates on asyncssh's connection
_NAMES = ("_recv_data", "_recv_handler", "_recv_encryption", "_recv_blocksize", "_recv_macsize", "_decompressor",
          "_auth_complete", "_inpbuf", "_recv_seq", "_max_recv_pktlen", "_channels", "_transport", "_auth_final",
          "_reset_keepalive_timer", "_send_disconnect", "_force_close", "internal_error", "process_packet",
          "eof_received", "connection_lost")

_TAG = 16
# packets one connection may have handled per loop pass (a few milliseconds of small ones)
TURN_PACKETS = 256
# Over TLS, bytes that may wait for the next turn before the transport's reading is paused.
# A paused TLS transport keeps reading the socket, and at the peer's FIN it ends without
# handing over what it holds: those packets, received, would be lost. Below this the TLS
# transport is not paused; what it delivers meanwhile waits in the input buffer, and an
# EOF first has that buffer worked off.
TLS_TURN_HOLD = 1 << 20


def install(conn: Any, gcm_type: type) -> None:
    """Take over ``conn._recv_data`` for channel packets under ``gcm_type`` (speedups' AES-GCM)."""
    if _PKTHDR is None or not has_names(conn, _NAMES):
        return
    original = conn._recv_data

    def lean_cipher() -> Any:
        """The lean cipher when the lean loop applies to what comes next, else None."""
        cipher = getattr(conn._recv_encryption, "_cipher", None)
        if (type(cipher) is not gcm_type or getattr(conn._recv_handler, "__func__", None) is not _PKTHDR
                or not conn._auth_complete or conn._decompressor is not None or conn._recv_macsize != _TAG
                or SSHLogger._debug_level >= 3):
            return None
        return cipher

    turn = [False]  # the rest of a read waits for the next loop pass
    paused = [False]  # reading held for a turn
    final = [False]  # the peer's EOF: all that has come is worked off at once
    tls: list[bool | None] = [None]

    def pause() -> None:
        if tls[0] is None:
            extra = getattr(conn._transport, "get_extra_info", None)
            tls[0] = extra is not None and extra("sslcontext") is not None
        if not paused[0] and (not tls[0] or len(conn._inpbuf) > TLS_TURN_HOLD):
            paused[0] = True
            hold_reading(conn, "turn")

    def next_turn() -> None:
        turn[0] = False
        if conn._transport:
            conn._recv_data()  # (the whole wrapped chain: batching, key swaps)
        if not turn[0] and paused[0]:
            paused[0] = False
            release_reading(conn, "turn")

    original_eof, original_lost = conn.eof_received, conn.connection_lost

    def work_off() -> None:
        """Received before the end (an EOF, or a TLS transport's end at the FIN): handled
        now, not dropped with the connection."""
        if turn[0] and conn._transport:
            turn[0] = False
            final[0] = True
            try:
                conn._recv_data()
            finally:
                final[0] = False

    def eof_received() -> None:
        work_off()
        original_eof()

    def connection_lost(exc: Exception | None = None) -> None:
        work_off()
        original_lost(exc)

    def recv_data() -> None:
        if turn[0]:  # a turn is pending (a TLS transport still delivers): this waits for it too
            pause()
            return
        cipher = lean_cipher()
        if cipher is None:
            original()
            return
        conn._reset_keepalive_timer()
        buf = conn._inpbuf
        pos = 0
        budget = TURN_PACKETS if not final[0] else len(buf)
        while True:
            if budget <= 0:
                # One connection's read of small packets can be thousands of them: the rest
                # waits a loop pass, so every other connection gets its turn in between.
                conn._inpbuf = buf[pos:]
                if len(buf) - pos >= 4 + _TAG and not turn[0]:
                    turn[0] = True
                    pause()
                    asyncio.get_running_loop().call_soon(next_turn)
                return
            try:
                pos, foreign, budget = _lean_loop(conn, cipher, buf, pos, budget)
            except DisconnectError as exc:
                conn._send_disconnect(exc.code, exc.reason, exc.lang)
                conn._force_close(exc)
                return
            except Exception:
                conn.internal_error()
                return
            if not conn._transport:
                return
            if not foreign:
                if budget <= 0:
                    continue  # (above: the rest waits for the next turn)
                if pos:
                    conn._inpbuf = buf[pos:]
                return
            # The packet at ``pos`` is asyncssh's (a request, key exchange, ...): it gets that
            # packet alone. Given the whole rest, its loop would copy the rest once per packet,
            # and a burst of small requests would cost the server's loop quadratic time.
            end = pos + 4 + int.from_bytes(buf[pos:pos + 4], "big") + _TAG
            conn._inpbuf = buf[pos:end]
            original()
            if not conn._transport:
                return
            pos = end
            budget -= 1
            cipher = lean_cipher()  # the packet may have been a key exchange, or be handled async
            if conn._inpbuf or cipher is None:  # the rest is asyncssh's (it keeps any of its own first)
                conn._inpbuf += buf[pos:]
                original()
                return
            if pos >= len(buf):
                conn._inpbuf = b""
                return

    conn._recv_data = recv_data
    conn.eof_received = eof_received
    conn.connection_lost = connection_lost


def _lean_loop(conn: Any, cipher: Any, buf: bytes, pos: int, budget: int) -> tuple[int, bool, int]:
    """Process whole channel packets from ``buf`` at ``pos``, at most ``budget`` of them: the
    position reached, whether it stopped at a packet asyncssh must handle (which starts
    there), and what is left of the budget."""
    view = memoryview(buf)
    size = len(buf)
    while size - pos >= 4 + _TAG and budget > 0:
        budget -= 1
        pktlen = int.from_bytes(view[pos:pos + 4], "big")
        if pktlen > conn._max_recv_pktlen:
            raise ProtocolError("Max packet size exceeded")
        end = pos + 4 + pktlen + _TAG
        if end > size:
            break
        plain = cipher.open(view[pos:pos + 4], view[pos + 4:end])
        if plain is None:
            raise MACError("MAC verification failed")
        padlen = plain[0]
        if not padlen or padlen + 2 > len(plain):  # no room for a message type (asyncssh fails
            raise ProtocolError("Invalid packet padding")  # later; zero padding too: [1:-0] is empty)
        pkttype = plain[1]
        if not MSG_CHANNEL_OPEN <= pkttype <= MSG_CHANNEL_CLOSE:
            cipher.rewind()  # not decrypted, as far as asyncssh's path is concerned
            return pos, True, budget + 1
        pos = end
        seq = conn._recv_seq
        body_end = len(plain) - padlen  # the payload is plain[1:body_end]
        if pkttype >= MSG_CHANNEL_WINDOW_ADJUST:
            if body_end < 6:
                raise ProtocolError("Incomplete channel request received")
            recv_chan = int.from_bytes(plain[2:6], "big")
            handler = conn._channels.get(recv_chan)
            if handler is None:
                raise ProtocolError(f"Invalid channel number {recv_chan} received")
            start = 5  # past the message type and the channel number
        else:  # an open, its confirmation or its failure: the connection's handlers
            assert pkttype <= MSG_CHANNEL_OPEN_FAILURE
            handler = conn
            start = 1
        if pkttype == MSG_CHANNEL_DATA:
            handled = _data(handler, plain, body_end)
        elif pkttype == MSG_CHANNEL_OPEN:  # the server's own open path, if it installed one
            fast_open = getattr(conn, "wraith_open", None)
            handled = fast_open is not None and fast_open(plain, body_end)
        elif pkttype == MSG_CHANNEL_OPEN_CONFIRMATION and body_end == 18:  # no extra fields
            confirm = getattr(conn._channels.get(int.from_bytes(plain[2:6], "big")), "lean_confirm", None)
            handled = confirm is not None and confirm(plain)
        else:
            handled = False
        if not handled:
            packet = SSHPacket(plain[1:body_end])
            packet._idx = start
            try:
                handler.process_packet(pkttype, seq, packet)  # all of these are handled, synchronously
            except PacketDecodeError as exc:
                raise ProtocolError(str(exc)) from None
        conn._auth_final = True
        if not conn._transport:
            return pos, False, budget  # the connection closed meanwhile (asyncssh dropped its input)
        conn._recv_seq = (seq + 1) & 0xFFFF_FFFF
    return pos, False, budget


_DATA_PATHS: dict[type, Any] = {}


def _lean_type(cls: type) -> bool:
    """A channel class whose data handling is asyncssh's own (a subclass that overrides
    it, like asyncssh's TUN channel stripping a header in ``_accept_data``, is not)."""
    return (getattr(cls, "_packet_handlers", {}).get(MSG_CHANNEL_DATA) is _PROCESS_DATA
            and getattr(cls, "_accept_data", None) is _ACCEPT_DATA)


def _data(chan: Any, plain: bytes, end: int) -> bool:
    """CHANNEL_DATA ``plain`` (its payload ends at ``end``) delivered without a packet
    object: by the channel's own ``lean_data`` (socket_channel), by :func:`_asyncssh_data`
    for asyncssh's channels, else (False) by the channel's ``process_packet``."""
    path = _DATA_PATHS.get(type(chan))
    if path is None:
        path = _DATA_PATHS[type(chan)] = (getattr(type(chan), "lean_data", None)
                                          or (_asyncssh_data if _lean_type(type(chan)) else _not_lean))
    return bool(path(chan, plain, end))


def _not_lean(chan: Any, plain: bytes, end: int) -> bool:
    return False


def _asyncssh_data(chan: Any, plain: bytes, end: int) -> bool:
    """asyncssh's ``_process_data`` and ``_accept_data`` for the common case — an open
    bytes channel that is reading — without the packet object: the same checks, the
    same window accounting, delivered through asyncssh's ``_deliver_data`` (which also
    sends the window adjustments). False: let asyncssh's handler take the packet."""
    if chan._recv_state != "open" or chan._recv_paused or chan._encoding is not None or end < 10:
        return False
    datalen = int.from_bytes(plain[6:10], "big")  # after padding length, type, channel number
    if 10 + datalen != end:
        return False  # malformed: asyncssh's decoding raises the right error
    if datalen > chan._recv_window:
        raise ProtocolError("Window exceeded")
    if datalen and chan._send_state not in ("close_pending", "closed"):
        chan._recv_window -= datalen
        chan._deliver_data(plain[10:end], None)
    return True
