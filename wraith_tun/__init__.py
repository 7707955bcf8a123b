"""wraith-tun: the privileged TUN shim that turns IP packets into SOCKS5 connections.

It imports nothing of wraith's SSH, keys or transports; all it needs is a
SOCKS5 address (normally the local ``wraith connect``).

Library use::

    from wraith_tun import TunOptions, run_unshare, run_device
    rc = await run_unshare(TunOptions(socks5=("127.0.0.1", 1080)), ["curl", "http://intranet/"])
"""

from __future__ import annotations

from typing import Any

__all__ = ["__version__", "TunOptions", "run_unshare", "run_device"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:  # lazy: the netns helper imports this package too
    if name in ("TunOptions", "run_unshare", "run_device"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
