"""Logging: one line per event, fail2ban-friendly, never a destination.

asyncssh's own log lines name forwarding destinations, so everything it logs
below ERROR is dropped — at every level, including ``--debug``.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("wraith")


class _DropChatty(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("asyncssh") and record.levelno < logging.ERROR:
            return False
        if record.name.startswith("asyncio") and record.levelno < logging.WARNING:
            return False
        return True


def peer_text(text: str, limit: int = 200) -> str:
    """Text the peer chose (a DISCONNECT or open-failure reason), safe for a log line: no
    line breaks or terminal escapes (each would forge or hide log lines), not too long."""
    cleaned = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else "?" for c in text)
    return cleaned[:limit] + ("…" if len(cleaned) > limit else "")


def quiet_asyncssh() -> None:
    """asyncssh's records below ERROR are never created, whatever logging the program
    that uses wraith as a library has set up: they name forwarding destinations.
    (Run by every server and client session, not only by the CLI.)"""
    lg = logging.getLogger("asyncssh")
    if lg.level == logging.NOTSET or lg.level < logging.ERROR:
        lg.setLevel(logging.ERROR)
    try:
        import asyncssh

        asyncssh.set_debug_level(1)
    except ImportError:
        pass


def setup_logging(level: str = "info", stream: object = None) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_wraith", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler._wraith = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    handler.addFilter(_DropChatty())
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    quiet_asyncssh()
