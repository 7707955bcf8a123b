"""wraith-tun: the privileged TUN shim that turns IP packets into SOCKS5 connections.

It imports nothing of wraith's SSH, keys or transports; all it needs is a
SOCKS5 address (normally the local ``wraith connect``).
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
