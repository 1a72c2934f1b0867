"""W6: a predictor that sleeps 50 ms per batch (no CPU), pools of N = 1, 2, 4, 8 actors, 400 batches.

Figure: efficiency(N) = throughput(N) / (N x throughput(1)), throughput in batches/s over the
whole job (actor start-up included), after an untimed 2-batch warm-up on the same cluster.
All pool sizes run in one process on one cluster, in turn.

Sleeping actors need slots, not cores: both engines get ``max(N) + 2`` logical CPU slots on this
machine and each actor asks for one. daskinfer: 2 worker processes with ``ceil(slots / 2)``
threads each and ``CPU=threads``; Ray: ``ray.init(num_cpus=slots)``.
"""

from __future__ import annotations

import math
import time

import _common as c


class Sleeper:
    def __init__(self, ms):
        self.ms = ms

    def __call__(self, batch):
        time.sleep(self.ms / 1000.0)
        batch["pred"] = batch["id"] + 1
        return batch


def _consume(batches):
    rows, total = 0, 0
    for b in batches:
        rows += len(b["pred"])
        total += int(b["pred"].sum())
    return rows, total


def run(args) -> dict:
    pools = [int(x) for x in args.pools.split(",")]
    nb, bs = args.batches, args.batch_rows
    n = nb * bs
    slots = max(pools) + 2
    threads = math.ceil(slots / 2)
    rec: dict = {"batches": nb, "batch_rows": bs, "sleep_ms": args.sleep_ms, "pools": pools}
    walls: dict[int, float] = {}
    ok = True
    ctor = {"ms": args.sleep_ms}
    if args.engine == "daskinfer":
        import daskinfer as di

        with c.dask_cluster(cpu_workers=2, threads_per_worker=threads):
            if (
                args.warmup
            ):  # first use of a fresh cluster (imports, first actor) is not the pool's cost
                di.range(2 * bs).map_batches(
                    Sleeper, concurrency=1, num_cpus=1, batch_size=bs, fn_constructor_kwargs=ctor
                ).count()
            for size in pools:
                ds = di.range(n, override_num_blocks=args.blocks).map_batches(
                    Sleeper, concurrency=size, num_cpus=1, batch_size=bs, fn_constructor_kwargs=ctor
                )
                with c.Timer() as t:
                    rows, total = _consume(ds.iter_batches(batch_size=bs))
                walls[size] = t.s
                ok &= rows == n and total == n * (n + 1) // 2
        rec.update(version=c.daskinfer_version(), workers=2, threads_per_worker=threads)
    else:
        with c.ray_session(2 * threads) as ray:
            if args.warmup:
                ray.data.range(2 * bs).map_batches(
                    Sleeper, concurrency=1, num_cpus=1, batch_size=bs, fn_constructor_kwargs=ctor
                ).count()
            for size in pools:
                ds = ray.data.range(n, override_num_blocks=args.blocks).map_batches(
                    Sleeper, concurrency=size, num_cpus=1, batch_size=bs, fn_constructor_kwargs=ctor
                )
                with c.Timer() as t:
                    rows, total = _consume(ds.iter_batches(batch_size=bs, batch_format="numpy"))
                walls[size] = t.s
                ok &= rows == n and total == n * (n + 1) // 2
        rec.update(version=c.ray_version(), cpus=2 * threads)
    thr = {k: nb / w for k, w in walls.items()}
    base = thr.get(1)
    eff = {k: (v / (k * base) if base else None) for k, v in thr.items()}
    rec.update(
        wall_s=sum(walls.values()),
        wall_s_by_n=walls,
        throughput=thr,
        efficiency=eff,
        efficiency_max_n=eff.get(max(pools)),
        correct=bool(ok),
    )
    return rec


def main() -> None:
    p = c.parser(__doc__.splitlines()[0], engines=("daskinfer", "ray"))
    p.add_argument("--batches", type=int, default=400)
    p.add_argument("--batch-rows", type=int, default=1024)
    p.add_argument("--sleep-ms", type=float, default=50.0)
    p.add_argument(
        "--pools",
        default="1,2,4,8",
        help="comma-separated pool sizes; must include 1 (e.g. 1,2,4,8,16,32)",
    )
    p.add_argument("--blocks", type=int, default=40, help="source blocks")
    p.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the untimed 2-batch run first",
    )
    c.run_main("W6", p.parse_args(), run, figures=("throughput", "efficiency", "efficiency_max_n"))


if __name__ == "__main__":
    main()
