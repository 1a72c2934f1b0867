"""Where W6's wall goes at one pool size: each actor's first and last call, its gaps, the tail.

W6's shape (400 batches of 1024 rows from 40 blocks, a predictor sleeping 50 ms a batch,
2 workers with enough threads for the pool) on one cluster; ``--reps`` runs of each pool
size in ``--pools``, in turn, after an untimed 2-batch warm-up. The predictor stamps every
batch with its start and end (wall clock), so the consumer sees per actor: when the pool
was built and its first call started, the gaps between calls (small: within a call; big,
5 ms or more: waiting for the next call), how far the sleeps overran, when its last call
ended, and the spread between the first and the last actor to finish. The CPU seconds of
the client process (with the scheduler) and of each worker process over each run are
given beside them. One JSON line per run; ``--stamps`` keeps every batch's stamps too.

    python benchmarks/w6_trace.py --pools 8 --reps 8
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as c
import numpy as np

_BIG_GAP_S = 0.005


class StampingSleeper:
    def __init__(self, ms):
        self.ms = ms
        # one number per actor (a float column): the worker's pid with a random part.
        # id(self) % 1000 in its place gave two actors of one process the same number
        # now and then, and their batches counted as one actor's
        self.actor = float(os.getpid() * 10**6 + uuid.uuid4().int % 10**6)
        self.built = time.time()

    def __call__(self, batch):
        t0 = time.time()
        time.sleep(self.ms / 1000.0)
        t1 = time.time()
        n = len(batch["id"])
        return {
            "id": batch["id"],
            "actor": np.full(n, self.actor),
            "built": np.full(n, self.built),
            "t0": np.full(n, t0),
            "t1": np.full(n, t1),
        }


def _cpu_seconds(processes) -> dict[str, float]:
    out = {}
    for name, proc in processes.items():
        with contextlib.suppress(Exception):  # a process that ended counts nothing more
            times = proc.cpu_times()
            out[name] = times.user + times.system
    return out


def _summary(size, wall, calls, sleep_s, cpu) -> dict:
    by_actor: dict[float, list[tuple[float, float, float]]] = {}
    for actor, built, t0, t1 in calls:
        by_actor.setdefault(actor, []).append((t0, t1, built))
    small = big = overrun = 0.0
    n_big = 0
    firsts, lasts, builds = [], [], []
    for spans in by_actor.values():
        spans.sort()
        builds.append(spans[0][2])
        firsts.append(spans[0][0])
        lasts.append(spans[-1][1])
        overrun += sum(t1 - t0 - sleep_s for t0, t1, _ in spans)
        for (_, end, _), (start, _, _) in itertools.pairwise(spans):
            gap = max(0.0, start - end)
            if gap >= _BIG_GAP_S:
                big += gap
                n_big += 1
            else:
                small += gap
    return {
        "pool": size,
        "wall_s": round(wall, 3),
        "ideal_s": round(len(calls) * sleep_s / size, 3),
        "actors": len(by_actor),
        "built_s": [round(x, 3) for x in sorted(builds)],
        "first_call_s": [round(x, 3) for x in sorted(firsts)],
        "last_end_s": [round(x, 3) for x in sorted(lasts)],
        "tail_spread_s": round(max(lasts) - min(lasts), 3),
        "small_gaps_s": round(small, 3),
        "big_gaps_s": round(big, 3),
        "big_gaps": n_big,
        "sleep_overrun_s": round(overrun, 3),
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
    }


def main() -> None:
    import psutil

    import daskinfer as di

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pools", default="8", help="comma-separated pool sizes")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batches", type=int, default=400)
    p.add_argument("--batch-rows", type=int, default=1024)
    p.add_argument("--blocks", type=int, default=40)
    p.add_argument("--sleep-ms", type=float, default=50.0)
    p.add_argument(
        "--stamps",
        metavar="PATH",
        help="append each run's batches (actor, built, start, end; seconds from the run's "
        "start) to PATH as one JSON line",
    )
    args = p.parse_args()
    pools = [int(x) for x in args.pools.split(",")]
    bs, n = args.batch_rows, args.batches * args.batch_rows
    ctor = {"ms": args.sleep_ms}
    threads = -(-(max(pools) + 2) // 2)
    with c.dask_cluster(cpu_workers=2, threads_per_worker=threads):
        me = psutil.Process()
        workers = [k for k in me.children() if "resource_tracker" not in " ".join(k.cmdline())]
        processes = {"client": me, **{f"worker-{k.pid}": k for k in workers}}
        di.range(2 * bs).map_batches(
            StampingSleeper, concurrency=1, num_cpus=1, batch_size=bs, fn_constructor_kwargs=ctor
        ).count()
        for _ in range(args.reps):
            for size in pools:
                ds = di.range(n, override_num_blocks=args.blocks).map_batches(
                    StampingSleeper,
                    concurrency=size,
                    num_cpus=1,
                    batch_size=bs,
                    fn_constructor_kwargs=ctor,
                )
                before = _cpu_seconds(processes)
                start = time.time()
                calls = []
                for b in ds.iter_batches(batch_size=bs):
                    calls.append((b["actor"][0], b["built"][0], b["t0"][0], b["t1"][0]))
                wall = time.time() - start
                after = _cpu_seconds(processes)
                cpu = {k: after[k] - before.get(k, 0.0) for k in after}
                calls = [(a, *(t - start for t in times)) for a, *times in calls]
                if args.stamps:
                    with open(args.stamps, "a") as f:
                        f.write(json.dumps({"pool": size, "batches": calls}) + "\n")
                print(
                    json.dumps(_summary(size, wall, calls, args.sleep_ms / 1000, cpu)), flush=True
                )


if __name__ == "__main__":
    main()
