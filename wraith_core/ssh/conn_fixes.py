"""Per-connection packet tuning for asyncssh connections.

asyncssh puts an empty SSH_MSG_IGNORE in front of every packet it sends once
encryption is on. That is the old countermeasure against plaintext recovery
in CBC mode (CVE-2008-5161); with AEAD ciphers (AES-GCM, chacha20-poly1305)
there is nothing to counter, and the extra packet doubles the encryptions
and socket writes of every small exchange (measured: ~30 % of the CPU time
per SOCKS connection). For AEAD ciphers only, we drop those empty ignores.

This is an instance attribute set on connections we own, not a patch of the
library: other connections and every non-AEAD cipher keep asyncssh's
behaviour, and if asyncssh's internals change (the attribute names below),
we leave the connection untouched.
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


def skip_aead_ignores(conn: Any) -> bool:
    """Install the AEAD ignore-skipping on ``conn``; returns whether it was installed."""
    if not _AEAD or not hasattr(conn, "_send_encryption"):
        return False
    original = conn.send_packet

    def send_packet(pkttype: int, *args: bytes, handler: Any = None) -> None:
        if (pkttype == MSG_IGNORE and args == (_EMPTY_STRING,)
                and isinstance(conn._send_encryption, _AEAD)):
            return
        original(pkttype, *args, handler=handler)

    conn.send_packet = send_packet
    return True
