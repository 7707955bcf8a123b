from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from netenv import TestNet, WraithNet, ensure_tools  # noqa: E402


@pytest.fixture(scope="module")
def wnet() -> Iterator[WraithNet]:
    """Client and server namespaces, an HTTP test host, real `wraith serve` + `wraith connect`."""
    assert os.geteuid() == 0, "the TUN tests need root (real TUN devices and network namespaces)"
    ensure_tools("ip", "curl", "ssh-keygen", "unshare")
    with TestNet("e") as net:
        files = {}
        rnd = __import__("random").Random(7)
        for name, size in [("big.bin", 8_000_000), ("mid.bin", 300_000), ("small.bin", 1234)]:
            data = rnd.randbytes(size)
            (net.www / name).write_bytes(data)
            files[name] = hashlib.sha256(data).hexdigest()
        net.start_http()
        host, port = net.start_wraith()
        yield WraithNet(net, f"{host}:{port}", files)
