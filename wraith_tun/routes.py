"""Route-all mode (``--setup``): send everything through the TUN except ``--bypass`` CIDRs.

The default route is taken over with two /1 routes (0.0.0.0/1 and
128.0.0.0/1, and ::/1 + 8000::/1 for IPv6), which win over the existing default route without deleting it,
so removing ours restores the machine exactly. Each ``--bypass`` CIDR gets a
route through the path it used before (the SSH server must stay reachable
outside the TUN, or wraith's own transport would loop into it).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import subprocess

log = logging.getLogger("wraith_tun")


class RouteError(Exception):
    pass


# Routes we add carry this routing protocol number (`ip route show proto 213`), so a run that
# was killed can be cleaned up by the next one without touching anybody else's routes.
PROTO = "213"
TAKEOVER = ("0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1")


def _ip(*args: str) -> str:
    try:
        r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    except FileNotFoundError as e:
        raise RouteError("the 'ip' command (iproute2) is missing") from e
    if r.returncode != 0:
        raise RouteError(f"ip {' '.join(args)}: {r.stderr.strip() or 'failed'}")
    return r.stdout


class RouteSetup:
    def __init__(self, dev: str, bypass: list[ipaddress.IPv4Network | ipaddress.IPv6Network], ipv6: bool = False):
        self.dev = dev
        self.bypass = bypass
        self.ipv6 = ipv6  # also take over IPv6 (::/1 + 8000::/1)
        self._added: list[list[str]] = []

    def _add(self, spec: list[str]) -> None:
        _ip("route", "add", *spec, "proto", PROTO)
        self._added.append(spec)

    def _clear_leftovers(self) -> None:
        """Routes of ours that a killed run left behind: its /1 routes went with its TUN
        device, its bypass routes did not. If /1 routes of ours are still there, another
        instance is active: refuse rather than take its routes away."""
        for family in ("-4", "-6"):
            try:
                routes = json.loads(_ip(family, "-j", "route", "show", "proto", PROTO) or "[]")
            except ValueError as e:
                raise RouteError("cannot parse the routing table") from e
            except RouteError:
                if family == "-4" or self.ipv6:
                    raise
                continue  # no IPv6 on this machine: nothing of ours there
            if any(r.get("dst") in TAKEOVER for r in routes):
                raise RouteError("another wraith-tun --setup is active (its routes take over the default "
                                 "route); stop it first")
            for r in routes:
                _ip(family, "route", "del", str(r.get("dst")), "proto", PROTO)
                log.info("removed a route left by an earlier run: %s", r.get("dst"))

    def apply(self) -> None:
        """Add routes; on failure, remove what was added and raise RouteError."""
        self._clear_leftovers()
        try:
            plans = [(net, self._current_path(net)) for net in self.bypass]  # before we take over
            for net, path in plans:
                if path is None:
                    continue
                try:
                    self._add([str(net), *path])
                except RouteError as e:
                    if "File exists" not in str(e):
                        raise
                    # that exact route exists already (e.g. an on-link network): it outranks our /1s
                    log.debug("bypass %s: route exists, kept as is", net)
            self._add(["0.0.0.0/1", "dev", self.dev])
            self._add(["128.0.0.0/1", "dev", self.dev])
            if self.ipv6:
                self._add(["::/1", "dev", self.dev])
                self._add(["8000::/1", "dev", self.dev])
        except RouteError:
            self.remove()
            raise

    def _current_path(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> list[str] | None:
        out = _ip("-j", "route", "get", str(net.network_address))
        try:
            route = json.loads(out)[0]
        except (ValueError, IndexError) as e:
            raise RouteError(f"cannot parse the route to {net}") from e
        if route.get("type") == "local" or route.get("dev") == "lo":
            return None  # local addresses never use the TUN
        if route.get("dev") == self.dev:
            raise RouteError(f"bypass {net} already routes into {self.dev}")
        path = []
        if route.get("gateway"):
            path += ["via", route["gateway"]]
        path += ["dev", route["dev"]]
        return path

    def remove(self) -> None:
        for spec in reversed(self._added):
            try:
                _ip("route", "del", *spec, "proto", PROTO)
            except RouteError as e:
                log.debug("route cleanup: %s", e)  # gone with the device already
        self._added.clear()


def check_free(iface: ipaddress.IPv4Interface) -> None:
    """Refuse a TUN network that overlaps one this machine already uses (an address on
    another interface, or a route to it): taking 10.0.0.1/24 on a LAN whose router is
    10.0.0.1 would cut the machine off from its router."""
    net = iface.network
    for link in json.loads(_ip("-4", "-j", "addr", "show") or "[]"):
        for a in link.get("addr_info", []):
            try:
                other = ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network
            except (KeyError, ValueError):
                continue
            if other.overlaps(net) and not other.is_loopback:
                raise RouteError(f"--tun-addr {iface} overlaps {link.get('ifname')}'s {a['local']}/{a['prefixlen']}; "
                                 f"pick a free network with --tun-addr")
    for r in json.loads(_ip("-4", "-j", "route", "show") or "[]"):
        dst = r.get("dst")
        if not dst or dst == "default":
            continue
        try:
            other = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if other.overlaps(net) and other.prefixlen >= 8 and r.get("protocol") != PROTO:  # not catch-alls
            raise RouteError(f"--tun-addr {iface} overlaps the route to {dst} via {r.get('dev')}; "
                             f"pick a free network with --tun-addr")
