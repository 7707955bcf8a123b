"""The TUN device: created with python-pytun, or adopted from a passed file descriptor."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import subprocess
from dataclasses import dataclass

IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01
VNET_HDR_LEN = 10  # struct virtio_net_hdr


class DeviceError(OSError):
    pass


@dataclass
class TunDevice:
    fd: int
    name: str
    mtu: int
    vnet_hdr: bool = False  # packets carry a virtio_net_hdr (checksum offload)
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


def create_tun(name: str | None, iface: ipaddress.IPv4Interface, mtu: int, offload: bool = True,
               iface6: ipaddress.IPv6Interface | None = None) -> TunDevice:
    """Create, address and bring up a TUN device (needs CAP_NET_ADMIN in this netns).

    With ``offload`` every packet carries a virtio_net_hdr: the kernel tells us
    which checksums it already trusts, and our packets say "checksum valid", so
    neither side spends time summing payload bytes that never left the machine.
    """
    try:
        import pytun
    except ImportError as e:  # pragma: no cover - depends on the install
        raise DeviceError("python-pytun is not installed: pip install 'wraith[tun]'") from e
    try:
        flags = pytun.IFF_TUN | pytun.IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
        dev = pytun.TunTapDevice(name=name or "wtun%d", flags=flags)
    except pytun.Error as e:
        raise DeviceError(f"cannot create TUN device: {e.args[-1] if e.args else e}") from e
    try:
        os.set_inheritable(dev.fileno(), False)
        if offload:
            fcntl.ioctl(dev.fileno(), TUNSETOFFLOAD, TUN_F_CSUM)
        dev.mtu = mtu
        dev.addr = str(iface.ip)
        dev.netmask = str(iface.network.netmask)
        dev.up()
        _set_ipv6(dev.name, iface6)
    except (pytun.Error, OSError) as e:
        dev.close()
        raise DeviceError(f"cannot configure TUN device: {e}") from e
    return TunDevice(dev.fileno(), dev.name, mtu, offload, dev)


def _set_ipv6(name: str, iface6: ipaddress.IPv6Interface | None) -> None:
    """Give the TUN its IPv6 address, or switch IPv6 off on it (no kernel chatter)."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("0" if iface6 else "1")
    except OSError:
        if iface6:
            raise DeviceError("IPv6 is not available here (use --tun-addr6 off)") from None
        return
    if iface6:
        r = subprocess.run(["ip", "-6", "addr", "add", str(iface6), "dev", name, "nodad"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise DeviceError(f"cannot add {iface6} to {name}: {r.stderr.strip()}")
