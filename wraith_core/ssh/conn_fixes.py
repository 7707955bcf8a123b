"""Two per-connection corrections to asyncssh, installed on connections we own.

Both are instance attributes set on our own connection and channel objects,
not patches of the library: other connections keep asyncssh's behaviour, and
if asyncssh's internals change (the names used below), ``install`` leaves the
connection untouched rather than guessing.

1. Empty SSH_MSG_IGNORE before every packet (speed). asyncssh puts one in
   front of every packet once encryption is on: the old countermeasure
   against plaintext recovery in CBC mode (CVE-2008-5161). With AEAD ciphers
   (AES-GCM, chacha20-poly1305) there is nothing to counter, and the extra
   packet doubles the encryptions and socket writes of every small exchange
   (measured: ~30 % of the CPU time of a SOCKS connection). For AEAD ciphers
   only, those empty ignores are dropped.

2. EOF lost when CLOSE follows it while reading is paused (correctness).
   A channel whose reader is paused (backpressure) queues incoming data and
   the EOF; if the peer's CHANNEL_CLOSE arrives before the queue drains,
   asyncssh overwrites the pending EOF state, delivers the data but never
   calls ``eof_received()`` — the stream then looks cut off instead of
   finished (OpenSSH sends EOF and CLOSE back to back). We remember that the
   EOF arrived and deliver it after the queued data, before the close.
"""

from __future__ import annotations

from typing import Any

try:
    from asyncssh.constants import MSG_IGNORE
    from asyncssh.encryption import ChachaEncryption, GCMEncryption

    _AEAD: tuple[type, ...] = (GCMEncryption, ChachaEncryption)
except ImportError:  # pragma: no cover - a future asyncssh without these names
    _AEAD = ()
    MSG_IGNORE = 2

_EMPTY_STRING = b"\x00\x00\x00\x00"
_CHANNEL_ATTRS = ("_flush_recv_buf", "_recv_state", "_recv_buf", "_session")


def install(conn: Any) -> None:
    if _AEAD and hasattr(conn, "_send_encryption"):
        _skip_aead_ignores(conn)
    for name in ("create_tcp_channel", "create_unix_channel"):
        original = getattr(conn, name, None)
        if original is not None:
            setattr(conn, name, _fixing_channels(original))


def _skip_aead_ignores(conn: Any) -> None:
    original = conn.send_packet

    def send_packet(pkttype: int, *args: bytes, handler: Any = None) -> None:
        if (pkttype == MSG_IGNORE and args == (_EMPTY_STRING,)
                and isinstance(conn._send_encryption, _AEAD)):
            return
        original(pkttype, *args, handler=handler)

    conn.send_packet = send_packet


def _fixing_channels(create: Any) -> Any:
    def create_channel(*args: Any, **kwargs: Any) -> Any:
        chan = create(*args, **kwargs)
        if all(hasattr(chan, a) for a in _CHANNEL_ATTRS):
            _keep_eof_before_close(chan)
        return chan

    return create_channel


def _keep_eof_before_close(chan: Any) -> None:
    original = chan._flush_recv_buf
    pending = [False]  # an EOF arrived and has not been delivered yet

    def flush_recv_buf(exc: Exception | None = None) -> None:
        if chan._recv_state == "eof_pending":
            pending[0] = True
        original(exc)
        if not pending[0]:
            return
        if chan._recv_state == "eof":  # asyncssh delivered it itself
            pending[0] = False
        elif chan._recv_state == "closed" and exc is None and not chan._recv_buf:
            pending[0] = False  # the close overtook the EOF: deliver it before the cleanup runs
            session = chan._session
            if session is not None:
                session.eof_received()

    chan._flush_recv_buf = flush_recv_buf
