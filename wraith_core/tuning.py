"""Process-wide speed settings: uvloop, glibc malloc tuning, the cyclic GC.

asyncssh with 256 KiB packets allocates and frees large buffers constantly;
without a top pad glibc grows and trims the heap on every cycle and the
large packets become 2-3x slower (measured). ``M_TOP_PAD`` 64 MiB and an
mmap threshold above the packet size keep those buffers in a warm heap.

Each connection allocates a few hundred objects that live exactly as long
as it does. With CPython's default first-generation threshold (700) the
collector runs every couple of dozen connections, walks those live objects
and promotes them, ~0.3 ms a run (measured: 132 collections, 45 ms, in
3,000 SOCKS connections). At 20,000 most of them are already freed by
reference counting when it runs: 5 collections in the same test.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import inspect
import os

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3


def tune_malloc() -> bool:
    if os.environ.get("WRAITH_NO_MALLOC_TUNING"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = True
    ok &= bool(mallopt(M_MMAP_THRESHOLD, 4 * 1024 * 1024))
    ok &= bool(mallopt(M_TOP_PAD, 64 * 1024 * 1024))
    ok &= bool(mallopt(M_TRIM_THRESHOLD, 128 * 1024 * 1024))
    return ok


def raise_fd_limit() -> int:
    """A tunnel holds two sockets per stream: lift the soft fd limit to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
        except (ValueError, OSError):
            pass
    return soft


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (the ``fast`` extra) and not disabled, else asyncio's."""
    if not os.environ.get("WRAITH_NO_UVLOOP"):
        try:
            import uvloop

            return uvloop.new_event_loop()
        except ImportError:
            pass
    return asyncio.new_event_loop()


GC_THRESHOLD0 = 20_000


def tune_gc() -> None:
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD0, gen1, gen2)


def run(main: object) -> object:
    try:
        tune_malloc()
        tune_gc()
        raise_fd_limit()
        loop = new_event_loop()
    except BaseException:  # (a Ctrl-C while uvloop loads, say): the coroutine never starts
        if inspect.iscoroutine(main):
            main.close()  # closed, so not reported as "never awaited"
        raise
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)  # type: ignore[arg-type]
    finally:
        try:
            _cancel_leftovers(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the tasks still pending when ``main`` returns and let them unwind, as
    ``asyncio.run`` does (else each is reported as "Task was destroyed but it is pending")."""
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler({"message": "unhandled exception during shutdown",
                                         "exception": task.exception(), "task": task})
