"""``wraith-tun``: command line front of the TUN shim (flags -> objects -> run)."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

from .api import TunError, TunOptions, run_device, run_unshare
from .budget import DEFAULT_LIMIT

log = logging.getLogger("wraith_tun")

USAGE = """wraith-tun [--socks5 HOST:PORT] [--tun-addr ADDR/LEN] [--tun-addr6 ADDR/LEN|off] [--tun-name NAME] [--mtu N]
                  [--dns virtual|off] [--dns-addr ADDR] [--max-flows N] [--max-buffered MIB] [--idle-timeout S] [-v]
                  [--setup [--bypass CIDR]...] | [--unshare -- CMD ARGS...]"""


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="wraith-tun", usage=USAGE,
                description="Turn IP packets on a TUN device into SOCKS5 connections (to `wraith connect`).")
    p.add_argument("--socks5", default="127.0.0.1:1080", metavar="HOST:PORT",
                   help="SOCKS5 server for every TCP flow (default 127.0.0.1:1080)")
    p.add_argument("--tun-addr", default="10.0.0.1/24", metavar="ADDR/LEN",
                   help="address of the TUN device (default 10.0.0.1/24)")
    p.add_argument("--tun-addr6", default="fd77:7772:6169::1/64", metavar="ADDR/LEN|off",
                   help="IPv6 address of the TUN (default fd77:7772:6169::1/64); 'off' = IPv4 only")
    p.add_argument("--tun-name", default=None, help="device name (default wtunN)")
    p.add_argument("--mtu", type=int, default=65000, help="TUN MTU (default 65000: fewer, larger packets for the Python engine)")
    p.add_argument("--dns", choices=["virtual", "off"], default="virtual",
                   help="virtual: answer UDP/53 with fake 198.18.0.0/15 addresses resolved by the server (default)")
    p.add_argument("--dns-addr", default=None, metavar="ADDR",
                   help="DNS address on the TUN written to --unshare's resolv.conf (default: next address after --tun-addr)")
    p.add_argument("--max-flows", type=int, default=4096, help="TCP flows held at once (default 4096)")
    p.add_argument("--max-buffered", type=int, default=DEFAULT_LIMIT >> 20, metavar="MIB",
                   help="MiB read from SOCKS5 and not yet acknowledged by the programs, all flows together "
                        f"(default {DEFAULT_LIMIT >> 20}); beyond half of it each flow keeps only a reserve")
    p.add_argument("--idle-timeout", type=float, default=7440.0, metavar="SECONDS",
                   help="reset flows idle this long (default 7440 = 2h4m, RFC 5382; 0 = never)")
    p.add_argument("--setup", action="store_true", help="route all IPv4 traffic into the TUN until exit")
    p.add_argument("--bypass", action="append", default=[], metavar="CIDR",
                   help="with --setup: keep this network on its current route (your SSH server!); repeatable")
    p.add_argument("--unshare", action="store_true",
                   help="run CMD (after --) in a new network+mount namespace whose only route is the TUN")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _hostport(s: str) -> tuple[str, int]:
    host, sep, port = s.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise UsageError(f"--socks5 wants HOST:PORT, got {s!r}")
    return host, int(port)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    cmd: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, cmd = argv[:i], argv[i + 1 :]
    a = _parser().parse_args(argv)
    a.socks_host, a.socks_port = _hostport(a.socks5)
    try:
        a.iface = ipaddress.IPv4Interface(a.tun_addr)
    except ValueError:
        raise UsageError(f"--tun-addr wants an IPv4 ADDR/LEN, got {a.tun_addr!r}") from None
    if a.iface.network.prefixlen > 30 or a.iface.ip in (a.iface.network.network_address, a.iface.network.broadcast_address):
        raise UsageError("--tun-addr needs a host address in a network of /30 or larger")
    if a.tun_addr6 == "off":
        a.iface6 = None
    else:
        try:
            a.iface6 = ipaddress.IPv6Interface(a.tun_addr6)
        except ValueError:
            raise UsageError(f"--tun-addr6 wants an IPv6 ADDR/LEN or 'off', got {a.tun_addr6!r}") from None
    if not 1280 <= a.mtu <= 65535:
        raise UsageError("--mtu must be between 1280 and 65535")
    if a.max_flows < 1:
        raise UsageError("--max-flows must be at least 1")
    if not 1 <= a.max_buffered <= 1 << 20:
        raise UsageError("--max-buffered must be between 1 and 1048576 (MiB)")
    if not (a.idle_timeout == 0 or 1 <= a.idle_timeout < float("inf")):  # tiny values would spin the sweeper
        raise UsageError("--idle-timeout must be 0 (never) or at least 1 second")
    try:
        a.bypass_nets = [ipaddress.ip_network(b, strict=False) for b in a.bypass]
    except ValueError as e:
        raise UsageError(f"--bypass: {e}") from None
    if a.dns_addr is not None:
        try:
            dns_ip = ipaddress.IPv4Address(a.dns_addr)
        except ValueError:
            raise UsageError(f"--dns-addr wants an IPv4 address, got {a.dns_addr!r}") from None
        if dns_ip == a.iface.ip:
            raise UsageError("--dns-addr must differ from the TUN's own address (that one never reaches the TUN)")
    if a.unshare and not cmd:
        raise UsageError("--unshare needs a command after --")
    if cmd and not a.unshare:
        raise UsageError("a command after -- needs --unshare")
    if a.unshare and a.setup:
        raise UsageError("--setup and --unshare cannot be combined")
    if a.bypass and not a.setup:
        raise UsageError("--bypass only makes sense with --setup")
    return a, cmd


def options(a: argparse.Namespace) -> TunOptions:
    return TunOptions(
        socks5=(a.socks_host, a.socks_port), tun_addr=a.iface, tun_addr6=a.iface6, tun_name=a.tun_name,
        mtu=a.mtu, dns=a.dns == "virtual", dns_addr=a.dns_addr, max_flows=a.max_flows,
        max_buffered=a.max_buffered << 20, idle_timeout=a.idle_timeout,
        setup=a.setup, bypass=a.bypass_nets,
    )


def _raise_fd_limit(flows: int) -> None:
    """Each flow holds one SOCKS5 socket: make room for --max-flows of them."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = flows + 64
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
    except (ImportError, ValueError, OSError):
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        a, cmd = parse(argv)
    except UsageError as e:
        print(f"wraith-tun: error: {e}", file=sys.stderr)
        return 2
    quiet = logging.WARNING if a.unshare else logging.INFO  # --unshare: the terminal belongs to CMD
    logging.basicConfig(level=logging.DEBUG if a.verbose else quiet,
                        format="wraith-tun: %(message)s", stream=sys.stderr)
    _raise_fd_limit(a.max_flows)
    runner: Callable[[Coroutine[Any, Any, int]], int] = asyncio.run
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        pass
    try:
        opts = options(a)
        return runner(run_unshare(opts, cmd) if a.unshare else run_device(opts))
    except TunError as e:
        print(f"wraith-tun: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
