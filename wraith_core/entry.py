"""The ``wraith`` command's entry point, kept free of imports.

Loading the program (asyncssh, cryptography, …) takes a few hundred
milliseconds; a Ctrl-C meanwhile should end it quietly with status 130, as it
does later, not with a traceback from the middle of some import.
"""

from __future__ import annotations

import signal
from types import FrameType


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(130)


def main() -> int:
    signal.signal(signal.SIGINT, _interrupted)
    from .cli import main as cli_main

    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return cli_main()
    except KeyboardInterrupt:  # between here and the command's own handling
        return 130
