"""The lint rules in pyproject.toml hold, so CI fails when they do not.

They carry architecture, not only taste: ``banned-module-level-imports`` keeps torch,
transformers and dask_cuda out of module level, so that ``import daskinfer`` stays cheap
on CPU workers and the client.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_ruff_check_passes():
    pytest.importorskip("ruff", reason="ruff comes with the test extra: pip install -e '.[test]'")
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, (
        f"ruff check found problems (`ruff check --fix .` fixes some):\n{done.stdout}{done.stderr}"
    )
