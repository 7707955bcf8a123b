"""Transports: each produces ONE duplex byte stream per SSH session."""

from __future__ import annotations

from .base import Acceptor, Connector, TransportInfo, make_acceptor, make_connector

__all__ = ["Acceptor", "Connector", "TransportInfo", "make_acceptor", "make_connector"]
