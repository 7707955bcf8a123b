"""Channel manager: direct-tcpip, streamlocal and tcpip-forward on the session."""

from __future__ import annotations

import logging
from typing import Any

import asyncssh

from ..addr import ForwardSpec
from ..dial import DialError, dial, reply_for_reason
from ..duplex import DuplexStream
from ..errors import ChannelError
from ..protocol.socks5 import Reply
from ..relay import RelayEnd
from .client import Session

log = logging.getLogger("wraith.channels")

_REPLY_CODES = {
    Reply.CONNECTION_REFUSED: "ECONNREFUSED",
    Reply.HOST_UNREACHABLE: "EHOSTUNREACH",
    Reply.NETWORK_UNREACHABLE: "ENETUNREACH",
    Reply.NOT_ALLOWED: "EPROHIBITED",
    Reply.GENERAL_FAILURE: "ECHANNEL",
}


class ChannelOpenFailed(ChannelError):
    def __init__(self, message: str, reply: Reply, code: str | None = None) -> None:
        super().__init__(message, code or _REPLY_CODES.get(reply, "ECHANNEL"))
        self.reply = reply


def _failure(exc: asyncssh.ChannelOpenError) -> ChannelOpenFailed:
    prohibited = exc.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
    reply = reply_for_reason(exc.reason, prohibited)
    return ChannelOpenFailed(f"channel open failed: {exc.reason}", reply)


class ChannelManager:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.remote_forwards: list[ForwardSpec] = []
        session.up_hooks.append(self._request_remote_forwards)

    @property
    def _window(self) -> dict[str, int]:
        o = self.session.options
        return {"window": o.window, "max_pktsize": o.max_pktsize}

    async def _conn(self) -> asyncssh.SSHClientConnection:
        try:
            return await self.session.connection()
        except ChannelError as exc:
            raise ChannelOpenFailed(str(exc), Reply.GENERAL_FAILURE, "ESESSION") from None

    async def open_relay(self, end: RelayEnd, host: str, port: int) -> None:
        """Open a direct-tcpip channel to ``host:port`` running ``end``."""
        conn = await self._conn()
        try:
            await conn.create_connection(lambda: end, host, port, **self._window)
        except asyncssh.ChannelOpenError as exc:
            raise _failure(exc) from None
        except (asyncssh.Error, OSError) as exc:
            raise ChannelOpenFailed(f"channel open failed: {exc}", Reply.GENERAL_FAILURE, "ESESSION") from None

    async def open_stream(self, host: str, port: int) -> DuplexStream:
        stream = DuplexStream(info={"target": (host, port)})
        await self.open_relay(stream, host, port)  # type: ignore[arg-type]
        return stream

    async def open_unix_relay(self, end: RelayEnd, path: str) -> None:
        """Open a streamlocal channel (a Unix socket on the server) running ``end``."""
        conn = await self._conn()
        try:
            await conn.create_unix_connection(lambda: end, path, **self._window)
        except asyncssh.ChannelOpenError as exc:
            raise _failure(exc) from None
        except (asyncssh.Error, OSError) as exc:
            raise ChannelOpenFailed(f"channel open failed: {exc}", Reply.GENERAL_FAILURE, "ESESSION") from None

    # -- remote forwards (-R) ------------------------------------------------------

    def add_remote_forward(self, spec: ForwardSpec) -> None:
        self.remote_forwards.append(spec)

    async def _request_remote_forwards(self, conn: asyncssh.SSHClientConnection) -> None:
        for spec in self.remote_forwards:
            try:
                await conn.create_server(self._forward_factory(spec), spec.bind_host, spec.bind_port,
                                         **self._window)
                log.info("remote forward up listen=%s:%d", spec.bind_host, spec.bind_port)
            except Exception as exc:  # asyncssh raises ChannelListenError, OSError, …
                log.warning("remote forward refused by server listen=%s:%d (%s)",
                            spec.bind_host, spec.bind_port, getattr(exc, "reason", exc))

    def _forward_factory(self, spec: ForwardSpec) -> Any:
        timeout = self.session.options.connect_timeout

        def factory(orig_host: str, orig_port: int) -> Any:
            return _dial_local(spec.host, spec.port, timeout)

        return factory


async def _dial_local(host: str, port: int, timeout: float) -> RelayEnd:
    sock_end, chan_end = RelayEnd.pair()
    try:
        await dial(sock_end, host, port, timeout)
    except DialError as exc:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, exc.reason) from None
    except Exception:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Connection failed") from None
    return chan_end


