"""wraith_client: SSH tunnel streams through a local ``wraith daemon`` (docs/ipc.md).

Pure Python (websockets + msgpack); the daemon runs the SSH side::

    stream = await wraith_client.connect(server="host:2222", identity="~/.ssh/k",
                                         host_key="~/.ssh/host.pub", target="127.0.0.1:5432")
    server = await wraith_client.serve(host_key=..., authorized_keys=..., listen="127.0.0.1:0")
    target = wraith_client.create_event_target(stream)     # SPEC §7 pubsub
    async for ev in wraith_client.events(): ...            # the daemon's state events
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from . import _ipc
from .daemon import Endpoint, child_daemon, discover, resolve, shutdown
from .errors import DaemonError, StreamError, UsageError, WraithError
from .server import ConnectionInfo, Server
from .stream import Stream, open_stream

__all__ = [
    "connect", "serve", "create_event_target", "events", "zmq_events", "shutdown",
    "Stream", "Server", "ConnectionInfo", "WraithError", "DaemonError", "StreamError", "UsageError",
    "discover", "resolve", "child_daemon", "Endpoint", "EventTarget", "Event",
]
__version__ = "0.1.0"

_CLIENT_ONLY = ("daemon", "token")
_KEY_OPTIONS = {"identity", "certificate", "hostKey", "knownHosts", "tlsCa", "key", "authorizedKeys",
                "certAuthority", "tlsCert", "tlsKey"}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _key_value(value: Any) -> Any:
    """Paths are made absolute (the daemon has its own working directory); key text/bytes pass."""
    if isinstance(value, os.PathLike):
        return str(Path(value).expanduser().absolute())
    if isinstance(value, str) and "\n" not in value and not value.startswith(("-----", "ssh-", "SHA256:",
                                                                              "ecdsa-", "sk-")):
        p = Path(value).expanduser()
        if not p.is_absolute() and p.exists():
            return str(p.absolute())
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return value


def wire_options(options: dict[str, Any]) -> dict[str, Any]:
    """snake_case or camelCase keyword options -> the daemon's camelCase option map."""
    out: dict[str, Any] = {}
    for name, value in options.items():
        if name in _CLIENT_ONLY or value is None:
            continue
        key = _camel(name)
        out[key] = _key_value(value) if key in _KEY_OPTIONS else value
    return out


async def connect(**options: Any) -> Stream:
    """Open one stream through the daemon; ``target`` defaults to ``wraith-control:0``.

    Raises :class:`WraithError` with a stable ``code`` (EAUTH, EHOSTKEY, ECONNREFUSED, …).
    """
    ep = await resolve(options.get("daemon"), options.get("token"))
    ws = await ep.open()
    return await open_stream(ws, {"type": "open", "kind": "connect", "options": wire_options(options)})


async def serve(**options: Any) -> Server:
    """Start a wraith server in the daemon; incoming control streams arrive as :class:`Stream`."""
    ep = await resolve(options.get("daemon"), options.get("token"))
    ws = await ep.open()
    s = await open_stream(ws, {"type": "open", "kind": "serve", "options": wire_options(options)})
    return Server(ep, ws, s.opened)


async def events(topics: list[str] | None = None, daemon: str | None = None,
                 token: str | None = None) -> AsyncIterator[dict[str, Any]]:
    """The daemon's state events (``{"event", "time", "data"}``) over its WebSocket feed."""
    ep = await resolve(daemon, token)
    ws = await ep.open()
    msg: dict[str, Any] = {"type": "open", "kind": "events"}
    if topics is not None:
        msg["topics"] = list(topics)
    s = await open_stream(ws, msg)
    from websockets.exceptions import ConnectionClosed

    try:
        while True:
            try:
                raw = await ws.recv()
            except ConnectionClosed:
                return
            try:
                m = _ipc.decode(raw)
            except _ipc.ProtocolViolation as exc:
                raise WraithError(str(exc), "EPROTO") from None
            if m["type"] == "event":
                yield {"event": m.get("event"), "time": m.get("time"), "data": m.get("data") or {}}
    finally:
        await s._ws.close()


async def zmq_events(topics: list[str] | None = None, daemon: str | None = None,
                     token: str | None = None) -> AsyncIterator[dict[str, Any]]:
    """The same events from the daemon's ZeroMQ PUB socket (needs pyzmq)."""
    try:
        import msgpack
        import zmq
        import zmq.asyncio
    except ImportError:
        raise WraithError("zmq_events needs pyzmq: pip install 'wraith-client[zmq]'", "EUSAGE") from None
    ep = await resolve(daemon, token)
    if not ep.events:
        raise WraithError("the daemon's ZeroMQ endpoint is not known (found via "
                          f"{ep.source}); use events() or daemon.json discovery", "EUSAGE")
    tcp = ep.events.startswith("tcp://")
    secret = ep.token if tcp else None
    if tcp and not secret:
        raise WraithError("the daemon's ZeroMQ tcp:// endpoint needs its token: pass token=, "
                          "set WRAITH_DAEMON_TOKEN, or let daemon.json name its token file", "EUSAGE")
    ctx = zmq.asyncio.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    if secret:  # ZeroMQ PLAIN: the daemon's ZAP handler checks the token
        sub.plain_username = b"wraith"
        sub.plain_password = secret.encode()
    for t in topics or [""]:
        sub.setsockopt(zmq.SUBSCRIBE, t.encode())
    sub.connect(ep.events)
    try:
        while True:
            topic, payload = await sub.recv_multipart()
            yield msgpack.unpackb(payload, raw=False)
    finally:
        sub.close(0)


def __getattr__(name: str) -> Any:
    if name in ("create_event_target", "EventTarget", "Event"):
        from . import eventtarget as _events

        return getattr(_events, name)
    raise AttributeError(name)
