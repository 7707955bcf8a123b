"""Map anything that can go wrong while opening a stream to a stable IPC error code."""

from __future__ import annotations

import asyncio
import errno

from ..errors import WraithError

_TEXT_CODES = (
    ("connection refused", "ECONNREFUSED"),
    ("no route to host", "EHOSTUNREACH"),
    ("host is unreachable", "EHOSTUNREACH"),
    ("network is unreachable", "ENETUNREACH"),
    ("timed out", "ETIMEDOUT"),
    # asyncio replaces strerror with "Connect call failed (addr)" and the transport keeps only
    # the text: on loopback and LANs that is nearly always a refusal
    ("connect call failed", "ECONNREFUSED"),
    ("cannot resolve", "ENOTFOUND"),
    ("name or service not known", "ENOTFOUND"),
    ("address already in use", "EADDRINUSE"),
    ("permission denied", "EACCES"),
    ("cannot assign requested address", "EADDRNOTAVAIL"),
)
_ERRNO_CODES = {
    errno.ECONNREFUSED: "ECONNREFUSED",
    errno.EHOSTUNREACH: "EHOSTUNREACH",
    errno.ENETUNREACH: "ENETUNREACH",
    errno.ETIMEDOUT: "ETIMEDOUT",
    errno.EADDRINUSE: "EADDRINUSE",
    errno.EACCES: "EACCES",
}
# Generic codes that a more precise reading of the message may refine.
_GENERIC = {"ECONNECT", "EWRAITH", "ECHANNEL"}


def _from_text(text: str) -> str | None:
    low = text.lower()
    for needle, code in _TEXT_CODES:
        if needle in low:
            return code
    return None


def map_error(exc: BaseException, generic: str = "ECONNECT") -> WraithError:
    """A :class:`WraithError` whose ``code`` is one of docs/ipc.md §5."""
    if isinstance(exc, WraithError):
        code = exc.code
        if code in _GENERIC:
            ctx = exc.__context__
            if isinstance(ctx, OSError) and ctx.errno in _ERRNO_CODES:
                code = _ERRNO_CODES[ctx.errno]
            else:
                code = _from_text(str(exc)) or ("ECONNECT" if code == "EWRAITH" else code)
        if code == "EADDRNOTAVAIL":
            code = "ESERVE"
        if code != exc.code:
            return WraithError(str(exc), code)
        return exc
    if isinstance(exc, asyncio.TimeoutError):
        return WraithError("timed out", "ETIMEDOUT")
    if isinstance(exc, OSError):
        code = _ERRNO_CODES.get(exc.errno or 0) or _from_text(str(exc)) or generic
        return WraithError(exc.strerror or str(exc), code)
    return WraithError(f"{type(exc).__name__}: {exc}", "EDAEMON")
