"""Per-connection corrections to asyncssh, installed on connections we own.

They are instance attributes set on our own connection and channel objects,
not patches of the library: other connections keep asyncssh's behaviour, and
if asyncssh's internals change (the names used below), ``install`` leaves the
connection untouched rather than guessing. ``install`` also applies the
speed-ups of ``speedups``.

EOF lost when CLOSE follows it while reading is paused (correctness).
A channel whose reader is paused (backpressure) queues incoming data and
the EOF; if the peer's CHANNEL_CLOSE arrives before the queue drains,
asyncssh overwrites the pending EOF state, delivers the data but never
calls ``eof_received()`` — the stream then looks cut off instead of
finished (OpenSSH sends EOF and CLOSE back to back). We remember that the
EOF arrived and deliver it after the queued data, before the close.
"""

from __future__ import annotations

from typing import Any

from . import speedups
from .backlog import backlog_of
from .internals import has_names

_CHANNEL_ATTRS = ("_flush_recv_buf", "_recv_state", "_recv_buf", "_session")


def install(conn: Any) -> None:
    speedups.install(conn)
    backlog_of(conn)  # the send buffer watched from the start, channels or not
    for name in ("create_tcp_channel", "create_unix_channel"):
        original = getattr(conn, name, None)
        if original is not None:
            setattr(conn, name, _fixing_channels(original))


def _fixing_channels(create: Any) -> Any:
    def create_channel(*args: Any, **kwargs: Any) -> Any:
        chan = create(*args, **kwargs)
        speedups.install_channel(chan)
        if has_names(chan, _CHANNEL_ATTRS):
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
