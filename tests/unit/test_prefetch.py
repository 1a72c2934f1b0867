"""A predictor's ``prefetch_batch`` hook: every batch goes through it once, one batch ahead.

These run the transform directly (no cluster); the hook's overlap with a running call
on an accelerator's actor is tested on a real cluster in
tests/integration/test_deployment.py.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pandas as pd
import pytest

from daskinfer._internal.transforms import (
    BatchLimits,
    ErroredRows,
    MapBatchesTransform,
    StagedBatch,
)
from daskinfer._internal.worker_fns import CallTurns, PredictorThread
from daskinfer.exceptions import UserCodeError


class OutOfMemoryError(RuntimeError):
    """Named like torch's: daskinfer recognises it by name."""


class Recorder:
    """Doubles x; records the order of hook calls and predictor calls."""

    def __init__(self, oom_above=None, bad_value=None):
        self.events = []
        self.oom_above = oom_above
        self.bad_value = bad_value

    def prefetch_batch(self, batch):
        x = batch["x"]
        if self.bad_value is not None and (x == self.bad_value).any():
            raise ValueError(f"cannot stage {self.bad_value}")
        self.events.append(("stage", int(x[0]) if len(x) else None, len(x)))
        return {"staged_x": x.copy()}

    def __call__(self, batch):
        x = batch["staged_x"]  # only a staged batch has this key
        self.events.append(("call", int(x[0]) if len(x) else None, len(x)))
        if self.oom_above is not None and len(x) > self.oom_above:
            raise OutOfMemoryError(f"CUDA out of memory: {len(x)} rows")
        return {"x": x, "y": x * 2}


def transform(**kwargs):
    return MapBatchesTransform(
        stage="Predict",
        fn=Recorder,
        batch_size=kwargs.pop("batch_size", 4),
        batch_format="numpy",
        **kwargs,
    )


def block(n):
    return pd.DataFrame({"x": np.arange(n, dtype=np.int64)})


def test_each_batch_is_staged_once_and_the_next_one_before_the_current_call():
    pred = Recorder()
    out = transform().apply(block(10), pred)
    assert out["y"].tolist() == [2 * i for i in range(10)]
    assert pred.events == [
        ("stage", 4, 4),  # batch 1 staged before batch 0 runs...
        ("stage", 0, 4),  # ...which is staged in its turn (nothing staged it ahead)
        ("call", 0, 4),
        ("stage", 8, 2),
        ("call", 4, 4),
        ("call", 8, 2),
    ]


def test_a_first_batch_staged_ahead_is_used_and_not_staged_again():
    pred = Recorder()
    t = transform()
    prepared = t.prepare(block(6))
    staged = t.stage_first_batch(prepared, pred, BatchLimits())
    assert isinstance(staged, StagedBatch)
    assert (staged.start, staged.stop) == (0, 4)
    out = t.apply(None, pred, BatchLimits(), ErroredRows(), prepared, staged)
    assert out["y"].tolist() == [2 * i for i in range(6)]
    stages = [e for e in pred.events if e[0] == "stage"]
    assert stages == [("stage", 0, 4), ("stage", 4, 2)]


def test_first_batch_follows_the_size_learned_from_out_of_memory():
    pred = Recorder()
    staged = transform().stage_first_batch(
        transform().prepare(block(10)), pred, BatchLimits(max_rows=3)
    )
    assert (staged.start, staged.stop) == (0, 3)
    assert transform().stage_first_batch({"x": np.arange(3)}, object(), None) is None  # no hook


def test_out_of_memory_splits_a_staged_batch_and_stages_the_halves_again():
    pred = Recorder(oom_above=2)
    limits = BatchLimits()
    out = transform().apply(block(8), pred, limits)
    assert out["y"].tolist() == [2 * i for i in range(8)]
    assert limits.max_rows == 2
    calls = [e for e in pred.events if e[0] == "call"]
    # only the first batch was tried at 4 rows: it was split, and the rest of the
    # block went at the size learned (the second batch, staged at 4 rows before the
    # first ran out of memory, was dropped and staged again at 2)
    assert [e for e in calls if e[2] > 2] == [("call", 0, 4)]
    # every row reached the predictor once, in a staged batch of at most 2 rows
    done = sorted(first for kind, first, n in calls if n <= 2)
    assert done == [0, 2, 4, 6]
    assert sorted(e for e in pred.events if e[0] == "stage" and e[2] <= 2) == [
        ("stage", 0, 2),
        ("stage", 2, 2),
        ("stage", 4, 2),
        ("stage", 6, 2),
    ]


def test_after_out_of_memory_the_rest_of_the_block_goes_at_the_learned_size():
    class Plain:  # no prefetch hook
        def __init__(self):
            self.sizes = []

        def __call__(self, batch):
            self.sizes.append(len(batch["x"]))
            if len(batch["x"]) > 3:
                raise OutOfMemoryError("CUDA out of memory")
            return {"y": batch["x"] * 2}

    pred, limits = Plain(), BatchLimits()
    out = transform(batch_size=8).apply(block(30), pred, limits)
    assert out["y"].tolist() == [2 * i for i in range(30)]
    # 8 failed, then 4 failed: 3 rows a call from there on, never 8 again
    assert pred.sizes[:2] == [8, 4]
    assert all(size <= 3 for size in pred.sizes[2:])
    assert sum(pred.sizes[2:]) == 30
    assert limits.oom_splits == 2


def test_a_hook_error_is_raised_in_the_batch_s_own_turn_as_the_stage_s_error():
    pred = Recorder(bad_value=5)  # batch 1 (rows 4-7) cannot be staged
    with pytest.raises(UserCodeError, match="stage Predict failed: ValueError: cannot stage 5"):
        transform().apply(block(12), pred)
    # the failed look-ahead did not stop batch 0, which ran first
    assert ("call", 0, 4) in pred.events


def test_a_row_the_hook_fails_on_is_set_aside_like_any_bad_row():
    pred = Recorder(bad_value=5)
    errors = ErroredRows()
    out = transform(on_error="skip").apply(block(12), pred, None, errors)
    assert out["x"].tolist() == [i for i in range(12) if i != 5]
    assert errors.counts == {"Predict": 1}


def test_calls_run_in_arrival_order_back_to_back_with_one_queued_behind_the_running_one():
    turns = CallTurns()
    predictor = PredictorThread("test-predictor")
    log = []
    tickets = [turns.take() for _ in range(4)]

    def work(ticket):
        turns.started(ticket)
        log.append(("run", ticket))
        time.sleep(0.05)
        log.append(("end", ticket))

    def call(ticket):
        turns.wait_for_previous(ticket)
        log.append(("queued", ticket))
        predictor.submit(work, ticket).result()

    threads = [threading.Thread(target=call, args=(t,)) for t in reversed(tickets)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    predictor.close()
    assert [t for kind, t in log if kind == "run"] == [0, 1, 2, 3]
    for k in range(1, 4):
        # one call at a time...
        assert log.index(("end", k - 1)) < log.index(("run", k))
        # ...and the next in line was queued before the one ahead of it ended
        assert log.index(("queued", k)) < log.index(("end", k - 1))
    for k in range(2, 4):  # but not before the one ahead of it had started
        assert log.index(("queued", k)) > log.index(("end", k - 2))


def test_a_call_that_gives_up_before_its_turn_does_not_let_later_calls_overtake():
    turns = CallTurns()
    first, second, third = (turns.take() for _ in range(3))
    turns.give_up(second)  # the second failed while the first had not started yet
    ready = threading.Event()

    def third_call():
        turns.wait_for_previous(third)
        ready.set()

    th = threading.Thread(target=third_call)
    th.start()
    assert not ready.wait(0.2), "the third call was queued before the first had started"
    turns.started(first)
    assert ready.wait(5), "the third call never got its turn after the second gave up"
    th.join(5)


def _cpu_actor_host(monkeypatch, seceded):
    """A CPU actor's host, without a worker: only what ``PredictorHost.call`` uses."""
    from daskinfer._internal import worker_fns

    monkeypatch.setattr(
        worker_fns, "secede", lambda: seceded.append(threading.current_thread().name)
    )
    host = worker_fns.PredictorHost.__new__(worker_fns.PredictorHost)
    host.overlap_calls = False
    host.turns = CallTurns()
    host._arrivals = threading.Lock()
    host.in_progress = 0
    host.thread = PredictorThread("test-cpu-predictor")
    return host


def test_a_cpu_actor_call_keeps_its_thread_slot_on_an_idle_predictor_and_queues_when_busy(
    monkeypatch,
):
    seceded: list[str] = []
    host = _cpu_actor_host(monkeypatch, seceded)
    transform = MapBatchesTransform(
        stage="s", fn=lambda b: b, batch_size=None, batch_format="numpy"
    )
    log = []
    first_running = threading.Event()
    release_first = threading.Event()

    def work(name):
        def run(staged):
            assert staged is None  # staging ahead is for accelerators only
            log.append(("run", name, threading.current_thread().name))
            if name == "first":
                first_running.set()
                release_first.wait(10)
            log.append(("end", name))
            return name

        return run

    results = {}

    def call(name):
        results[name] = host.call(transform, None, work(name))

    first = threading.Thread(target=call, args=("first",), name="first")
    first.start()
    assert first_running.wait(10)
    later = [threading.Thread(target=call, args=(n,), name=n) for n in ("second", "third")]
    for th in later:
        th.start()
        time.sleep(0.05)  # arrive in this order
    time.sleep(0.1)
    assert seceded == ["second", "third"], "only calls that found the predictor busy leave"
    assert [e[1] for e in log] == ["first"], "a later call ran beside the first"
    release_first.set()
    for th in (first, *later):
        th.join(10)
    host.thread.close()
    assert results == {"first": "first", "second": "second", "third": "third"}
    assert [e[1] for e in log if e[0] == "run"] == ["first", "second", "third"]
    assert {e[2] for e in log if e[0] == "run"} == {"test-cpu-predictor"}
    assert host.in_progress == 0
    # the predictor idle again: the next call keeps its slot
    seceded.clear()
    host.thread = PredictorThread("test-cpu-predictor")
    assert host.call(transform, None, lambda staged: "again") == "again"
    host.thread.close()
    assert seceded == []
