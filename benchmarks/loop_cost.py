"""Cost of daskinfer's client loop and of the Dask scheduler, per task, in CPU time.

Starts `dask scheduler` and two `dask worker` processes (so the scheduler's CPU is its
own process's), runs pipelines of tiny one-batch tasks, and reports CPU microseconds per
task for the client process (daskinfer's loop, distributed's client) and the scheduler,
from psutil's process CPU times. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import psutil

import daskinfer as di


class Ident:
    def __call__(self, batch):
        return batch


def _ident(batch):
    return batch


def _slice(block, start, stop):
    return block.iloc[start:stop]


def _plain_dask(client, batches: int, window: int = 8) -> int:
    """The same one-batch identity tasks as a hand-written Dask loop: the floor.

    A block of 100 rows per 10 batches (as ``di.range`` makes them), one task per batch that
    slices its rows out of the block, ``window`` tasks in flight at once
    (kept full as tasks finish), every result released when done. Returns the tasks run.
    """
    import pandas as pd

    from distributed import as_completed

    blocks = client.scatter(
        [pd.DataFrame({"id": range(i * 100, (i + 1) * 100)}) for i in range(max(1, batches // 10))]
    )
    todo = [(blocks[b // 10], (b % 10) * 10, (b % 10) * 10 + 10) for b in range(batches)]
    todo.reverse()
    pending = as_completed(loop=client.loop)
    for _ in range(min(window, len(todo))):
        pending.add(client.submit(_slice, *todo.pop(), pure=False))
    done = 0
    for future in pending:  # results stay on the workers, as ``count()``'s do
        assert future.status == "finished", future.status
        done += 1
        future.release()
        if todo:
            pending.add(client.submit(_slice, *todo.pop(), pure=False))
    assert done == batches
    return batches


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=1000)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp()
    sched_file = os.path.join(tmp, "s.json")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                sched_file,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        while not (os.path.exists(sched_file) and os.path.getsize(sched_file)):
            time.sleep(0.1)
        with open(sched_file) as f:
            address = json.load(f)["address"]
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "distributed.cli.dask_worker",
                        address,
                        "--nthreads",
                        "1",
                        "--no-dashboard",
                        "--host",
                        "127.0.0.1",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        client = di.init(address)
        client.wait_for_workers(2, timeout=60)
        di.DataContext.get_current().target_task_bytes = 1  # one batch per task or call
        me, sched = psutil.Process(), psutil.Process(procs[0].pid)
        # each `dask worker` is a nanny whose child process runs the tasks
        workers = [c for p in procs[1:] for c in psutil.Process(p.pid).children(recursive=True)]

        def measure(run: Callable[[], int]) -> dict[str, float]:
            before = _cpu(me), _cpu(sched), sum(map(_cpu, workers)), time.perf_counter()
            tasks = run()
            after = _cpu(me), _cpu(sched), sum(map(_cpu, workers)), time.perf_counter()
            client_s, sched_s, workers_s, wall_s = (
                b - a for a, b in zip(before, after, strict=True)
            )
            return {
                "tasks": tasks,
                "client_cpu_us_per_task": round(1e6 * client_s / tasks, 1),
                "scheduler_cpu_us_per_task": round(1e6 * sched_s / tasks, 1),
                "workers_cpu_us_per_task": round(1e6 * workers_s / tasks, 1),
                "wall_ms_per_task": round(1e3 * wall_s / tasks, 3),
            }

        out: dict[str, Any] = {"workload": "loop_cost", "batches": args.batches}
        for label, build in {
            "task": lambda ds: ds.map_batches(_ident, batch_size=10),
            "actor_call": lambda ds: ds.map_batches(Ident, concurrency=2, batch_size=10),
        }.items():
            build(di.range(100, override_num_blocks=1)).count()  # warm
            ds = build(di.range(args.batches * 10, override_num_blocks=max(1, args.batches // 100)))

            def run(ds: di.Dataset = ds) -> int:
                assert ds.count() == args.batches * 10
                return ds._last_stats.tasks_submitted

            out[label] = measure(run)
        # the floor: the same tasks submitted by hand, without daskinfer
        _plain_dask(client, 100)  # warm
        out["plain_dask_task"] = measure(lambda: _plain_dask(client, args.batches))
        print(json.dumps(out))
    finally:
        di.shutdown()
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            p.wait(timeout=20)


if __name__ == "__main__":
    main()
