"""examples/python_pubsub.py: two Python processes exchange events through a real `wraith serve`."""

from __future__ import annotations

import os
import re
import subprocess

from helpers import PY, ROOT


def test_pubsub_example_demo() -> None:
    r = subprocess.run([PY, str(ROOT / "examples" / "python_pubsub.py"), "demo", "--count", "25"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "responder: ready" in r.stdout
    assert re.search(r"requester: 25 round trips, median [\d.]+ ms", r.stdout), r.stdout
    assert "responder: answered 25 pings" in r.stdout


def test_pubsub_example_needs_connection_flags() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WRAITH_")}
    r = subprocess.run([PY, str(ROOT / "examples" / "python_pubsub.py"), "requester"],
                       capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 2
    assert "--server, --identity and --host-key are required" in r.stderr
    assert "Traceback" not in r.stderr
