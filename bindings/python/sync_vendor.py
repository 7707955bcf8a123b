"""Copy the pubsub framing + event target from wraith_core into wraith_client (no SSH imports).

Run from the repository root after changing wraith_core/protocol/envelope.py or wraith_core/events.py:
    python3 bindings/python/sync_vendor.py [--from-git REV]
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEST = Path(__file__).resolve().parent / "wraith_client"
HEADER = "# Vendored from wraith_core/{src} by bindings/python/sync_vendor.py — edit the original.\n"


def read(src: str, rev: str | None) -> str:
    if rev:
        return subprocess.run(["git", "show", f"{rev}:{src}"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
    return (ROOT / src).read_text()


def main() -> None:
    rev = sys.argv[2] if len(sys.argv) > 2 and sys.argv[1] == "--from-git" else None
    env = read("wraith_core/protocol/envelope.py", rev)
    ev = read("wraith_core/events.py", rev).replace("from .protocol.envelope import", "from ._envelope import")
    assert "from .errors import WraithError" in ev
    (DEST / "_envelope.py").write_text(HEADER.format(src="protocol/envelope.py") + env)
    (DEST / "eventtarget.py").write_text(HEADER.format(src="events.py") + ev)
    print("synced", DEST / "_envelope.py", DEST / "eventtarget.py")


if __name__ == "__main__":
    main()
