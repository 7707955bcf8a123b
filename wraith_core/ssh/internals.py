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
