"""Per-connection speed-ups for asyncssh, installed on connections we own.

Like ``conn_fixes``, these are instance attributes set on our own connection
and channel objects, not patches of the library: other connections keep
asyncssh's behaviour, and if asyncssh's internals change (the names used
below), ``install`` leaves that part alone rather than guessing. None of them
changes what goes over the wire, only how much CPU it takes — and on a
per-connection path (SOCKS connect, first byte, close) CPU time is latency.

1. Empty SSH_MSG_IGNORE before every packet. asyncssh puts one in front of
   every packet once encryption is on: the old countermeasure against
   plaintext recovery in CBC mode (CVE-2008-5161). With AEAD ciphers (AES-GCM,
   chacha20-poly1305) there is nothing to counter, and the extra packet
   doubles the encryptions and socket writes of every small exchange. For
   AEAD ciphers only, those empty ignores are dropped.

2. Debug formatting nobody reads. asyncssh formats a packet description for
   every packet sent and received, and converts log arguments to text,
   before it checks whether anything will be logged. wraith drops asyncssh's
   log records below ERROR anyway (they name destinations), so the packet
   descriptions are skipped unless asyncssh's packet-level debugging (level
   3) is on, and log calls check the logger's level first.

3. The keepalive timer. asyncssh cancels and re-creates its keepalive timer
   on every batch of received bytes. Here the timer stays armed; received
   bytes only note the time, and when the timer fires early it re-arms for
   the rest of the interval. Keepalives go out after the same silence as
   before.

4. AES-GCM per packet. asyncssh builds a new AESGCM object (a key schedule)
   for every packet and re-parses the nonce from bytes each time. Here the
   AEAD object lives as long as the key and the nonce counter is an integer
   (same RFC 5647 nonces, same bytes on the wire). The swap happens on the
   first packet after each key exchange.

5. One write for a burst of packets. Packets sent while asyncssh processes
   one batch of received bytes (a CLOSE answering a CLOSE, window adjusts),
   or while the relay passes an end of stream on (EOF, then CLOSE when both
   directions are done), go to the socket in one write at the end of that
   step instead of one system call each — and the peer wakes up once, not
   once per packet. Nothing waits for a later loop pass; order is kept.
"""

from __future__ import annotations

from typing import Any

try:
    from asyncssh.constants import MSG_IGNORE
    from asyncssh.crypto.cipher import GCMCipher
    from asyncssh.encryption import ChachaEncryption, GCMEncryption
    from asyncssh.logging import SSHLogger
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    _AEAD: tuple[type, ...] = (GCMEncryption, ChachaEncryption)
except ImportError:  # pragma: no cover - a future asyncssh without these names
    _AEAD = ()
    MSG_IGNORE = 2
    SSHLogger = None  # type: ignore[assignment,misc]
    GCMCipher = None  # type: ignore[assignment,misc]

_EMPTY_STRING = b"\x00\x00\x00\x00"


def install(conn: Any) -> None:
    if _AEAD and hasattr(conn, "_send_encryption"):
        _skip_aead_ignores(conn)
    if all(hasattr(conn, a) for a in ("_send", "_transport", "_recv_data")):
        _batch_sends(conn)
    _quiet(conn)
    if all(hasattr(conn, a) for a in ("_reset_keepalive_timer", "_keepalive_timer_callback",
                                      "_keepalive_timer", "_keepalive_interval", "_auth_complete")):
        _lazy_keepalive(conn)


def install_channel(chan: Any) -> None:
    """The per-channel part (packet descriptions are built per channel too)."""
    _quiet_packets(chan)
    conn = getattr(chan, "_conn", None)
    batch = getattr(conn, "wraith_batch", None)
    if batch is not None:
        chan.wraith_batch = batch


def _batch_sends(conn: Any) -> None:
    pending: list[bytes] = []
    target: list[Any] = [None]
    depth = [0]

    def send(data: bytes) -> None:
        transport = conn._transport
        if not transport:
            return
        if depth[0]:
            target[0] = target[0] or transport
            pending.append(data)
            return
        try:
            transport.write(data)
        except ConnectionError:  # pragma: no cover - as asyncssh's own _send
            pass

    def begin() -> None:
        depth[0] += 1

    def end() -> None:
        depth[0] -= 1
        if depth[0] or not pending:
            return
        transport, target[0] = target[0], None
        data = pending[:]
        pending.clear()
        try:
            if len(data) == 1:
                transport.write(data[0])
            else:
                transport.writelines(data)
        except ConnectionError:  # pragma: no cover - as asyncssh's own _send
            pass

    recv_data = conn._recv_data

    def batched_recv_data() -> None:
        begin()
        try:
            recv_data()
        finally:
            end()

    conn._send = send
    conn._recv_data = batched_recv_data
    conn.wraith_batch = (begin, end)


def _skip_aead_ignores(conn: Any) -> None:
    original = conn.send_packet
    swap = _gcm_swapper(conn)

    def send_packet(pkttype: int, *args: bytes, handler: Any = None) -> None:
        if swap is not None:
            swap()
        if (pkttype == MSG_IGNORE and args == (_EMPTY_STRING,)
                and isinstance(conn._send_encryption, _AEAD)):
            return
        original(pkttype, *args, handler=handler)

    conn.send_packet = send_packet


class _GCM:
    """AES-GCM for SSH packets (RFC 5647): asyncssh's ``GCMCipher`` interface, with the
    AEAD object kept for the key's lifetime and the invocation counter as an int."""

    __slots__ = ("_aead", "_fixed", "_counter")

    def __init__(self, key: bytes, iv: bytes) -> None:
        self._aead = AESGCM(key)
        self._fixed = iv[:4]
        self._counter = int.from_bytes(iv[4:], "big")

    def _nonce(self) -> bytes:
        counter = self._counter
        self._counter = (counter + 1) & 0xFFFF_FFFF_FFFF_FFFF
        return self._fixed + counter.to_bytes(8, "big")

    def encrypt_and_sign(self, header: bytes, data: bytes) -> tuple[bytes, bytes]:
        sealed = self._aead.encrypt(self._nonce(), data, header)
        return header + sealed[:-16], sealed[-16:]

    def verify_and_decrypt(self, header: bytes, data: bytes, mac: bytes) -> bytes | None:
        nonce = self._nonce()  # the counter moves on even for a bad packet, as in asyncssh
        try:
            return self._aead.decrypt(nonce, data + mac, header)
        except InvalidTag:
            return None


def _gcm_swapper(conn: Any) -> Any:
    """A check, run per packet sent, that gives each new GCM key (after every key
    exchange, in both directions) a ``_GCM`` in place of asyncssh's cipher."""
    if GCMCipher is None or not all(hasattr(conn, a) for a in ("_send_encryption", "_recv_encryption")):
        return None

    def swap() -> None:
        for enc in (conn._send_encryption, conn._recv_encryption):
            cipher = getattr(enc, "_cipher", None)
            if type(cipher) is GCMCipher and hasattr(cipher, "_key") and hasattr(cipher, "_iv"):
                enc._cipher = _GCM(cipher._key, cipher._iv)

    return swap


class _LevelFirstLogger(SSHLogger if SSHLogger is not None else object):  # type: ignore[misc]
    """asyncssh's logger, checking the level before formatting the arguments."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if self.isEnabledFor(level):
            super().log(level, msg, *args, **kwargs)


def _quiet(conn: Any) -> None:
    logger = getattr(conn, "_logger", None)
    if SSHLogger is not None and type(logger) is SSHLogger:
        logger.__class__ = _LevelFirstLogger  # channels' loggers are made with type(parent)
    _quiet_packets(conn)


def _quiet_packets(handler: Any) -> None:
    original = getattr(handler, "_log_packet", None)
    if original is None or SSHLogger is None or not hasattr(SSHLogger, "_debug_level"):
        return

    def log_packet(msg: str, pkttype: int, pktid: int | None, packet: Any, note: str) -> None:
        if SSHLogger._debug_level >= 3:
            original(msg, pkttype, pktid, packet, note)

    handler._log_packet = log_packet


def _lazy_keepalive(conn: Any) -> None:
    loop = conn._loop
    original = conn._keepalive_timer_callback
    last = [0.0]

    def reset() -> None:
        if conn._auth_complete:
            last[0] = loop.time()
            if conn._keepalive_timer is None:
                conn._set_keepalive_timer()

    def callback() -> None:
        idle = loop.time() - last[0]
        interval = conn._keepalive_interval
        if interval and idle < interval:
            conn._keepalive_timer = loop.call_later(interval - idle, callback)
            return
        original()

    conn._reset_keepalive_timer = reset
    conn._keepalive_timer_callback = callback
