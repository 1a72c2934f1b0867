"""Worker loss on a real multi-process cluster: the pool is supervised, rows arrive once."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest

import daskinfer as di


class SleepyPredictor:
    """Its first call takes 3 s (a warm-up), later ones 20 ms.

    With ``started_dir``, the first call leaves a file named after its process there.
    """

    def __init__(self, started_dir=None):
        self.pid = os.getpid()
        self.calls = 0
        self.started_dir = started_dir

    def __call__(self, batch):
        self.calls += 1
        if self.calls == 1 and self.started_dir is not None:
            open(os.path.join(self.started_dir, str(self.pid)), "w").close()
        time.sleep(3.0 if self.calls == 1 else 0.02)
        return {"x": batch["x"], "pid": np.full(len(batch["x"]), self.pid)}


@pytest.fixture
def own_cluster():
    """A cluster of its own: this test kills one of its workers (the nanny restarts it)."""
    from distributed import Client, LocalCluster

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


def test_pool_survives_sigkill_of_an_actor_worker(own_cluster, tmp_path):
    """The victim dies with calls running and queued, before it finished any.

    (Outputs an actor had already finished, held only by the dead worker, are rebuilt
    on the replacement's worker: tests/faults/test_seeded_worker_kills.py kills at
    random moments.)
    """
    n = 200 * 64
    ds = di.from_pandas(pd.DataFrame({"x": np.arange(n)}), npartitions=8).map_batches(
        SleepyPredictor,
        concurrency=2,
        batch_size=64,
        fn_constructor_kwargs={"started_dir": str(tmp_path)},
    )
    victim_pid = {}

    def kill_one_actor_worker():
        # the first actor to start a call dies during it (the call lasts 3 s), with more
        # calls queued behind it: not at a fixed time, which a slow start-up can precede
        deadline = time.monotonic() + 60
        while not any(tmp_path.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.01)
        started = sorted(tmp_path.iterdir(), key=lambda p: p.stat().st_mtime)
        victim_pid["pid"] = int(started[0].name)
        os.kill(victim_pid["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_one_actor_worker)
    killer.start()
    out = ds.to_pandas()
    killer.join()
    # every row exactly once, in order
    assert out["x"].tolist() == list(range(n))
    pool = ds._last_stats.operators[-1]
    assert victim_pid["pid"] not in set(out["pid"])
    assert pool.actors_lost >= 1 and pool.retries >= 1, pool
    assert pool.actors_started >= 3  # two at the start, at least one replacement
