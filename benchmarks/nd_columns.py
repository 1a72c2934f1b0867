"""What N-D outputs (embeddings) cost: per block, and through a pipeline.

Per block (``--reps`` timings, medians, in-process): building a block from a predictor's
``{"id", "emb"}`` output, Dask's serialize and deserialize of it (and its frame count), and
its conversion back to the numpy format. With ``--object-cells`` the block holds the
embeddings as an object column of per-row arrays, the format blocks had before
``TensorArray`` (for a comparison in one process).

Through a pipeline: a predictor that returns ``--width``-wide float32 embeddings and does
no work (``--rows`` rows, ``--batch-size``), one CPU worker and one fake-GPU worker,
consumed with ``iter_batches`` on the client; rows/s and the CPU time of all processes.

    python benchmarks/nd_columns.py
    python benchmarks/nd_columns.py --rows 20000 --reps 5    # a quick look
"""

from __future__ import annotations

import argparse
import time

import _common as c
import numpy as np


class Embed:
    """Returns a row's id, repeated, as its embedding: a checksum can tell rows apart."""

    def __init__(self, width):
        self.width = width

    def __call__(self, batch):
        ids = batch["id"]
        emb = np.repeat(ids[:, None].astype(np.float32), self.width, axis=1)
        return {"id": ids, "emb": emb}


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1e3 * sorted(times)[len(times) // 2], 4)


def per_block(rows: int, width: int, reps: int, object_cells: bool) -> dict:
    from distributed.protocol import deserialize, serialize

    from daskinfer._internal.batching import batch_to_block, block_to_batch

    emb = np.random.default_rng(0).random((rows, width), dtype=np.float32)
    output = {"id": np.arange(rows), "emb": emb}
    block = batch_to_block(output)
    if object_cells:
        cells = np.empty(rows, dtype=object)
        for i in range(rows):
            cells[i] = emb[i].copy()
        block = block.assign(emb=cells)
    header, frames = serialize(block)
    back = deserialize(header, frames)
    ok = np.array_equal(block_to_batch(back, "numpy")["emb"], emb)
    return {
        "column": str(block["emb"].dtype),
        "build_ms": _median_ms(lambda: batch_to_block(output), reps),
        "serialize_ms": _median_ms(lambda: serialize(block), reps),
        "deserialize_ms": _median_ms(lambda: deserialize(header, frames), reps),
        "to_numpy_ms": _median_ms(lambda: block_to_batch(block, "numpy"), reps),
        "frames": len(frames),
        "round_trip_ok": bool(ok),
    }


def pipeline(rows: int, width: int, batch_size: int) -> dict:
    import psutil

    import daskinfer as di

    me = psutil.Process()

    def cpu_seconds() -> dict:
        out = {me.pid: sum(me.cpu_times()[:2])}
        for proc in me.children(recursive=True):
            try:
                out[proc.pid] = sum(proc.cpu_times()[:2])
            except psutil.Error:
                pass
        return out

    with c.dask_cluster(cpu_workers=1, threads_per_worker=1, gpu_workers=1):
        ds = di.range(rows, override_num_blocks=max(1, rows // batch_size)).map_batches(
            Embed,
            concurrency=1,
            num_gpus=1,
            batch_size=batch_size,
            fn_constructor_kwargs={"width": width},
        )
        ds.take(1)  # workers and the actor's first load out of the timing
        before = cpu_seconds()
        seen, total, first_col = 0, 0.0, 0.0
        with c.Timer() as t:
            for batch in ds.iter_batches(batch_size=batch_size):
                seen += len(batch["id"])
                total += float(batch["emb"][:, -1].sum())
                first_col += float(batch["emb"][:, 0].sum())
        after = cpu_seconds()
    expected = float(rows * (rows - 1) // 2)
    return {
        "rows_seen": seen,
        "wall_s": t.s,
        "rows_per_s": seen / t.s,
        "cpu_s_all_processes": sum(after[k] - before.get(k, 0.0) for k in after),
        "checksum_ok": seen == rows and total == expected and first_col == expected,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--object-cells", action="store_true")
    p.add_argument("--no-pipeline", action="store_true")
    args = p.parse_args()
    rec: dict = {"workload": "nd_columns", "width": args.width, "batch_size": args.batch_size}
    rec["per_block"] = per_block(args.batch_size, args.width, args.reps, args.object_cells)
    ok = rec["per_block"]["round_trip_ok"]
    if not args.no_pipeline:
        rec["rows"] = args.rows
        rec["pipeline"] = pipeline(args.rows, args.width, args.batch_size)
        ok = ok and rec["pipeline"]["checksum_ok"]
    rec["correct"] = bool(ok)
    c.emit(rec)


if __name__ == "__main__":
    main()
