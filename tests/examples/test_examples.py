"""Every example runs as a user would run it: a subprocess on its own embedded cluster.

Each example checks its own output and exits non-zero when it is wrong; these tests
run them with small options and look for their closing line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

CASES = {
    "pytorch_quickstart.py": (["--rows", "300", "--batch-size", "64"], "OK: scored 300 rows"),
    "huggingface_quickstart.py": (
        ["--rows", "8", "--batch-size", "4", "--max-new-tokens", "4"],
        "OK: completed 8 prompts",
    ),
    "embed_minilm.py": (
        ["--rows", "120", "--batch-size", "32", "--sample", "8"],
        "OK: embedded 120 sentences",
    ),
    "tensorflow_quickstart.py": (["--rows", "300", "--batch-size", "64"], "OK: scored 300 rows"),
    "text_generation.py": (
        ["--rows", "12", "--batch-size", "4", "--max-new-tokens", "4"],
        "OK: completed 12 prompts",
    ),
    "embed_with_predictor.py": (
        ["--rows", "120", "--batch-size", "32", "--max-tokens-per-batch", "2048", "--sample", "8"],
        "OK: embedded 120 texts",
    ),
    "image_classification.py": (
        ["--rows", "6", "--size", "64", "--batch-size", "3", "--check", "3"],
        "OK: classified 6 images",
    ),
}


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(CASES)


def _run(name: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        check=False,
        cwd=tmp_path,  # examples must not depend on the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs_and_checks_itself(name, tmp_path):
    args, expected = CASES[name]
    if name == "embed_minilm.py":
        args = [*args, "--output", str(tmp_path / "embeddings")]
    proc = _run(name, args, tmp_path)
    report = f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, report
    assert expected in proc.stdout, report
    if name == "embed_minilm.py":  # the output is where it was asked to be, in order
        import pandas as pd

        df = pd.read_parquet(tmp_path / "embeddings")
        assert list(df["id"]) == list(range(120))
