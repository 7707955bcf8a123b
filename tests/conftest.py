from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import HTTPFiles, Keys


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys.make(tmp_path / "keys")


@pytest.fixture
def procs() -> Iterator[list]:
    """Processes registered here are stopped at teardown, whatever happened."""
    started: list = []
    yield started
    for p in reversed(started):
        try:
            p.stop()
        except Exception:
            pass


@pytest.fixture
def files(tmp_path: Path) -> Iterator[HTTPFiles]:
    f = HTTPFiles(tmp_path / "www", {"small.bin": 1000, "big.bin": 8 * 1024 * 1024, "empty.bin": 0})
    yield f
    f.stop()
