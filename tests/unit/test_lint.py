"""The lint rules, the formatting and the type checks in pyproject.toml hold, so CI fails when they do not.

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


@pytest.mark.parametrize(
    ("command", "fix"),
    [
        (("check", "--no-cache"), "`ruff check --fix .` fixes some"),
        (("format", "--check", "--no-cache"), "run `ruff format .`"),
    ],
    ids=["check", "format"],
)
def test_ruff_passes(command, fix):
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, (
        f"ruff {command[0]} found problems ({fix}):\n{done.stdout}{done.stderr}"
    )


def test_mypy_passes(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy-cache")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"mypy found problems:\n{done.stdout}{done.stderr}"
