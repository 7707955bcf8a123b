"""The transport seam.

A *connector* (client side) opens one duplex byte stream and runs an asyncio
protocol on it; an *acceptor* (server side) accepts streams and runs a fresh
protocol on each. SSH is that protocol: asyncssh's connection objects are
asyncio protocols, plugged in through its ``tunnel=`` hook (see
``ssh/tunnel.py``), so SSH never opens a socket itself and never knows which
transport carries it.

Streams are asyncio (transport, protocol) pairs: the cheapest duplex stream
asyncio has, with flow control (``pause_reading``/``pause_writing``) built in.
A transport that is not a socket (iroh) supplies its own ``asyncio.Transport``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..errors import UsageError

if TYPE_CHECKING:
    from ..options import ConnectOptions, ServeOptions

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


@dataclass(frozen=True)
class TransportInfo:
    kind: str                 # "tcp" | "tls" | "iroh"
    remote_addr: str
    remote_port: int | None = None


class Connector(Protocol):
    kind: str

    async def connect(self, protocol_factory: ProtocolFactory) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
        """Open one stream and run ``protocol_factory()`` on it."""
        ...

    def describe(self) -> str:
        """Where this connector dials, for the user (never logged per connection)."""
        ...


class Acceptor(Protocol):
    kind: str

    async def start(self, protocol_factory: ProtocolFactory) -> None:
        """Start accepting; each stream runs a new ``protocol_factory()``."""
        ...

    def addresses(self) -> list[str]:
        """What to tell the user (listening address, endpoint id, ticket)."""
        ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


def transport_info(transport: asyncio.BaseTransport, kind: str) -> TransportInfo:
    """Remote address of an accepted stream, whatever the transport."""
    info = transport.get_extra_info("wraith_transport_info")
    if isinstance(info, TransportInfo):
        return info
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return TransportInfo(kind, str(peer[0]), int(peer[1]) if len(peer) > 1 else None)
    return TransportInfo(kind, str(peer) if peer else "unknown")


async def drain_transports(timeout: float = 5.0) -> None:
    """Wait for transports that close in the background (iroh) to finish; call before the loop ends."""
    import sys

    iroh = sys.modules.get(__package__ + ".iroh")
    if iroh is not None:
        await iroh.wait_idle(timeout)


def make_connector(options: ConnectOptions) -> Connector:
    kind = options.transport
    if kind == "tcp":
        from .tcp import TCPConnector

        return TCPConnector(options)
    if kind == "tls":
        from .tls import TLSConnector

        return TLSConnector(options)
    if kind == "iroh":
        from .iroh import IrohConnector

        return IrohConnector(options)
    raise UsageError(f"unknown transport {kind!r}")


def make_acceptor(options: ServeOptions) -> Acceptor:
    kind = options.transport
    if kind == "tcp":
        from .tcp import TCPAcceptor

        return TCPAcceptor(options)
    if kind == "tls":
        from .tls import TLSAcceptor

        return TLSAcceptor(options)
    if kind == "iroh":
        from .iroh import IrohAcceptor

        return IrohAcceptor(options)
    raise UsageError(f"unknown transport {kind!r}")


async def wait_readable(sock: socket.socket, timeout: float | None = None) -> bool:
    """Until ``sock`` (non-blocking, not yet handed to a transport) has something to read:
    data, EOF or an error. False if ``timeout`` seconds pass first."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        async with asyncio.timeout(None if timeout is None else max(0.0, timeout)):
            await fut
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(sock.fileno())


def accepted_at(factory: ProtocolFactory, accepted: float) -> ProtocolFactory:
    """``factory``, whose protocols learn when their stream was accepted: those with an
    ``accepted_at`` attribute (the server's gate) get it set to ``accepted``
    (``time.monotonic()``)."""

    def make() -> asyncio.BaseProtocol:
        protocol = factory()
        if hasattr(protocol, "accepted_at"):
            protocol.accepted_at = accepted
        return protocol

    return make
