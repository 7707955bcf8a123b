"""The library API of wraith-tun: one options object, two ways to run.

    opts = TunOptions(socks5=("127.0.0.1", 1080))
    rc = await run_unshare(opts, ["curl", "http://intranet/"])   # CMD in its own netns
    await run_device(TunOptions(setup=True, bypass=["203.0.113.7/32"]), stop_event)

The CLI only turns flags into a :class:`TunOptions` and calls these.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
from dataclasses import asdict, dataclass, field

from .budget import DEFAULT_LIMIT
from .device import DeviceError, create_tun
from .dns import VirtualDns
from .netns import NamespaceError
from .routes import RouteError, RouteSetup, check_free
from .shim import Shim, ShimConfig
from .tcp import TcpConfig

log = logging.getLogger("wraith_tun")

__all__ = ["TunOptions", "TunError", "run_unshare", "run_device", "DeviceError", "NamespaceError", "RouteError"]

TunError = (DeviceError, NamespaceError, RouteError)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class TunOptions:
    socks5: tuple[str, int] = ("127.0.0.1", 1080)
    tun_addr: ipaddress.IPv4Interface = field(default_factory=lambda: ipaddress.IPv4Interface("10.0.0.1/24"))
    tun_addr6: ipaddress.IPv6Interface | None = field(
        default_factory=lambda: ipaddress.IPv6Interface("fd77:7772:6169::1/64"))
    tun_name: str | None = None
    mtu: int = 65000
    dns: bool = True  # virtual DNS
    dns_addr: str | None = None  # default: the address after tun_addr
    max_flows: int = 4096
    max_buffered: int = DEFAULT_LIMIT  # bytes from SOCKS5 not yet acked by the programs, all flows together
    idle_timeout: float = 7440.0  # seconds without traffic before a flow is reset; 0 = never
    setup: bool = False  # route everything into the TUN (run_device only)
    bypass: list[IPNetwork] = field(default_factory=list)

    def __post_init__(self) -> None:
        # the library takes strings too (as the CLI's flags): "10.0.0.1/24", ["203.0.113.7/32"]
        self.tun_addr = ipaddress.IPv4Interface(self.tun_addr)
        if self.tun_addr6 is not None:
            self.tun_addr6 = ipaddress.IPv6Interface(self.tun_addr6)
        self.bypass = [ipaddress.ip_network(b) for b in self.bypass]
        if self.dns_addr is None:
            nxt = self.tun_addr.ip + 1
            net = self.tun_addr.network
            self.dns_addr = str(nxt if nxt in net and nxt != net.broadcast_address else self.tun_addr.ip - 1)

    def shim_config(self) -> ShimConfig:
        return ShimConfig(socks_host=self.socks5[0], socks_port=self.socks5[1], tcp=TcpConfig(mtu=self.mtu),
                          max_flows=self.max_flows, idle_timeout=self.idle_timeout,
                          dns=VirtualDns() if self.dns else None, max_buffered=self.max_buffered,
                          broadcast=frozenset({self.tun_addr.network.broadcast_address.packed}))


async def _socks_bypass(opts: TunOptions) -> list[IPNetwork]:
    """The SOCKS5 server itself must never be reached through the TUN (that would loop)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(opts.socks5[0], opts.socks5[1], type=socket.SOCK_STREAM)
    except OSError as e:
        raise RouteError(f"cannot resolve the SOCKS5 server {opts.socks5[0]}: {e}") from e
    nets: list[IPNetwork] = []
    for *_, addr in infos:
        ip = ipaddress.ip_address(addr[0])
        net = ipaddress.ip_network(ip)
        if not ip.is_loopback and not any(ip in b for b in opts.bypass) and net not in nets:
            nets.append(net)
    return nets


def _report(shim: Shim) -> None:
    log.info("stopped: %s", " ".join(f"{k}={v}" for k, v in asdict(shim.stats).items()))


async def run_unshare(opts: TunOptions, cmd: list[str], forward_signals: bool = True) -> int:
    """Run CMD in a new network + mount namespace behind the TUN; returns CMD's exit status."""
    from . import netns

    un = await netns.spawn(cmd, opts.tun_addr, opts.mtu, opts.dns_addr if opts.dns else None, opts.tun_name,
                           opts.tun_addr6)
    loop = asyncio.get_running_loop()
    shim = Shim(un.fd, opts.shim_config(), loop, vnet_hdr=True)
    shim.start()

    def forward(sig: int) -> None:
        try:
            un.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) if forward_signals else ()
    for sig in sigs:
        loop.add_signal_handler(sig, forward, sig)
    un.go()
    try:
        return await un.wait()
    finally:
        for sig in sigs:
            loop.remove_signal_handler(sig)
        shim.stop()
        os.close(un.fd)
        _report(shim)


async def run_device(opts: TunOptions, stop: asyncio.Event | None = None) -> int:
    """Create the TUN (and routes with ``opts.setup``) and serve until ``stop`` is set,
    or until SIGTERM/SIGINT/SIGHUP when no event is given. Routes are removed on the way out."""
    loop = asyncio.get_running_loop()
    check_free(opts.tun_addr)
    dev = create_tun(opts.tun_name, opts.tun_addr, opts.mtu, iface6=opts.tun_addr6)
    routes: RouteSetup | None = None
    shim = Shim(dev.fd, opts.shim_config(), loop, vnet_hdr=dev.vnet_hdr)
    own_signals = stop is None
    stop_event = stop or asyncio.Event()
    try:
        if opts.setup:
            auto = await _socks_bypass(opts)
            if not opts.bypass and not auto:  # a local SOCKS5 server: wraith connect on this machine
                log.warning("--setup without --bypass: the tunnel's own connection to its server is routed "
                            "into the TUN too and will loop (unless it reaches the server through a route "
                            "more specific than /1); give --bypass SERVER_IP/32")
            bypass = list(opts.bypass) + auto
            routes = RouteSetup(dev.name, bypass, ipv6=opts.tun_addr6 is not None)
            routes.apply()
        shim.start()
        if own_signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.add_signal_handler(sig, stop_event.set)
        log.info("ready dev=%s addr=%s dns=%s socks5=%s:%d routes=%s", dev.name, opts.tun_addr,
                 opts.dns_addr if opts.dns else "off", opts.socks5[0], opts.socks5[1],
                 "all" if opts.setup else "none")
        await stop_event.wait()
        return 0
    finally:
        if own_signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        shim.stop()
        if routes is not None:
            routes.remove()
        dev.close()
        _report(shim)
