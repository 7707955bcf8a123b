"""``open_stream``: one SSH session, one channel, one duplex stream."""

from __future__ import annotations

from typing import Any

from .addr import parse_hostport
from .duplex import DuplexStream
from .options import ConnectOptions
from .ssh.channels import ChannelManager
from .ssh.client import Session

CONTROL_TARGET = "wraith-control:0"


class SessionStream(DuplexStream):
    """A DuplexStream that owns its SSH session: closing it ends the session."""

    session: Session | None = None

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        session = self.session
        if session is not None and session.conn is not None:
            session.conn.close()


def parse_target(target: str) -> tuple[str, int]:
    return parse_hostport(target, "target", allow_zero=True)


async def open_stream(options: ConnectOptions, target: str = CONTROL_TARGET, **overrides: Any) -> DuplexStream:
    """Connect (no reconnect), open one channel to ``target``, return the stream.

    ``target`` is ``host:port`` (a direct-tcpip channel), ``unix:/path`` (a
    streamlocal channel to a Unix socket on the server, where the server
    supports it, e.g. OpenSSH), or ``wraith-control:0`` (the default: the
    server's event bus).
    """
    if overrides:
        options = options.replace(**overrides)
    unix_path = target[5:] if target.startswith("unix:") else None
    host, port = ("", 0) if unix_path else parse_target(target)
    session = Session(options, reconnect=False)
    await session.start()
    manager = ChannelManager(session)
    stream = SessionStream(info={"target": unix_path or (host, port)})
    stream.session = session
    try:
        if unix_path:
            await manager.open_unix_relay(stream, unix_path)
        else:
            await manager.open_relay(stream, host, port)
    except BaseException:
        await session.close()
        raise
    return stream
