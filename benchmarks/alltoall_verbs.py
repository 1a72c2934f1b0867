"""All-to-all verbs and aggregates: sort, random_shuffle, groupby, aggregate over N rows.

Not one of WORKLOADS.md's targets: a record of what the barriers cost, against pandas
doing the same in this one process (``--engine loop``). The data is ``range(rows)`` with
``k = id * 2654435761 mod 1000003`` (a scrambled key) and ``g = k mod 100``, generated on
the workers. Each figure is the wall time of one verb, the pipeline up to it included;
each result is checked (sorted order and row count, the shuffle a permutation, every
group's count).
"""

from __future__ import annotations

import time

import _common as c
import numpy as np

MULTIPLIER = 2654435761
MODULUS = 1000003
GROUPS = 100


def with_keys(batch):
    k = (batch["id"] * MULTIPLIER) % MODULUS
    return {"id": batch["id"], "k": k, "g": k % GROUPS}


def _expected_group_sizes(n: int) -> np.ndarray:
    ids = np.arange(n, dtype=np.int64)
    return np.bincount(((ids * MULTIPLIER) % MODULUS) % GROUPS, minlength=GROUPS)


def _time(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run(args) -> dict:
    n = args.rows
    rec: dict = {"rows": n}
    want_sizes = _expected_group_sizes(n)
    if args.engine == "daskinfer":
        import daskinfer as di
        from daskinfer.aggregate import Count, Mean, Std

        with c.dask_cluster(cpu_workers=args.workers, threads_per_worker=1):
            ds = di.range(n).map_batches(with_keys, batch_size=None)
            ds.count()  # warm the workers (imports), as the loop has its modules loaded
            count, t_count = _time(ds.count)
            ordered, t_sort = _time(lambda: ds.sort("k").to_pandas())
            shuffled, t_shuffle = _time(lambda: ds.random_shuffle(seed=1).to_pandas())
            grouped, t_groupby = _time(lambda: ds.groupby("g").count().to_pandas())
            summary, t_aggregate = _time(lambda: ds.aggregate(Count(), Mean("k"), Std("k")))
        sizes = grouped.sort_values("g")["count()"].to_numpy()
        rec.update(version=c.daskinfer_version(), workers=args.workers)
    else:
        import pandas as pd

        def frame():
            ids = np.arange(n, dtype=np.int64)
            return pd.DataFrame(with_keys({"id": ids}))

        df = frame()
        count, t_count = _time(lambda: len(frame()))
        ordered, t_sort = _time(lambda: frame().sort_values("k", kind="stable"))
        shuffled, t_shuffle = _time(lambda: frame().sample(frac=1.0, random_state=1))
        grouped, t_groupby = _time(lambda: frame().groupby("g").size())
        summary, t_aggregate = _time(
            lambda: {"count()": len(df), "mean(k)": df["k"].mean(), "std(k)": df["k"].std()}
        )
        sizes = grouped.sort_index().to_numpy()
    ok = (
        count == n
        and len(ordered) == n
        and bool(np.all(np.diff(ordered["k"].to_numpy()) >= 0))
        and len(shuffled) == n
        and bool(np.array_equal(np.sort(shuffled["id"].to_numpy()), np.arange(n)))
        and bool(np.array_equal(sizes, want_sizes))
        and summary["count()"] == n
    )
    rec.update(
        count_s=t_count,
        sort_s=t_sort,
        random_shuffle_s=t_shuffle,
        groupby_count_s=t_groupby,
        aggregate_s=t_aggregate,
        correct=bool(ok),
    )
    return rec


def main() -> None:
    p = c.parser(__doc__.splitlines()[0], engines=("daskinfer", "loop"))
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument(
        "--workers", type=int, default=2, help="daskinfer: CPU worker processes (1 thread each)"
    )
    args = p.parse_args()
    c.run_main(
        "alltoall",
        args,
        run,
        figures=("count_s", "sort_s", "random_shuffle_s", "groupby_count_s", "aggregate_s"),
    )


if __name__ == "__main__":
    main()
