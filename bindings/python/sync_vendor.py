"""Copy the pubsub framing, the event target and the WebSocket frame input from wraith_core into
wraith_client (no SSH imports).

Run from the repository root after changing wraith_core/protocol/envelope.py, protocol/frame_input.py
or wraith_core/events.py:
    python3 bindings/python/sync_vendor.py [--from-git REV]
    python3 bindings/python/sync_vendor.py --check     # exit 1 if the copies have drifted (run by the tests)
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


def vendored(rev: str | None) -> dict[Path, str]:
    env = read("wraith_core/protocol/envelope.py", rev)
    ev = read("wraith_core/events.py", rev).replace("from .protocol.envelope import", "from ._envelope import")
    assert "from .errors import WraithError" in ev
    frames = read("wraith_core/protocol/frame_input.py", rev)
    return {DEST / "_envelope.py": HEADER.format(src="protocol/envelope.py") + env,
            DEST / "eventtarget.py": HEADER.format(src="events.py") + ev,
            DEST / "_frame_input.py": HEADER.format(src="protocol/frame_input.py") + frames}


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] not in ("--from-git", "--check"):
        sys.exit(__doc__)
    rev = args[1] if len(args) > 1 and args[0] == "--from-git" else None
    files = vendored(rev)
    if args[:1] == ["--check"]:
        stale = [str(p) for p, text in files.items() if p.read_text() != text]
        if stale:
            sys.exit("out of date (run python3 bindings/python/sync_vendor.py): " + ", ".join(stale))
        print("vendored copies are up to date")
        return
    for path, text in files.items():
        path.write_text(text)
    print("synced", *files)


if __name__ == "__main__":
    main()
