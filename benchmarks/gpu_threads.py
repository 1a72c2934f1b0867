"""What the GPU worker's threads do while W7 runs (accelerator machine): one JSON line per model.

W7's predictor calls ran 4-6x slower inside the pipeline than alone in the same worker
(docs/benchmarks.md). This runs W7's two pipelines on W7's cluster and, in the GPU worker
process, (1) reads every thread's CPU time and context switches from /proc before and after,
and (2) samples every thread's Python stack every 5 ms: which threads ran beside the
predictor, and what they ran. The predictor's calls report their own wall and CPU time.

    python benchmarks/gpu_threads.py --images 16384 --texts 250000 --workers 13
    python benchmarks/gpu_threads.py --device cpu --images 64 --texts 512 --batch-size 16 --workers 1
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as c


def _group(name: str) -> str:
    return re.sub(r"[-_]?\d+", "", name) or name


def _thread_cpu() -> dict[int, tuple[str, float, int, int]]:
    """tid -> (thread name, CPU seconds, voluntary, involuntary context switches)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
            with open(f"/proc/self/task/{tid}/status") as f:
                status = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        vol = int(re.search(r"\bvoluntary_ctxt_switches:\s+(\d+)", status).group(1))
        invol = int(re.search(r"nonvoluntary_ctxt_switches:\s+(\d+)", status).group(1))
        out[int(tid)] = (
            names.get(int(tid), "native:" + comm),
            (int(fields[11]) + int(fields[12])) / tick,
            vol,
            invol,
        )
    return out


class Probe:
    """Samples the process's threads: stacks every ``period_s``, CPU times every 10 periods."""

    def __init__(self, period_s: float = 0.005) -> None:
        self.period_s = period_s
        self.first = _thread_cpu()
        self.last = dict(self.first)
        self.stacks: collections.Counter = collections.Counter()
        self.samples = 0
        self.started = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="probe", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        me = threading.get_ident()
        names = {}
        n = 0
        while not self._stop.wait(self.period_s):
            if n % 20 == 0:
                names = {t.ident: t.name for t in threading.enumerate()}
            if n % 10 == 0:
                self.last.update(_thread_cpu())
            n += 1
            self.samples += 1
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                parts = []
                f = frame
                while f is not None and len(parts) < 3:
                    parts.append(
                        f"{os.path.basename(f.f_code.co_filename)}:{f.f_code.co_name}:{f.f_lineno}"
                    )
                    f = f.f_back
                self.stacks[(_group(names.get(ident, "?")), " < ".join(parts))] += 1

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self.last.update(_thread_cpu())
        wall = time.perf_counter() - self.started
        by_group: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0, 0, 0])
        for tid, (name, cpu, vol, invol) in self.last.items():
            _, cpu0, vol0, invol0 = self.first.get(tid, (name, 0.0, 0, 0))
            g = by_group[_group(name)]
            g[0] += cpu - cpu0
            g[1] += vol - vol0
            g[2] += invol - invol0
            g[3] += 1
        top = [
            {"thread": g, "stack": s, "share": round(k / max(1, self.samples), 3)}
            for (g, s), k in self.stacks.most_common(40)
        ]
        return {
            "wall_s": round(wall, 2),
            "cores_allowed": len(os.sched_getaffinity(0)),
            "loadavg": os.getloadavg(),
            "samples": self.samples,
            "threads": {
                g: {
                    "cpu_s": round(v[0], 2),
                    "voluntary_switches": v[1],
                    "involuntary_switches": v[2],
                    "threads": v[3],
                }
                for g, v in sorted(by_group.items(), key=lambda kv: -kv[1][0])
            },
            "top_stacks": top,
        }


def start_probe(dask_worker) -> None:
    dask_worker._daskinfer_probe = Probe()


def stop_probe(dask_worker) -> dict:
    return dask_worker._daskinfer_probe.stop()


def main() -> None:
    import w7_gpu

    from daskinfer.cluster import worker_inventory

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--images", type=int, default=16384)
    p.add_argument("--image-side", type=int, default=256)
    p.add_argument("--texts", type=int, default=250_000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--text-batch-size", type=int, default=512)
    p.add_argument("--workers", type=int, default=13)
    p.add_argument("--models", default="resnet50,minilm")
    p.add_argument("--no-prefetch", action="store_true")
    args = p.parse_args()
    args.half = False
    path, weights = c.minilm_path()
    with c.dask_cluster(cpu_workers=args.workers, threads_per_worker=1, gpu_workers=1) as client:
        gpu = [a for a, w in worker_inventory(client).items() if w["resources"].get("GPU")]
        for model in args.models.split(","):
            client.run(start_probe, workers=gpu)
            res = w7_gpu._pipeline(args, model, path, weights)
            probe = client.run(stop_probe, workers=gpu)[gpu[0]]
            res.pop("stats", None)
            print(json.dumps({"model": model, **res, "gpu_worker": probe}), flush=True)


if __name__ == "__main__":
    main()
