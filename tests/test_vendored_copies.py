"""bindings/python carries a copy of the event target (so it never imports the SSH stack); it must match."""

from __future__ import annotations

import subprocess
import sys

from helpers import ROOT


def test_wraith_client_copies_match_wraith_core() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bindings/python/sync_vendor.py"), "--check"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
