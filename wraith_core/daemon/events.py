"""Daemon state events: a ZeroMQ PUB socket (topic = event type) and WebSocket feeds.

Events are notifications, not data: a subscriber that does not keep up loses
events (ZeroMQ PUB's high-water mark; a bounded queue per WebSocket feed)
instead of making the daemon buffer without bound. Never put targets, DNS
names or byte counts in an event.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import msgpack

from .paths import FileIdentity, file_identity, link_socket, private_umask, remove_if_same

log = logging.getLogger("wraith.daemon")

FEED_QUEUE = 1000
ZMQ_HWM = 1000


class Feed:
    """One WebSocket ``events`` subscriber: a bounded queue, dropping beyond it."""

    def __init__(self, topics: tuple[str, ...] | None) -> None:
        self.topics = topics
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(FEED_QUEUE)
        self.dropped = 0

    def wants(self, event: str) -> bool:
        return self.topics is None or any(event.startswith(t) for t in self.topics)

    def offer(self, msg: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(msg)
        except asyncio.QueueFull:
            self.dropped += 1


# ZeroMQ PLAIN credentials for the tcp:// endpoint: user "wraith", password = the daemon's token
ZAP_DOMAIN = "wraith"
ZAP_USER = "wraith"


class EventBus:
    """``token``: required of every subscriber to a ``tcp://`` endpoint (ZeroMQ PLAIN,
    checked by a ZAP handler); an ``ipc://`` endpoint is guarded by its file mode."""

    def __init__(self, zmq_endpoint: str | None, token: str | None = None) -> None:
        self.zmq_endpoint = zmq_endpoint
        self.bound_endpoint: str | None = None
        self._token = token
        self._ctx: Any = None
        self._pub: Any = None
        self._auth: Any = None
        self.feeds: set[Feed] = set()
        self._ipc_id: FileIdentity | None = None  # the ipc:// socket file we bound
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def start(self) -> None:
        if self.zmq_endpoint is None:
            return
        try:
            import zmq
        except ImportError:
            from ..errors import WraithError

            raise WraithError("ZeroMQ events need pyzmq: pip install 'wraith[daemon]' "
                              "(or start with --events none)", "EDAEMON") from None
        self._ctx = zmq.Context.instance()
        pub = self._ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, ZMQ_HWM)
        pub.setsockopt(zmq.LINGER, 0)
        endpoint = self.zmq_endpoint
        if endpoint.startswith("tcp://"):
            self._require_token(pub)
        path = endpoint[6:] if endpoint.startswith("ipc://") else None
        if path is not None:  # bound under a private name first (see paths.link_socket)
            endpoint = "ipc://" + _unused_name(os.path.dirname(path), f".ev{os.getpid()}")
        try:
            with private_umask():
                pub.bind(endpoint)
            if path is not None:
                link_socket(endpoint[6:], path)
        except zmq.ZMQError as exc:
            pub.close(0)
            self._stop_auth()
            from ..errors import WraithError

            raise WraithError(f"cannot bind events endpoint {self.zmq_endpoint}: {exc}", "EDAEMON") from None
        except BaseException:
            pub.close(0)
            self._stop_auth()
            raise
        if path is not None:
            os.chmod(path, 0o600)
            self._ipc_id = file_identity(path)
            self.bound_endpoint = f"ipc://{path}"
        else:
            self.bound_endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._pub = pub

    def _require_token(self, pub: Any) -> None:
        """Any local user can reach a loopback TCP port: subscribers must present the
        token (the one in the daemon's 0600 token file) or the handshake is refused."""
        from zmq.auth.thread import ThreadAuthenticator

        if not self._token:
            raise ValueError("a tcp:// events endpoint needs a token")
        auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("wraith.daemon.zap"))
        auth.start()
        auth.configure_plain(domain=ZAP_DOMAIN, passwords={ZAP_USER: self._token})
        self._auth = auth
        pub.plain_server = True
        pub.zap_domain = ZAP_DOMAIN.encode()

    def _stop_auth(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def publish(self, event: str, **data: Any) -> None:
        msg = {"event": event, "time": time.time(), "data": data}
        log.debug("event %s", event)
        if self._pub is not None:
            import zmq

            try:
                self._pub.send_multipart([event.encode(), msgpack.packb(msg, use_bin_type=True)],
                                         flags=zmq.NOBLOCK)
            except zmq.ZMQError:  # HWM reached: PUB drops, by design
                pass
        for feed in list(self.feeds):
            if feed.wants(event):
                feed.offer(msg)
        for cb in self.listeners:
            try:
                cb(msg)
            except Exception:
                log.exception("event listener failed")

    def close(self) -> None:
        if self._pub is not None:
            self._pub.close(0)
            self._pub = None
            self._stop_auth()
            if self.bound_endpoint and self.bound_endpoint.startswith("ipc://") and self._ipc_id:
                # only our own socket file: a daemon that replaced us there keeps its own
                remove_if_same(self.bound_endpoint[6:], self._ipc_id)


def _unused_name(directory: str, stem: str) -> str:
    """A path in ``directory`` where nothing is (libzmq would unlink what it binds over)."""
    for i in range(100):
        candidate = os.path.join(directory, stem if i == 0 else f"{stem}-{i}")
        if not os.path.lexists(candidate):
            return candidate
    from ..errors import WraithError

    raise WraithError(f"no free name for a socket in {directory}", "EDAEMON")
