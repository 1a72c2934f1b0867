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

import psutil

import daskinfer as di


class Ident:
    def __call__(self, batch):
        return batch


def _ident(batch):
    return batch


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
        out = {"workload": "loop_cost", "batches": args.batches}
        for label, build in {
            "task": lambda ds: ds.map_batches(_ident, batch_size=10),
            "actor_call": lambda ds: ds.map_batches(Ident, concurrency=2, batch_size=10),
        }.items():
            build(di.range(100, override_num_blocks=1)).count()  # warm
            ds = build(di.range(args.batches * 10, override_num_blocks=max(1, args.batches // 100)))
            c0, s0, w0 = _cpu(me), _cpu(sched), time.perf_counter()
            assert ds.count() == args.batches * 10
            c1, s1, w1 = _cpu(me), _cpu(sched), time.perf_counter()
            tasks = ds._last_stats.tasks_submitted
            out[label] = {
                "tasks": tasks,
                "client_cpu_us_per_task": round(1e6 * (c1 - c0) / tasks, 1),
                "scheduler_cpu_us_per_task": round(1e6 * (s1 - s0) / tasks, 1),
                "wall_ms_per_task": round(1e3 * (w1 - w0) / tasks, 3),
            }
        print(json.dumps(out))
    finally:
        di.shutdown()
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            p.wait(timeout=20)


if __name__ == "__main__":
    main()
