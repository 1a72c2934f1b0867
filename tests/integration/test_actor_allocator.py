"""malloc in the worker processes that host predictors (daskinfer/_internal/allocator.py).

Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_`` set, which pins glibc's mmap
threshold at 128 KiB, so every buffer of a few MiB is a fresh ``mmap``. Actor workers raise
the threshold before the predictor is built. Observed from inside a predictor: how many
bytes malloc holds in mmapped blocks grows, or not, when it allocates 4 MiB.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import pytest

import daskinfer as di
from daskinfer._internal import allocator

PROBE_BYTES = 4 * 2**20

pytestmark = pytest.mark.skipif(
    allocator.mmapped_bytes() is None, reason="needs glibc >= 2.33 (mallinfo2)"
)


class AllocationProbe:
    """Reports how much malloc's mmapped bytes grew while a 4 MiB buffer was allocated.

    The counter is the whole process's: another thread (the worker's event loop) may
    map or unmap a block at the same moment. So each call tries five times and reports
    the least and the most growth seen: a fresh mmap shows in the most, a buffer from
    the heap as no growth in the least.
    """

    def __call__(self, batch):
        from daskinfer._internal import allocator

        growth = []
        for _ in range(5):
            before = allocator.mmapped_bytes()
            buffer = np.ones(PROBE_BYTES, dtype=np.uint8)
            growth.append(allocator.mmapped_bytes() - before)
            del buffer
        n = len(batch["x"])
        return {
            "x": batch["x"],
            "least_growth": np.full(n, min(growth)),
            "most_growth": np.full(n, max(growth)),
        }


def _probe(n_batches: int = 3) -> pd.DataFrame:
    ds = di.from_pandas(pd.DataFrame({"x": np.arange(30)}), npartitions=3).map_batches(
        AllocationProbe, compute=di.ActorPoolStrategy(size=1), batch_size=10
    )
    out = ds.to_pandas()
    assert len(out) == 30
    return out


@contextlib.contextmanager
def _own_cluster():
    """A one-worker cluster of the test's own, its client current: malloc settings stay
    for the life of a worker process, so the shared session cluster cannot show the
    "before"."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=40,
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
        client.as_current(),
    ):
        yield client


def test_actor_workers_serve_model_sized_buffers_from_the_heap(context):
    with _own_cluster() as client:
        env = client.run(lambda: __import__("os").environ.get("MALLOC_TRIM_THRESHOLD_"))
        assert set(env.values()) == {"65536"}, env  # Dask's nanny setting, which causes the mmaps

        # left alone, as Dask starts the worker: every 4 MiB buffer is its own mmap
        context.actor_keeps_freed_memory = False  # which would take no mmaps at all
        context.actor_mmap_threshold = None
        assert (_probe()["most_growth"] >= PROBE_BYTES).all()

        # the default: the actor's worker takes such buffers from the heap
        context.actor_mmap_threshold = di.DataContext().actor_mmap_threshold
        assert (_probe()["least_growth"] == 0).all()


def test_a_threshold_glibc_cannot_take_is_refused_before_work_starts(client, context, tmp_path):
    context.actor_mmap_threshold = "1 GiB"
    ds = di.from_pandas(pd.DataFrame({"x": np.arange(10)})).map_batches(
        AllocationProbe, compute=di.ActorPoolStrategy(size=1)
    )
    with pytest.raises(
        ValueError, match=r"actor_mmap_threshold='1 GiB'.*at most \"32 MiB\", or None"
    ):
        ds.write_parquet(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


class FaultProbe:
    """Reports the page faults of its thread in the third of three rounds of attention
    over 256 rows (scores of 50 MiB, softmax, product; six layers' worth), as a
    transformer's forward pass makes them: memory that went back to the OS when it was
    freed is faulted in again, page by page, in the next round."""

    def __call__(self, batch):
        import resource

        import torch

        torch.set_num_threads(1)
        x = torch.randn(256, 12, 64, 32)
        faults = []
        for _ in range(3):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            for _layer in range(6):
                scores = torch.softmax(x @ x.transpose(-1, -2), dim=-1)
                out = scores @ x
                del scores, out
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
        n = len(batch["x"])
        return {"x": batch["x"], "faults": np.full(n, faults[-1])}


def _fault_probe() -> pd.DataFrame:
    ds = di.from_pandas(pd.DataFrame({"x": np.arange(20)}), npartitions=2).map_batches(
        FaultProbe, compute=di.ActorPoolStrategy(size=1), batch_size=10
    )
    out = ds.to_pandas()
    assert len(out) == 20
    return out


def test_actor_workers_keep_freed_memory_for_the_predictors_next_calls(context):
    with _own_cluster():
        # left alone: freed tensors go back to the OS (measured: about 150,000 faults a
        # round, where a 50 MiB tensor is 12,800 pages)
        context.actor_keeps_freed_memory = False
        assert (_fault_probe()["faults"] >= 10_000).all()

        # the default: every call after the first reuses the memory freed before
        context.actor_keeps_freed_memory = di.DataContext().actor_keeps_freed_memory
        assert (_fault_probe()["faults"] < 1_000).all()


def test_a_keep_freed_memory_setting_that_is_not_a_bool_is_refused(client, context, tmp_path):
    context.actor_keeps_freed_memory = "yes"
    ds = di.from_pandas(pd.DataFrame({"x": np.arange(10)})).map_batches(
        FaultProbe, compute=di.ActorPoolStrategy(size=1)
    )
    with pytest.raises(TypeError, match=r"actor_keeps_freed_memory must be True or False.*'yes'"):
        ds.write_parquet(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
