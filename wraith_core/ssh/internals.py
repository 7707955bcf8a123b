"""Checks that asyncssh's internals are what our per-connection code expects.

The channel and connection attributes we read are set in asyncssh's
constructors, so one check per class (and name list) holds for every
object of that class: per-channel code pays a dictionary lookup instead
of dozens of ``hasattr`` calls.
"""

from __future__ import annotations

from typing import Any

_checked: dict[tuple[type, tuple[str, ...]], bool] = {}


def has_names(obj: Any, names: tuple[str, ...]) -> bool:
    """True if ``obj`` has all ``names`` (checked once per type of ``obj``)."""
    key = (type(obj), names)
    ok = _checked.get(key)
    if ok is None:
        ok = _checked[key] = all(hasattr(obj, n) for n in names)
    return ok


def next_channel_number(conn: Any) -> int:
    """The number asyncssh's ``add_channel`` gives the next channel on ``conn``: the first
    free one from ``_next_recv_chan``. Known in advance, a channel's open or confirmation
    can go out before asyncssh's channel object is built (callers check the number the
    channel then gets)."""
    number, channels = conn._next_recv_chan, conn._channels
    while number in channels:
        number = (number + 1) & 0xFFFF_FFFF
    return int(number)


def release(chan: Any) -> None:
    """Drop a channel that was built but never opened (asyncssh's ``close()`` would leave
    an unopened channel registered on its connection; ``_cleanup`` removes it)."""
    cleanup = getattr(chan, "_cleanup", None) or getattr(chan, "close", None)
    if cleanup is not None:
        cleanup()
