"""The daemon's session pool, in process, against a real wraith server on loopback."""

from __future__ import annotations

from helpers import Keys
from wraith_core import ConnectOptions, ServeOptions, serve
from wraith_core.daemon.events import EventBus
from wraith_core.daemon.pool import SessionPool


async def test_a_session_lost_before_its_watcher_ran_is_not_handed_out(keys: Keys) -> None:
    """connection_lost clears the session's connection at once; the pool's watcher task runs
    later. An acquire in between must start a new session — not retry the dead entry
    (which found it again and again, without waiting, until the recursion limit)."""
    server = await serve(ServeOptions(key=str(keys.host), authorized_keys=str(keys.authorized),
                                      listen="127.0.0.1:0"))
    bus = EventBus(None)
    pool = SessionPool(bus, linger=0.5)
    opts = ConnectOptions(server=server.addresses()[0], identity=str(keys.client), host_key=str(keys.host_pub),
                          socks5=None)
    try:
        first, pooled = await pool.acquire(opts)
        assert not pooled and first.session is not None
        again, pooled = await pool.acquire(opts)
        assert again is first and pooled
        first.session._on_lost(first.session.conn, None)  # what connection_lost does, before any task runs
        second, pooled = await pool.acquire(opts)  # no yield in between (wait_for would give one)
        assert second is not first and not pooled
        assert second.session is not None and second.session.conn is not None
        first.release()
        first.release()
        second.release()
    finally:
        await pool.close()
        await server.close()
