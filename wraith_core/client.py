"""``wraith connect`` as a library class: session + SOCKS5 + forwards."""

from __future__ import annotations

import logging

from .forward import LocalForwarder
from .options import ConnectOptions
from .relay import RelayEnd
from .socks import Socks5Listener
from .ssh.channels import ChannelManager
from .ssh.client import Session, StateCallback

log = logging.getLogger("wraith.client")


class WraithClient:
    """One SSH session (reconnecting) with its local listeners."""

    def __init__(self, options: ConnectOptions, on_state: StateCallback | None = None) -> None:
        self.options = options
        RelayEnd.half_open_timeout = options.half_open_timeout
        self.session = Session(options, reconnect=True, on_state=on_state)
        self.channels = ChannelManager(self.session)
        self.socks: Socks5Listener | None = None
        self.forwarders: list[LocalForwarder] = []
        for spec in options.remote_forwards():
            self.channels.add_remote_forward(spec)

    async def start(self) -> None:
        """Open the listeners (they stay open across reconnects), then start the session."""
        opts = self.options
        try:
            if opts.socks5:
                host, port = opts.socks5_address()
                self.socks = Socks5Listener(self.channels, host, port, opts.socks5_credentials())
                await self.socks.start()
            for spec in opts.forwards():
                fwd = LocalForwarder(self.channels, spec)
                await fwd.start()
                self.forwarders.append(fwd)
        except Exception:
            self._close_listeners()
            raise
        await self.session.start()

    def _close_listeners(self) -> None:
        if self.socks is not None:
            self.socks.close()
        for fwd in self.forwarders:
            fwd.close()

    async def close(self) -> None:
        self._close_listeners()
        await self.session.close()
