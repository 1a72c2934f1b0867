"""What a person (or a program) watching a run sees: stats(), progress, logs, snapshots,
and the out-of-memory back-off that stats() reports. All on the real session cluster."""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import pytest

import daskinfer as di
from daskinfer._internal.executor import PROGRESS_TOPIC
from daskinfer.metrics import RunStats

N = 2000


@pytest.fixture
def context(context, monkeypatch):
    """The shared ``context`` fixture, with the progress environment variable cleared."""
    monkeypatch.delenv("DASKINFER_PROGRESS", raising=False)
    return context


def _frame(n: int = N) -> pd.DataFrame:
    return pd.DataFrame({"x": np.arange(n, dtype="int64")})


def add_one(batch):
    return {"x": batch["x"] + 1}


class SlowPredictor:
    """Sleeps per row: the stage that limits the pipeline."""

    def __init__(self, seconds_per_row: float = 0.0005):
        self.seconds_per_row = seconds_per_row

    def __call__(self, batch):
        time.sleep(self.seconds_per_row * len(batch["x"]))
        return {"x": batch["x"] * 2}


def _pipeline(n: int = N, seconds_per_row: float = 0.0005) -> di.Dataset:
    return (
        di.from_pandas(_frame(n), npartitions=8)
        .map_batches(add_one, batch_size=100)
        .map_batches(
            SlowPredictor,
            compute=di.ActorPoolStrategy(size=2),
            batch_size=50,
            fn_constructor_args=(seconds_per_row,),
        )
    )


# ------------------------------------------------------------------------- stats()


def test_stats_fields_match_what_ran_and_name_the_bottleneck(client, context):
    ds = _pipeline()
    out = ds.to_pandas()
    assert out["x"].tolist() == [(i + 1) * 2 for i in range(N)]
    stats = ds.stats()
    assert isinstance(stats, RunStats)
    assert stats.state == "finished" and stats.rows_out == N and stats.wall_s > 0
    assert [op.kind for op in stats.operators] == ["source", "tasks", "actors"]
    source, tasks, pool = stats.operators
    assert source.rows_out == N and source.tasks == 8
    assert tasks.rows_in == N and tasks.rows_out == N and tasks.tasks >= N // 1000
    assert pool.rows_in == N and pool.rows_out == N
    assert pool.blocks_in == tasks.blocks_out and pool.bytes_in == tasks.bytes_out
    assert pool.actors_started == 2 and pool.slots == 2
    # time in the predictor is measured on the workers: at least its sleeps
    assert pool.compute_s >= 0.9 * N * 0.0005
    assert 0 < tasks.compute_s < pool.compute_s
    assert pool.latency_buckets()[-1][1] == pool.tasks and pool.latency_sum_s > 0
    found = stats.bottleneck()
    assert found is not None and found[0] is pool
    text = str(stats)
    assert f"{N} rows out" in text and "bottleneck: MapBatches(SlowPredictor)" in text
    assert "time in code" in text and "waiting for input" in text


def test_backpressure_and_starvation_are_measured(client, context):
    # a slow consumer: the last stage finishes its work early and then is held back
    # (blocked on output) while the consumer takes one batch every 50 ms (2 s in all, so
    # that the consumer, not a slow CI machine's task overhead, sets the pace: at 20 ms
    # the margin was too thin there). One batch per task, so that the 40 output blocks
    # are more than the consumer's queue holds, and (with target_task_bytes at 1 byte)
    # more bytes than outputs may add up to before the stage is held back
    context.target_task_s = 1e-9
    context.target_task_bytes = 1
    ds = di.from_pandas(_frame(20_000), npartitions=40).map_batches(add_one, batch_size=500)
    for _ in ds.iter_batches(batch_size=500, prefetch_batches=0):
        time.sleep(0.05)
    source, tasks = ds.stats().operators
    assert tasks.blocked_output_s + source.blocked_output_s > 0.3
    assert tasks.busy_fraction() < 0.5
    found = ds.stats().bottleneck()
    assert (
        found is not None
        and "limited by scheduling overhead, data transfer or the consumer" in found[1]
    )


def test_small_outputs_waiting_for_a_slow_consumer_do_not_hold_the_stage_back(client, context):
    # outputs wait for the consumer up to its prefetch plus 8 blocks, and beyond while
    # they add up to under target_task_bytes: by count alone, 100 blocks of 400 bytes
    # stopped at about 17 waiting (W6's actors stood idle at times while the client
    # fetched one-batch outputs)
    context.target_task_s = 1e-9  # one batch per task: many small output blocks
    ds = di.range(100 * 50, override_num_blocks=100).map_batches(
        lambda batch: {"id": batch["id"] + 1}, batch_size=50
    )
    it = ds.iter_batches(batch_size=50, prefetch_batches=0)
    first = next(it)
    deadline = time.monotonic() + 30
    while ds.stats().operators[-1].blocks_out < 100 and time.monotonic() < deadline:
        time.sleep(0.05)  # the consumer takes nothing more meanwhile
    produced = ds.stats().operators[-1].blocks_out
    rest = [batch["id"] for batch in it]
    assert produced == 100, f"the stage stopped at {produced} of 100 small blocks"
    assert np.concatenate([first["id"], *rest]).tolist() == [i + 1 for i in range(5000)]


def test_a_slow_stage_starves_the_one_after_it(client, context):
    # a slow CPU stage feeding a pool of 2 cheap actors: the pool waits for input. 40
    # batches of 0.1 s on 2 slots: about 2 s, of which this machine's pool waited 0.86-1.26
    # s. At 0.05 s per batch it waited 0.42-0.97 s here and 0.29 s on a slower CI machine:
    # the actors' start and each call's round trip come off the wait, and the margin was
    # too thin
    def slow(batch):
        time.sleep(0.1)
        return batch

    ds = (
        di.from_pandas(_frame(4000), npartitions=8)
        .map_batches(slow, batch_size=100)
        .map_batches(
            SlowPredictor,
            compute=di.ActorPoolStrategy(size=2),
            batch_size=100,
            fn_constructor_args=(0.0,),
        )
    )
    ds.count()
    _, tasks, pool = ds.stats().operators
    assert pool.wait_input_s > 0.3
    assert ds.stats().bottleneck()[0] is tasks


def test_stats_are_live_while_running(client, context):
    ds = _pipeline(n=2000, seconds_per_row=0.001)
    it = ds.iter_batches(batch_size=100)
    next(it)
    live = ds.stats()
    assert live.state == "running" and live.elapsed_s() > 0
    for _ in it:
        pass
    assert ds.stats().state == "finished"


def test_snapshots_reach_the_scheduler_as_events(client, context):
    ds = _pipeline(n=1000)
    ds.count()
    run_id = ds.stats().run_id
    snaps = [m for _, m in client.get_events(PROGRESS_TOPIC) if m.get("run") == run_id]
    assert snaps, "no progress snapshot was published"
    final = snaps[-1]
    assert final["state"] == "finished" and final["rows_out"] == 1000
    assert [s["name"] for s in final["stages"]] == [op.name for op in ds.stats().operators]
    pool = final["stages"][-1]
    assert pool["kind"] == "actors" and pool["rows_done"] == 1000
    assert pool["latency_buckets"][-1][1] == pool["batches_done"]
    assert final["bottleneck"]["stage"] == "MapBatches(SlowPredictor)"


# ------------------------------------------------------------------------- progress


def test_non_interactive_progress_is_periodic_summary_lines(client, context, capsys):
    context.progress_interval_s = 0.2
    ds = _pipeline(n=2000, seconds_per_row=0.001)  # about 1 s on two actors
    ds.count()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("daskinfer ")]
    assert len(lines) >= 2, lines
    assert all("MapBatches(SlowPredictor)" in ln for ln in lines)
    assert "[finished" in lines[-1] and "MapBatches(SlowPredictor) 2000 rows" in lines[-1]


def test_short_runs_stay_quiet_and_disabled_progress_prints_nothing(
    client, context, capsys, monkeypatch
):
    context.progress_interval_s = 0.1
    context.enable_progress_bars = False
    _pipeline(n=2000, seconds_per_row=0.001).count()
    assert "daskinfer " not in capsys.readouterr().err
    context.enable_progress_bars = True
    monkeypatch.setenv("DASKINFER_PROGRESS", "0")
    _pipeline(n=2000, seconds_per_row=0.001).count()
    assert "daskinfer " not in capsys.readouterr().err
    monkeypatch.delenv("DASKINFER_PROGRESS")
    context.progress_interval_s = 60
    _pipeline(n=200).count()  # shorter than one interval: no line at all
    assert "daskinfer " not in capsys.readouterr().err


def test_progress_bars_when_asked(client, context, capsys, monkeypatch):
    monkeypatch.setenv("DASKINFER_PROGRESS", "bars")
    _pipeline(n=1000).count()
    err = capsys.readouterr().err
    assert "MapBatches(SlowPredictor)" in err and "actors=" in err
    assert "1000/1000" in err  # the source knows its rows: its bar has a total
    assert "1000 rows" in err  # the stages after it count rows without one


# ------------------------------------------------------------------------- logs


def test_info_logs_say_what_happened_without_a_line_per_batch(client, context, caplog):
    with caplog.at_level(logging.INFO, logger="daskinfer"):
        ds = _pipeline(n=2000)
        ds.count()
    messages = [r.getMessage() for r in caplog.records if r.name == "daskinfer"]
    finished = [m for m in messages if " finished: " in m]
    assert any(m.startswith("MapBatches(SlowPredictor) finished: 2000 rows") for m in finished)
    assert any("run " in m and "finished: 2000 rows out" in m for m in messages)
    batches = sum(op.tasks for op in ds.stats().operators)
    assert len(messages) < 15 < batches  # figures per stage, never per batch


# ------------------------------------------------------------------------- OOM back-off


class RaisesOOMAbove:
    """Raises torch's out-of-memory error on batches larger than ``limit`` rows."""

    def __init__(self, limit: int):
        self.limit = limit
        self.sizes: list[int] = []

    def __call__(self, batch):
        import torch

        n = len(batch["x"])
        self.sizes.append(n)
        if n > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory: a batch of {n} rows")
        return {"x": batch["x"] * 3, "calls": np.full(n, len(self.sizes))}


@pytest.mark.parametrize("batch_size", ["auto", 256])
def test_out_of_memory_splits_the_batch_and_remembers_the_size(client, context, batch_size):
    ds = di.from_pandas(_frame(3000), npartitions=3).map_batches(
        RaisesOOMAbove,
        compute=di.ActorPoolStrategy(size=1),
        batch_size=batch_size,
        fn_constructor_args=(100,),
    )
    out = ds.to_pandas()
    assert out["x"].tolist() == [i * 3 for i in range(3000)]  # every row, in order
    pool = ds.stats().operators[-1]
    assert pool.oom_splits >= 1
    # the size is remembered: splits happen while the actor learns, then never again.
    # Halving from 256 (or a 1000-row block) settles at <= 100 rows in a few splits;
    # re-learning on every call would cost several splits per call instead.
    assert pool.oom_splits <= 4
    assert "out-of-memory splits" in str(ds.stats())


def test_out_of_memory_on_a_single_row_fails_with_the_error(client, context):
    ds = di.from_pandas(_frame(10), npartitions=1).map_batches(
        RaisesOOMAbove, compute=di.ActorPoolStrategy(size=1), batch_size=4, fn_constructor_args=(0,)
    )
    with pytest.raises(di.UserCodeError, match="out of memory"):
        ds.to_pandas()


def test_a_user_error_is_not_mistaken_for_out_of_memory(client, context):
    def boom(batch):
        raise ValueError("not memory")

    class Boom:
        def __call__(self, batch):
            raise ValueError("not memory")

    ds = di.from_pandas(_frame(100), npartitions=1).map_batches(
        Boom, compute=di.ActorPoolStrategy(size=1), batch_size=50
    )
    with pytest.raises(di.UserCodeError, match="not memory"):
        ds.to_pandas()
    assert ds.stats().operators[-1].oom_splits == 0


# ------------------------------------------------------------------------- predictor counters


class CountsTokens:
    """Reports padding counters the way the ready text predictors do."""

    def __init__(self):
        self.pending = {"tokens_real": 0.0, "tokens_padded": 0.0, "tokens_padded_in_order": 0.0}

    def __call__(self, batch):
        n = len(batch["x"])
        self.pending["tokens_real"] += 10 * n
        self.pending["tokens_padded"] += 12 * n
        self.pending["tokens_padded_in_order"] += 20 * n
        return batch

    def daskinfer_metrics(self):
        out, self.pending = self.pending, dict.fromkeys(self.pending, 0.0)
        return out


def test_predictor_counters_are_summed_into_stats(client, context):
    ds = di.from_pandas(_frame(1000), npartitions=4).map_batches(
        CountsTokens, compute=di.ActorPoolStrategy(size=2), batch_size=64
    )
    assert ds.count() == 1000
    pool = ds.stats().operators[-1]
    assert pool.counters["tokens_real"] == 10_000
    assert pool.padding_waste == pytest.approx((2.0, 1.2))
    assert "padded/real tokens 2.00 in input order -> 1.20" in str(ds.stats())
