"""W1: 2,000,000 rows (int64 id, float64 x); map_batches adds a column; consume with iter_batches.

``--mode tasks`` runs the map as a function (tasks); ``--mode pool`` as a callable class in a
pool of 2 actors. ``--engine loop`` is plain numpy over the same 1024-row batches.

The source is ``range(rows)`` plus a whole-block map that derives ``x = id * 0.5`` (generated on
the workers, as Ray's ``range`` is); the measured map adds ``y = 2 * x + 1`` (= id + 1), so the
checksum is exact: sum(y) = rows * (rows + 1) / 2.

Ray: a pool of 2 actors with the default ``num_cpus=1`` never finishes on a 2-core machine (the
actors hold both CPUs and the read tasks wait forever), so the Ray pool uses ``num_cpus=0.5``.
"""

from __future__ import annotations

import _common as c


def with_x(batch):
    batch["x"] = batch["id"] * 0.5
    return batch


def add_y(batch):
    batch["y"] = batch["x"] * 2.0 + 1.0
    return batch


class AddY:
    def __call__(self, batch):
        return add_y(batch)


def _consume(batches) -> tuple[int, float, float]:
    rows, sum_y, sum_id = 0, 0.0, 0.0
    for b in batches:
        rows += len(b["y"])
        sum_y += float(b["y"].sum())
        sum_id += float(b["id"].sum())
    return rows, sum_y, sum_id


def run(args) -> dict:
    n, bs = args.rows, args.batch_size
    rec: dict = {"mode": args.mode, "rows": n, "batch_size": bs}
    if args.engine == "daskinfer":
        import daskinfer as di

        with c.dask_cluster(cpu_workers=args.workers, threads_per_worker=1):
            ds = di.range(n, override_num_blocks=args.blocks).map_batches(with_x, batch_size=None)
            if args.mode == "tasks":
                ds = ds.map_batches(add_y, batch_size=bs)
            else:
                ds = ds.map_batches(AddY, concurrency=2, batch_size=bs, num_cpus=args.actor_cpus)
            with c.Timer() as t:
                got = _consume(ds.iter_batches(batch_size=bs))
        rec.update(version=c.daskinfer_version(), workers=args.workers)
    elif args.engine == "ray":
        with c.ray_session(args.cpus) as ray:
            ds = ray.data.range(n, override_num_blocks=args.blocks).map_batches(
                with_x, batch_size=None
            )
            if args.mode == "tasks":
                ds = ds.map_batches(add_y, batch_size=bs)
            else:
                cpus = 0.5 if args.actor_cpus is None else args.actor_cpus
                ds = ds.map_batches(AddY, concurrency=2, batch_size=bs, num_cpus=cpus)
                rec["ray_actor_num_cpus"] = cpus
            with c.Timer() as t:
                got = _consume(ds.iter_batches(batch_size=bs, batch_format="numpy"))
        rec.update(version=c.ray_version(), cpus=args.cpus)
    else:
        import numpy as np

        def batches():
            for start in range(0, n, bs):
                b = {"id": np.arange(start, min(n, start + bs), dtype=np.int64)}
                yield add_y(with_x(b))

        rec["mode"] = "loop"
        with c.Timer() as t:
            got = _consume(batches())
    rows, sum_y, sum_id = got
    ok = rows == n and sum_y == n * (n + 1) / 2 and sum_id == n * (n - 1) / 2
    rec.update(rows_per_s=n / t.s, wall_s=t.s, rows_seen=rows, checksum=sum_y, correct=bool(ok))
    return rec


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("tasks", "pool"), default="tasks")
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument(
        "--blocks",
        type=int,
        default=None,
        help="source blocks (range's override_num_blocks); default: each engine's own partitioning",
    )
    p.add_argument(
        "--workers", type=int, default=2, help="daskinfer: CPU worker processes (1 thread each)"
    )
    p.add_argument(
        "--actor-cpus",
        type=float,
        default=None,
        help="num_cpus per pool actor (daskinfer: none; ray: 0.5)",
    )
    args = p.parse_args()
    c.run_main("W1", args, run, figures=("rows_per_s",))


if __name__ == "__main__":
    main()
