"""The package type-checks: mypy, configured in pyproject.toml ([tool.mypy])."""

from __future__ import annotations

import subprocess

from helpers import PY, ROOT


def test_mypy_finds_no_errors(tmp_path) -> None:
    r = subprocess.run([PY, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy-cache")], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "Success" in r.stdout
