"""Errors with a stable ``code`` (the daemon's codes, docs/ipc.md §5)."""

from __future__ import annotations


class WraithError(Exception):
    code = "EWRAITH"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    def __repr__(self) -> str:
        return f"WraithError({self.code}: {self})"


class DaemonError(WraithError):
    """No daemon could be reached or started."""

    code = "EDAEMON"


class StreamError(WraithError, ConnectionError):
    """A stream that ended badly (reset, protocol error) or was used after its end."""

    code = "ECONNRESET"


class UsageError(WraithError, RuntimeError):
    """The API used in a way it does not support (as asyncio raises RuntimeError for it)."""

    code = "EUSAGE"
