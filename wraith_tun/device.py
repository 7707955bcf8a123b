"""The TUN device: created with python-pytun, or adopted from a passed file descriptor."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass


class DeviceError(OSError):
    pass


@dataclass
class TunDevice:
    fd: int
    name: str
    mtu: int
    _owner: object | None = None  # the pytun object keeping fd open, if we created it

    def set_nonblocking(self) -> None:
        os.set_blocking(self.fd, False)

    def close(self) -> None:
        if self._owner is not None:
            try:
                self._owner.close()  # type: ignore[attr-defined]
            except Exception:
                pass
            self._owner = None
        elif self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
        self.fd = -1


def create_tun(name: str | None, iface: ipaddress.IPv4Interface, mtu: int) -> TunDevice:
    """Create, address and bring up a TUN device (needs CAP_NET_ADMIN in this netns)."""
    try:
        import pytun
    except ImportError as e:  # pragma: no cover - depends on the install
        raise DeviceError("python-pytun is not installed: pip install 'wraith[tun]'") from e
    try:
        dev = pytun.TunTapDevice(name=name or "wtun%d", flags=pytun.IFF_TUN | pytun.IFF_NO_PI)
    except pytun.Error as e:
        raise DeviceError(f"cannot create TUN device: {e.args[-1] if e.args else e}") from e
    try:
        os.set_inheritable(dev.fileno(), False)
        dev.mtu = mtu
        dev.addr = str(iface.ip)
        dev.netmask = str(iface.network.netmask)
        dev.up()
    except (pytun.Error, OSError) as e:
        dev.close()
        raise DeviceError(f"cannot configure TUN device: {e}") from e
    return TunDevice(dev.fileno(), dev.name, mtu, dev)
