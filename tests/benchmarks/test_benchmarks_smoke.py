"""Smoke tests of the benchmark scripts: tiny sizes, daskinfer and loop engines, correct: true.

They run in CI (about 2 minutes in all on 2 cores): a benchmark that no longer runs from a
fresh checkout is a failure, not a skip.

Each script runs in a subprocess, as the runner runs it, and must print one JSON line saying
its output was checked (row count and checksum). The Ray engine is not tested here: it needs
benchmarks/.ray-venv (bash benchmarks/ray-env.sh), which CI does not build.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks")


def run_script(script: str, *args: str, timeout: float = 240, tmp_path=None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    if tmp_path is not None:
        env["DASKINFER_BENCH_DATA"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, (
        f"expected one JSON line, got {proc.stdout!r}\nstderr:\n{proc.stderr[-3000:]}"
    )
    rec = json.loads(lines[0])
    assert rec["correct"] is True, f"{rec}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0
    return rec


def test_w1_tasks_quick():
    rec = run_script(
        "w1_map.py", "--engine", "daskinfer", "--mode", "tasks", "--rows", "20000", "--blocks", "4"
    )
    assert rec["workload"] == "W1" and rec["rows_seen"] == 20000 and rec["rows_per_s"] > 0


@pytest.mark.parametrize(("engine", "mode"), [("daskinfer", "pool"), ("loop", "tasks")])
def test_w1(engine, mode):
    rec = run_script(
        "w1_map.py", "--engine", engine, "--mode", mode, "--rows", "20000", "--blocks", "4"
    )
    assert rec["checksum"] == 20000 * 20001 / 2


@pytest.mark.parametrize("engine", ["daskinfer", "loop"])
def test_w2(engine):
    rec = run_script(
        "w2_pipeline.py", "--engine", engine, "--batches", "10", "--cpu-ms", "5", "--gpu-ms", "5"
    )
    assert rec["ideal_over_actual"] > 0


@pytest.mark.parametrize("engine", ["daskinfer", "loop"])
def test_w3(engine):
    rec = run_script(
        "w3_embed.py",
        "--engine",
        engine,
        "--rows",
        "64",
        "--batch-size",
        "32",
        "--blocks",
        "2",
        "--check-rows",
        "2",
    )
    assert rec["check_max_abs_diff"] is not None and rec["check_max_abs_diff"] < 1e-3


@pytest.mark.parametrize("engine", ["daskinfer", "loop"])
def test_w4(engine, tmp_path):
    for scale in ("1", "10"):
        rec = run_script(
            "w4_parquet.py",
            "--engine",
            engine,
            "--base-mb",
            "1",
            "--files",
            "2",
            "--scale",
            scale,
            tmp_path=tmp_path,
        )
        assert rec["peak_rss_mb"] > 0 and rec["mb_per_s"] > 0


@pytest.mark.parametrize("engine", ["daskinfer", "loop"])
def test_w5(engine):
    rec = run_script(
        "w5_tokens.py", "--engine", engine, "--rows", "64", "--batch-size", "32", "--blocks", "2"
    )
    assert rec["correct"] and rec["max_abs_diff"] < 1e-4 and rec["speedup"] > 0


def test_w6():
    rec = run_script(
        "w6_scaling.py",
        "--engine",
        "daskinfer",
        "--batches",
        "8",
        "--pools",
        "1,2",
        "--sleep-ms",
        "20",
        "--blocks",
        "2",
    )
    assert set(rec["efficiency"]) == {"1", "2"}


@pytest.mark.parametrize("engine", ["daskinfer", "loop"])
def test_w7_cpu_dry_run(engine, tmp_path):
    rec = run_script(
        "w7_gpu.py",
        "--engine",
        engine,
        "--device",
        "cpu",
        "--images",
        "4",
        "--image-side",
        "64",
        "--texts",
        "16",
        "--batch-size",
        "4",
        "--workers",
        "1",
        tmp_path=tmp_path,
        timeout=400,
    )
    assert set(rec["models"]) == {"resnet50", "minilm"}


def test_read_images_cost(tmp_path):
    rec = run_script(
        "read_images_cost.py",
        "--files",
        "4",
        "--side",
        "32",
        "--reps",
        "1",
        "--rounds",
        "1",
        "--delays",
        "0",
        tmp_path=tmp_path,
        timeout=120,
    )
    assert set(rec["ms_per_block_median"]) == {"current local", "current http 0 ms"}


def test_nd_columns():
    rec = run_script("nd_columns.py", "--rows", "4096", "--reps", "3", timeout=180)
    # the embeddings travel as one array: a few frames, not one per row
    assert rec["per_block"]["column"] == "tensor[float32,(384)]"
    assert rec["per_block"]["frames"] < 16
    assert rec["pipeline"]["rows_seen"] == 4096


def test_host_probe(tmp_path):
    rec = run_script(
        "host_probe.py",
        "--procs",
        "1",
        "--reps",
        "1",
        "--images",
        "4",
        "--texts",
        "8",
        tmp_path=tmp_path,
        timeout=200,
    )
    assert (
        rec["read_images_n1"]["ms_per_item_median"] > 0
        and rec["tokenize_n1"]["ms_per_item_median"] > 0
    )


def test_runner_tiny(tmp_path):
    out = tmp_path / "bench.md"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(BENCH, "run.py"),
            "--tiny",
            "--reps",
            "1",
            "--workloads",
            "W1",
            "--engines",
            "daskinfer,loop",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "<!-- results:start -->" in text and "daskinfer / loop" in text
    raw = [json.loads(ln) for ln in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert len(raw) == 3 and all(r["correct"] for r in raw)


@pytest.mark.parametrize("engine", ["daskinfer", "loop"])
def test_alltoall_verbs(engine):
    rec = run_script("alltoall_verbs.py", "--engine", engine, "--rows", "20000")
    assert rec["rows"] == 20000 and rec["sort_s"] > 0 and rec["groupby_count_s"] > 0
