"""Per-batch cost of the substrate through daskinfer: tasks vs actor-pool calls.

Runs N tiny batches (one task or one actor call each) and reports milliseconds per batch,
wall time divided by batches, on the embedded-style LocalCluster (2 processes x 1 thread).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import daskinfer as di


class Identity:
    def __call__(self, batch):
        return batch


def _identity(batch):
    return batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=None,
        resources={"CPU": 1},
    )
    client = Client(cluster)
    ctx = di.DataContext.get_current()
    ctx.target_task_bytes = 1  # one batch per task, to expose the per-task cost
    rows = args.batches * 10
    results = {}
    for label, build in {
        "task": lambda ds: ds.map_batches(_identity, batch_size=10),
        "actor": lambda ds: ds.map_batches(Identity, concurrency=2, batch_size=10),
    }.items():
        times = []
        for _ in range(args.repeats):
            ds = build(di.range(rows, override_num_blocks=4))
            start = time.perf_counter()
            assert ds.count() == rows
            times.append(time.perf_counter() - start)
        results[label] = {
            "ms_per_batch_median": round(1000 * statistics.median(times) / args.batches, 3),
            "ms_per_batch_min": round(1000 * min(times) / args.batches, 3),
            "ms_per_batch_max": round(1000 * max(times) / args.batches, 3),
        }
    print(json.dumps({"workload": "overhead", "batches": args.batches, **results}))
    client.close()
    cluster.close()


if __name__ == "__main__":
    main()
