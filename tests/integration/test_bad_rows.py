"""Bad rows: on_error="skip"/"quarantine" isolates failing rows by bisection, keeps the
others, writes the quarantined ones to a dead-letter file, and max_errored_rows stops a job
whose data or code is broken. On the real session cluster."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import daskinfer as di


def _frame(n: int) -> pd.DataFrame:
    return pd.DataFrame({"x": np.arange(n, dtype="int64")})


def poisoned(batch):
    """Fails on any batch holding a row whose x is a multiple of 97 (about 1%)."""
    bad = batch["x"] % 97 == 0
    if bad.any():
        raise ValueError(f"poisoned row x={int(batch['x'][bad][0])}")
    return {"x": batch["x"], "y": batch["x"] * 2}


class PoisonedPredictor:
    def __call__(self, batch):
        return poisoned(batch)


@pytest.mark.parametrize("pool", [False, True], ids=["tasks", "actors"])
def test_quarantine_isolates_exactly_the_poisoned_rows(client, context, tmp_path, pool):
    n = 5000
    fn = PoisonedPredictor if pool else poisoned
    kwargs = {"compute": di.ActorPoolStrategy(size=2)} if pool else {}
    ds = di.from_pandas(_frame(n), npartitions=5).map_batches(
        fn, batch_size=128, on_error="quarantine", **kwargs
    )
    paths = ds.write_parquet(str(tmp_path / "out"))
    out = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    poisoned_ids = [i for i in range(n) if i % 97 == 0]
    good = [i for i in range(n) if i % 97]
    assert out["x"].tolist() == good and (out["y"] == out["x"] * 2).all()
    # readers of the output do not see the dead letters
    assert sorted(pd.read_parquet(str(tmp_path / "out"))["x"].tolist()) == good
    dead = pd.read_parquet(next((tmp_path / "out" / "_errors").glob("quarantine-*.parquet")))
    assert sorted(dead["x"].tolist()) == poisoned_ids
    assert all(
        e == f"ValueError: poisoned row x={x}"
        for x, e in zip(dead["x"], dead["_error"], strict=True)
    )
    assert dead["_traceback"].str.contains("in poisoned").all()
    assert set(dead["_stage"]) == {f"MapBatches({fn.__name__})"}
    stats = ds.stats()
    assert sum(op.quarantined_rows for op in stats.operators) == len(poisoned_ids)
    assert len(stats.quarantined()) == len(poisoned_ids)


def test_quarantine_to_an_explicit_errors_path_and_skip(client, context, tmp_path):
    ds = di.from_pandas(_frame(1000), npartitions=2).map_batches(
        poisoned, batch_size=100, on_error="quarantine"
    )
    ds.write_parquet(str(tmp_path / "out"), errors_path=str(tmp_path / "dead"))
    dead = pd.read_parquet(str(tmp_path / "dead"))
    assert sorted(dead["x"].tolist()) == [i for i in range(1000) if i % 97 == 0]
    skipped = di.from_pandas(_frame(1000), npartitions=2).map_batches(
        poisoned, batch_size=100, on_error="skip"
    )
    out = skipped.to_pandas()
    assert out["x"].tolist() == [i for i in range(1000) if i % 97]
    assert (
        skipped.stats().operators[-1].quarantined_rows == 11 and skipped.stats().quarantined().empty
    )


@pytest.mark.parametrize("limit", [5, 0.005])
def test_max_errored_rows_fails_the_job_and_writes_nothing(client, context, tmp_path, limit):
    ds = di.from_pandas(_frame(5000), npartitions=5).map_batches(
        poisoned, batch_size=128, on_error="quarantine", max_errored_rows=limit
    )
    with pytest.raises(di.UserCodeError, match="max_errored_rows"):
        ds.write_parquet(str(tmp_path / "out"))
    assert not list((tmp_path / "out").rglob("*.parquet"))


def test_bad_on_error_arguments_are_refused_at_the_call():
    ds = di.from_pandas(_frame(10), npartitions=1)
    with pytest.raises(di.PlanError, match="on_error='ignore'"):
        ds.map_batches(poisoned, on_error="ignore")
    with pytest.raises(di.PlanError, match="max_errored_rows=-1"):
        ds.map_batches(poisoned, on_error="skip", max_errored_rows=-1)
    with pytest.raises(di.PlanError, match=r"max_errored_rows=2\.5"):
        ds.map_batches(poisoned, on_error="skip", max_errored_rows=2.5)
    with pytest.raises(di.PlanError, match='on_error="skip" or "quarantine"'):
        ds.map_batches(poisoned, max_errored_rows=3)
