"""``wraith daemon``: SSH streams for other processes over WebSocket + msgpack (docs/ipc.md).

* ``ws.py``     one WebSocket per stream (Unix socket by default, loopback TCP + token on request)
* ``pool.py``   shared SSH sessions (same server + identity -> one session, one channel per stream)
* ``events.py`` state events on ZeroMQ PUB and WebSocket ``events`` feeds
* ``paths.py``  the 0700 directory, 0600 sockets, token file, daemon.json
"""

from __future__ import annotations

from .main import Daemon, DaemonConfig, run_daemon

__all__ = ["Daemon", "DaemonConfig", "run_daemon"]
