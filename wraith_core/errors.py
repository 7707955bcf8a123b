"""Errors a user can cause: each carries a stable ``code`` and a one-line message."""

from __future__ import annotations


class WraithError(Exception):
    """An expected failure with a stable machine-readable code.

    The CLI prints ``wraith: <message>`` and exits non-zero; the daemon sends
    ``code`` to Node/Python clients unchanged.
    """

    code = "EWRAITH"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class UsageError(WraithError):
    code = "EUSAGE"


class KeyError_(WraithError):
    """Key material that cannot be used (missing, wrong format, unreadable)."""

    code = "EKEY"


class AuthError(WraithError):
    code = "EAUTH"


class HostKeyError(WraithError):
    code = "EHOSTKEY"


class ConnectError(WraithError):
    """The transport could not be established (refused, unreachable, proxy failure)."""

    code = "ECONNECT"


class ChannelError(WraithError):
    """A channel to a target could not be opened; ``code`` says why."""

    code = "ECHANNEL"
