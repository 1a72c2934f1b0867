"""Where tasks may run on a cluster whose workers offer different resources.

A cluster like the benchmarks' and dask-cuda's: CPU workers offering ``CPU=1`` and an
accelerator worker offering ``GPU=1`` and no ``CPU``. A CPU task that Dask's work
stealing moved to the accelerator worker crashed that worker's state machine
(``KeyError: 'CPU'``); the worker restarted and the pipeline stalled 5 s while its
predictor was rebuilt (1 W2 run in about 40).
"""

from __future__ import annotations

import time

import pytest

import daskinfer as di


@pytest.fixture
def mixed_cluster():
    from distributed import Client, Nanny, Scheduler, SpecCluster

    worker = {"nthreads": 1, "host": "127.0.0.1", "silence_logs": 40}
    workers = {
        "cpu-0": {"cls": Nanny, "options": {**worker, "resources": {"CPU": 1}}},
        "cpu-1": {"cls": Nanny, "options": {**worker, "resources": {"CPU": 1}}},
        "gpu-0": {"cls": Nanny, "options": {**worker, "resources": {"GPU": 1}}},
    }
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard": False}}
    with (
        SpecCluster(workers=workers, scheduler=scheduler, silence_logs=40) as cluster,
        Client(cluster, set_as_default=False) as client,
        client.as_current(),
    ):
        client.wait_for_workers(3, timeout=60)
        yield client


def burn(batch):
    end = time.perf_counter() + 0.01
    while time.perf_counter() < end:
        pass
    return batch


class Sleeper:
    def __call__(self, batch):
        time.sleep(0.01)
        return batch


def _where_tasks_may_go(dask_scheduler):
    """For each daskinfer task waiting or running with resource restrictions: its
    restrictions, and the worker Dask's work stealing would move it to, if the only
    idle worker were the accelerator's."""
    stealing = dask_scheduler.extensions.get("stealing")
    gpu = [ws for ws in dask_scheduler.workers.values() if ws.resources.get("GPU")]
    out = []
    for ts in dask_scheduler.tasks.values():
        if not str(ts.key).startswith("daskinfer-") or not ts.resource_restrictions:
            continue
        if ts.state not in ("processing", "no-worker", "queued", "waiting"):
            continue
        thief = None
        if stealing is not None and hasattr(stealing, "_get_thief"):
            ws = stealing._get_thief(dask_scheduler, ts, set(gpu), occupancies={w: 0.0 for w in gpu})
            thief = ws.address if ws is not None else None
        out.append(
            {
                "key": str(ts.key),
                "resources": dict(ts.resource_restrictions),
                "loose": bool(ts.loose_restrictions),
                "thief": thief,
            }
        )
    return out


def test_cpu_tasks_can_never_be_moved_to_a_worker_without_their_resources(mixed_cluster):
    gpu_worker = next(a for a, w in mixed_cluster.scheduler_info()["workers"].items() if w["resources"].get("GPU"))
    ds = (
        di.range(200 * 64, override_num_blocks=200)
        .map_batches(burn, batch_size=64, num_cpus=1)
        .map_batches(Sleeper, concurrency=1, num_gpus=1, batch_size=64)
    )
    seen = []
    rows = 0
    for i, batch in enumerate(ds.iter_batches(batch_size=64)):
        rows += len(batch["id"])
        if i % 20 == 5:
            seen += mixed_cluster.run_on_scheduler(_where_tasks_may_go)
    assert rows == 200 * 64
    cpu_tasks = [t for t in seen if "CPU" in t["resources"]]
    assert cpu_tasks, "no CPU task was caught in flight; the check saw nothing"
    # a loose task with resources may be stolen by any worker (Dask's _get_thief)
    assert not [t for t in cpu_tasks if t["loose"]]
    assert not [t for t in cpu_tasks if t["thief"] == gpu_worker]
    # and the accelerator's worker never restarted: the same worker all along
    assert gpu_worker in mixed_cluster.scheduler_info()["workers"]
    assert ds.stats().operator("MapBatches(Sleeper)").actors_lost == 0
