"""A launch-bound predictor (400 tiny torch ops per call, like a GPU model's kernel launches)
on a fake-GPU worker, fed batches of ``nbytes`` from a CPU stage: its own time per call in the
pipeline against alone. ``SI=<seconds>`` sets the GPU worker's switch interval and
``NO_OVERLAP=1`` turns off preparing the next call meanwhile.

    python benchmarks/launch_bound.py 19000000 128   # ResNet-like: 19 MB in 128 rows a call
    python benchmarks/launch_bound.py 262144 1024    # MiniLM-like: 1024 rows of 256 bytes
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as c
import numpy as np

OPS = 400


class Launchy:
    def __init__(self):
        import torch

        torch.set_num_threads(1)
        self.x = torch.zeros(16)

    def __call__(self, batch):
        t = time.perf_counter()
        y = self.x
        for _ in range(OPS):
            y = y + 1
        dt = time.perf_counter() - t
        n = len(batch["id"])
        return {"id": batch["id"], "call_s": np.full(n, dt)}


def direct_rate(seconds=1.0):
    p = Launchy()
    b = {"id": np.arange(10)}
    n = 0
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        p(b)
        n += 1
    return n / (time.perf_counter() - t)


def payload(batch, nbytes):
    n = len(batch["id"])
    return {"id": batch["id"], "blob": np.zeros((n, nbytes // max(n, 1)), dtype=np.uint8)}


if __name__ == "__main__":
    import daskinfer as di
    from daskinfer.cluster import worker_inventory

    nbytes = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    print("direct calls/s", round(direct_rate()), flush=True)
    with c.dask_cluster(cpu_workers=1, threads_per_worker=1, gpu_workers=1) as client:
        print(
            "in worker calls/s",
            round(client.submit(direct_rate, resources={"GPU": 1}, pure=False).result()),
        )
        si = float(os.environ.get("SI", "0"))
        if si:
            gpu = [a for a, w in worker_inventory(client).items() if w["resources"].get("GPU")]
            client.run(sys.setswitchinterval, si, workers=gpu)
        if os.environ.get("NO_OVERLAP"):
            import daskinfer._internal.worker_fns as wf

            def off():
                wf.PredictorHost.overlap_calls = property(lambda self: False, lambda self, v: None)

            client.run(off)
        depth = int(os.environ.get("DEPTH", "0"))
        if depth:
            di.DataContext.get_current().max_tasks_in_flight_per_actor = depth
        ds = (
            di.range(200 * rows, override_num_blocks=100)
            .map_batches(payload, batch_size=rows // 2, fn_kwargs={"nbytes": nbytes // 2})
            .map_batches(Launchy, concurrency=1, num_gpus=1, batch_size=rows)
        )
        t = time.perf_counter()
        out = ds.to_pandas()
        wall = time.perf_counter() - t
        calls = out.groupby(out["id"] // rows)["call_s"].first()
        print(
            json.dumps(
                {
                    "nbytes": nbytes,
                    "rows": rows,
                    "wall": round(wall, 2),
                    "calls": len(calls),
                    "median_call_ms": round(calls.median() * 1000, 2),
                    "mean_call_ms": round(calls.mean() * 1000, 2),
                    "p90_ms": round(calls.quantile(0.9) * 1000, 2),
                    "direct_call_ms": round(1000 / direct_rate(), 2),
                }
            )
        )
