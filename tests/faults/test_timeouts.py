"""map_batches(timeout_s=...): a hung batch restarts its worker and is tried again; after
max_retries, on_error decides. On a cluster of its own (workers get restarted)."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import pandas as pd
import pytest

import daskinfer as di

N = 2000


@pytest.fixture
def own_client():
    from distributed import Client, LocalCluster

    ctx = di.DataContext.get_current()
    saved = dataclasses.replace(ctx)
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=50,
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
        client.as_current(),
    ):
        yield client
    for field in dataclasses.fields(ctx):
        setattr(ctx, field.name, getattr(saved, field.name))


def _frame() -> pd.DataFrame:
    return pd.DataFrame({"id": np.arange(N, dtype="int64")})


def _hang_if(batch, marker: str, always: bool) -> None:
    """Hang on the batch holding id 100: once (a marker file remembers), or every time."""
    if (batch["id"] == 100).any() and (always or not os.path.exists(marker)):
        open(marker, "w").close()
        time.sleep(600)


class HangsOnce:
    def __init__(self, marker: str, always: bool = False):
        self.marker, self.always = marker, always

    def __call__(self, batch):
        _hang_if(batch, self.marker, self.always)
        return {"id": batch["id"], "y": batch["id"] * 2}


def hangs_once(batch, marker: str):
    _hang_if(batch, marker, False)
    return {"id": batch["id"], "y": batch["id"] * 2}


def test_a_hung_predictor_is_replaced_and_its_batch_retried(own_client, tmp_path):
    ds = di.from_pandas(_frame(), npartitions=4).map_batches(
        HangsOnce,
        concurrency=1,
        batch_size=50,
        timeout_s=2,
        fn_constructor_args=(str(tmp_path / "hung"),),
    )
    out = ds.to_pandas()
    assert out["id"].tolist() == list(range(N)) and (out["y"] == out["id"] * 2).all()
    pool = ds.stats().operators[-1]
    assert pool.timeouts == 1 and pool.actors_lost >= 1 and pool.actors_started >= 2
    assert "batches timed out 1" in str(ds.stats())


def test_a_hung_task_restarts_its_worker_and_runs_again(own_client, tmp_path):
    ds = di.from_pandas(_frame(), npartitions=4).map_batches(
        hangs_once, batch_size=50, timeout_s=2, fn_kwargs={"marker": str(tmp_path / "hung")}
    )
    out = ds.to_pandas()
    assert out["id"].tolist() == list(range(N))
    assert ds.stats().operators[-1].timeouts == 1


def test_a_batch_that_always_hangs_is_quarantined_after_max_retries(own_client, tmp_path):
    di.DataContext.get_current().max_retries = 1
    ds = di.from_pandas(_frame(), npartitions=4).map_batches(
        HangsOnce,
        concurrency=1,
        batch_size=50,
        timeout_s=1.5,
        on_error="quarantine",
        fn_constructor_args=(str(tmp_path / "hung"), True),
    )
    out = ds.to_pandas()
    bad = ds.stats().quarantined()
    assert 100 in bad["id"].tolist() and 100 not in out["id"].tolist()
    assert sorted(out["id"].tolist() + bad["id"].tolist()) == list(range(N))
    assert bad["_error"].str.contains("timeout_s=1.5").all()
    assert ds.stats().operators[-1].timeouts == 2


def test_a_batch_that_always_hangs_fails_the_job_by_default(own_client, tmp_path):
    di.DataContext.get_current().max_retries = 0
    ds = di.from_pandas(_frame(), npartitions=4).map_batches(
        HangsOnce,
        concurrency=1,
        batch_size=50,
        timeout_s=1.5,
        fn_constructor_args=(str(tmp_path / "hung"), True),
    )
    with pytest.raises(di.ExecutionTimeoutError, match=r"timeout_s=1\.5"):
        ds.to_pandas()


def test_bad_timeout_is_refused_at_the_call():
    with pytest.raises(di.PlanError, match="timeout_s=0"):
        di.range(10).map_batches(hangs_once, timeout_s=0)
