"""Does the CPU stage keep a fast accelerator fed? W7's ResNet-50 shape, with sleeps for work.

A read stage of ``--readers`` one-thread CPU workers, each task taking ``--read-s`` and
yielding ``--rows-per-read`` rows of ``--row-bytes``, feeds a fake-GPU predictor whose calls
take ``--call-s`` for ``--batch-size`` rows. Sleeps stand in for the work, so that the
scheduling (backpressure, bundling, handoff) is what is measured, on any machine. The
ceiling is the slower of the two stages' capacities; the JSON line gives rows/s against it.

Shaped after W7 on the H200 (docs/benchmarks.md): 13 readers, 64 images of 147 KB in 236 ms
a task, predictor calls of 22 ms for 128 images. ``--row-bytes`` and ``--budget`` are scaled
down together (the default budget of 1 GiB held 112 of W7's 9 MB blocks).

    python benchmarks/feed_gap.py
    python benchmarks/feed_gap.py --row-bytes 147000 --budget "1 GiB"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as c
import numpy as np


def slow_read(batch, seconds, row_bytes):
    time.sleep(seconds)
    n = len(batch["id"])
    return {"id": batch["id"], "image": np.zeros((n, row_bytes), dtype=np.uint8)}


class FakeGpu:
    def __init__(self, seconds):
        self.seconds = seconds

    def __call__(self, batch):
        t0 = time.time()
        time.sleep(self.seconds)
        n = len(batch["id"])
        return {"id": batch["id"], "t0": np.full(n, t0), "t1": np.full(n, time.time())}


def main() -> None:
    import daskinfer as di

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--readers", type=int, default=13)
    p.add_argument("--reads", type=int, default=400)
    p.add_argument("--rows-per-read", type=int, default=64)
    p.add_argument("--read-s", type=float, default=0.236)
    p.add_argument("--row-bytes", type=int, default=16_000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--call-s", type=float, default=0.022)
    p.add_argument("--budget", default="110 MiB", help="DataContext.max_inflight_bytes")
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args()
    n = args.reads * args.rows_per_read
    read_cap = args.readers * args.rows_per_read / args.read_s
    call_cap = args.batch_size / args.call_s
    ctx = di.DataContext.get_current()
    ctx.max_inflight_bytes = args.budget
    ctx.enable_progress_bars = bool(os.environ.get("PROGRESS"))
    ctx.progress_interval_s = 1.0
    with c.dask_cluster(cpu_workers=args.readers, threads_per_worker=1, gpu_workers=1):
        for rep in range(args.reps):
            ds = (
                di.range(n, override_num_blocks=args.reads)
                .map_batches(
                    slow_read,
                    batch_size=None,
                    fn_kwargs={"seconds": args.read_s, "row_bytes": args.row_bytes},
                )
                .map_batches(
                    FakeGpu,
                    concurrency=1,
                    num_gpus=1,
                    batch_size=args.batch_size,
                    fn_constructor_kwargs={"seconds": args.call_s},
                )
            )
            t = time.perf_counter()
            out = ds.to_pandas()
            wall = time.perf_counter() - t
            calls = out.groupby("t0")["t1"].first()
            busy = float((calls - calls.index).sum()) / wall
            stats = ds.stats()
            ops = {o.name: o for o in stats.operators}
            print(
                json.dumps(
                    {
                        "rep": rep,
                        "rows": len(out),
                        "wall_s": round(wall, 2),
                        "rows_per_s": round(n / wall),
                        "ceiling_rows_per_s": round(min(read_cap, call_cap)),
                        "of_ceiling": round(n / wall / min(read_cap, call_cap), 3),
                        "predictor_busy": round(busy, 3),
                        "stages": {
                            k: {
                                "wait_input_s": round(o.wait_input_s, 2),
                                "blocked_output_s": round(o.blocked_output_s, 2),
                            }
                            for k, o in ops.items()
                        },
                        "peak_blocks": getattr(stats, "max_live_blocks", None),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
