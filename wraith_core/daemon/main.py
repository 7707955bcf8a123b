"""``wraith daemon``: directory, endpoints, discovery file, lifecycle."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import WraithError
from . import paths
from .events import EventBus
from .pool import DEFAULT_LINGER, SessionPool
from .ws import IPCServer

log = logging.getLogger("wraith.daemon")

LOCK_WAIT = 15.0  # for a daemon in the same directory that is shutting down (SIGTERM: ~5 s at most)


@dataclass
class DaemonConfig:
    ws: str | None = None            # unix:PATH | tcp:127.0.0.1:PORT; default unix:DIR/daemon.sock
    events: str | None = None        # ipc://PATH | tcp://127.0.0.1:PORT | none; default ipc://DIR/events.sock
    dir: str | None = None
    linger: float = DEFAULT_LINGER
    exit_with_stdin: bool = False


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.dir = Path(config.dir) if config.dir else paths.default_dir()
        self.bus: EventBus | None = None
        self.pool: SessionPool | None = None
        self.ipc: IPCServer | None = None
        self.info: dict[str, Any] = {}
        self._json: Path | None = None
        self._token_file: Path | None = None
        self._token = ""
        self._lock: int | None = None

    async def _lock_dir(self) -> None:
        """One daemon per directory, for its whole life: a daemon started while the previous
        one is still shutting down waits for it (instead of the two removing each other's
        sockets); one started beside a running daemon fails at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOCK_WAIT
        while True:
            self._lock = paths.try_lock_dir(self.dir)
            if self._lock is not None:
                return
            running = paths.running_daemon(self.dir)
            if running is not None:
                raise WraithError(f"another daemon is already listening on {running.get('ws')} "
                                  f"(pid {running.get('pid')}, directory {self.dir})", "EDAEMON")
            if loop.time() >= deadline:
                raise WraithError(f"another daemon (pid {paths.lock_holder(self.dir)}) still holds "
                                  f"{self.dir / paths.LOCK_NAME}; stop it first", "EDAEMON")
            await asyncio.sleep(0.05)

    async def start(self) -> dict[str, Any]:
        cfg = self.config
        endpoint = paths.parse_ws(cfg.ws) if cfg.ws else None
        events = paths.check_events(cfg.events) if cfg.events is not None else "default"
        paths.secure_dir(self.dir, tighten=not cfg.dir)
        await self._lock_dir()
        if endpoint is None:
            endpoint = paths.WsEndpoint("unix", path=str(self.dir / "daemon.sock"))
        if events == "default":
            events = f"ipc://{self.dir / 'events.sock'}"
        token = None
        if endpoint.kind == "tcp" or (events or "").startswith("tcp://"):
            token = secrets.token_urlsafe(32)  # one token for both TCP endpoints; its file is
            # written once both are ours (a daemon that fails to start leaves another's alone)
        self.bus = EventBus(events, token)
        self.bus.start()
        self.pool = SessionPool(self.bus, linger=cfg.linger)
        self.ipc = IPCServer(endpoint, self.bus, self.pool, token if endpoint.kind == "tcp" else None)
        try:
            await self.ipc.start()
        except OSError as exc:
            self.bus.close()
            raise WraithError(f"cannot listen on {endpoint}: {exc.strerror or exc}", "EDAEMON") from None
        except BaseException:
            self.bus.close()
            raise
        if token is not None:
            self._token_file = paths.write_token(self.dir, token)
            self._token = token
        self.info = {
            "version": paths.VERSION,
            "pid": os.getpid(),
            "ws": str(self.ipc.bound),
            "events": self.bus.bound_endpoint,
            "tokenFile": str(self._token_file) if self._token_file else None,
            "started": time.time(),
        }
        self._json = paths.write_daemon_json(self.dir, self.info)
        log.info("daemon ready ws=%s events=%s", self.info["ws"], self.info["events"])
        return self.info

    async def close(self) -> None:
        if self._json is not None:
            try:
                # only remove it if it is still ours (another daemon may have replaced it)
                if json.loads(self._json.read_text()).get("pid") == os.getpid():
                    self._json.unlink()
            except (OSError, ValueError):
                pass
        if self.ipc is not None:
            await self.ipc.close()
        if self.pool is not None:
            await self.pool.close()
        if self.bus is not None:
            self.bus.close()
        if self._token_file is not None:
            try:
                if paths.read_token(self._token_file) == self._token:  # still ours
                    self._token_file.unlink()
            except OSError:
                pass
        if self._lock is not None:  # last: the next daemon here may start now
            paths.unlock_dir(self.dir, self._lock)
            self._lock = None


def _dump_tasks() -> None:
    """SIGUSR2: log where every task is (for diagnosing a stuck daemon)."""
    import io

    for task in asyncio.all_tasks():
        buf = io.StringIO()
        task.print_stack(limit=12, file=buf)
        log.warning("task %s:\n%s", task.get_name(), buf.getvalue())


def _watch_stdin(loop: asyncio.AbstractEventLoop, done: asyncio.Event) -> None:
    def run() -> None:
        try:
            while sys.stdin.buffer.read(65536):
                pass
        except (OSError, ValueError):
            pass
        loop.call_soon_threadsafe(done.set)

    threading.Thread(target=run, name="stdin-lifeline", daemon=True).start()


async def run_daemon(config: DaemonConfig) -> None:
    logging.getLogger("websockets").setLevel(logging.WARNING)
    daemon = Daemon(config)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    loop.add_signal_handler(signal.SIGUSR2, _dump_tasks)
    try:
        info = await daemon.start()
    except BaseException:
        await daemon.close()
        raise
    print(f"wraith daemon: ws {info['ws']}", flush=True)
    print(f"wraith daemon: events {info['events'] or 'none'}", flush=True)
    print(f"wraith daemon: ready {json.dumps(info, separators=(',', ':'))}", flush=True)
    if config.exit_with_stdin:
        _watch_stdin(loop, done)
    try:
        await done.wait()
    finally:
        log.info("daemon shutting down")
        await daemon.close()
