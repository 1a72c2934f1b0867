"""W4: Parquet (1 KB payload per row) -> light map_batches -> write_parquet; MB/s and peak RSS.

The base data set is ``--base-mb`` MiB (default 2048, about 2 GB) over ``--files`` files (default
200); ``--scale 10`` writes 10x the files of the same size. Rows: int64 ``id`` (global, 0..N-1)
and a 1024-byte random lowercase string ``payload`` (incompressible enough that the bytes on
disk are the bytes moved). The data is generated once under benchmarks/.data/w4 (git-ignored;
``DASKINFER_BENCH_DATA`` moves it) and reused; generation is not timed.

The map adds ``y = 2 * id + 1`` with pyarrow compute (``batch_format="pyarrow"``). Peak RSS is
the sum over the client and all its descendant processes (Dask nannies and workers; Ray's GCS,
raylet and workers), sampled every 0.2 s in a thread. Figures: MB/s (input bytes on disk / wall,
MB = 10^6 bytes) and peak RSS; the runner divides the peak at scale 10 by the peak at scale 1.
"""

from __future__ import annotations

import os
import shutil

import _common as c


def light(table):
    import pyarrow.compute as pc

    return table.append_column("y", pc.add(pc.multiply(table["id"], 2), 1))


def generate(base_mb: float, files: int, scale: int, seed: int = 0) -> tuple[str, int]:
    """Write (once) ``files * scale`` Parquet files of ``base_mb / files`` MiB each; return (dir, rows)."""
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows_per_file = max(1, round(base_mb * 2**20 / files / 1024))
    nfiles = files * scale
    d = os.path.join(c.DATA_DIR, "w4", f"in-{base_mb:g}mb-{files}f-x{scale}")
    done = os.path.join(d, "_SUCCESS")
    if os.path.exists(done):
        with open(done) as f:
            return d, int(json.load(f)["rows"])
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    rng = np.random.default_rng(seed)
    offsets = pa.py_buffer(np.arange(0, rows_per_file * 1024 + 1, 1024, dtype=np.int32))
    for i in range(nfiles):
        data = rng.integers(97, 123, size=rows_per_file * 1024, dtype=np.uint8)
        payload = pa.Array.from_buffers(
            pa.string(), rows_per_file, [None, offsets, pa.py_buffer(data)]
        )
        ids = pa.array(np.arange(i * rows_per_file, (i + 1) * rows_per_file, dtype=np.int64))
        pq.write_table(
            pa.table({"id": ids, "payload": payload}),
            os.path.join(d, f"part-{i:05d}.parquet"),
            compression="snappy",
        )
    rows = rows_per_file * nfiles
    with open(done, "w") as f:
        json.dump({"rows": rows, "files": nfiles}, f)
    return d, rows


def check(out: str, n: int) -> tuple[int, int, bool]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rows, sum_y, sum_id = 0, 0, 0
    has_payload = True
    files = sorted(
        os.path.join(r, f)
        for r, _d, fs in os.walk(out)
        for f in fs
        if f.endswith(".parquet") and not f.startswith((".", "_"))
    )
    for path in files:
        pf = pq.ParquetFile(path)
        has_payload &= "payload" in pf.schema_arrow.names
        t = pf.read(columns=["id", "y"])
        rows += t.num_rows
        sum_y += int(pc.sum(t["y"]).as_py() or 0)
        sum_id += int(pc.sum(t["id"]).as_py() or 0)
    ok = rows == n and sum_id == n * (n - 1) // 2 and sum_y == n * (n - 1) + n and has_payload
    return rows, sum_y, ok


def run(args) -> dict:
    src, n = generate(args.base_mb, args.files, args.scale)
    in_bytes = c.dir_bytes(src) - os.path.getsize(os.path.join(src, "_SUCCESS"))
    out = os.path.join(c.DATA_DIR, "w4", f"out-{args.engine}-{os.getpid()}")
    shutil.rmtree(out, ignore_errors=True)
    bs = args.batch_size
    rec: dict = {
        "scale": args.scale,
        "base_mb": args.base_mb,
        "files": args.files * args.scale,
        "rows": n,
        "input_mb": in_bytes / 1e6,
    }
    try:
        if args.engine == "daskinfer":
            import daskinfer as di

            with (
                c.dask_cluster(cpu_workers=args.workers, threads_per_worker=1),
                c.RssSampler() as mem,
                c.Timer() as t,
            ):
                di.read_parquet(src).map_batches(
                    light, batch_size=bs, batch_format="pyarrow"
                ).write_parquet(out)
            rec.update(version=c.daskinfer_version(), workers=args.workers)
        elif args.engine == "ray":
            with c.ray_session(args.cpus) as ray, c.RssSampler() as mem, c.Timer() as t:
                ray.data.read_parquet(src).map_batches(
                    light, batch_size=bs, batch_format="pyarrow"
                ).write_parquet(out)
            rec.update(version=c.ray_version(), cpus=args.cpus)
        else:
            import pyarrow.parquet as pq

            os.makedirs(out)
            files = sorted(f for f in os.listdir(src) if f.endswith(".parquet"))
            with c.RssSampler() as mem, c.Timer() as t:
                for f in files:
                    pq.write_table(
                        light(pq.read_table(os.path.join(src, f))),
                        os.path.join(out, f),
                        compression="snappy",
                    )
        rows, checksum, ok = check(out, n)
    finally:
        if not args.keep_output:
            shutil.rmtree(out, ignore_errors=True)
    rec.update(
        mb_per_s=in_bytes / 1e6 / t.s,
        wall_s=t.s,
        peak_rss_mb=mem.peak / 2**20,
        baseline_rss_mb=mem.baseline / 2**20,
        rss_samples=mem.samples,
        rows_seen=rows,
        checksum=checksum,
        correct=bool(ok),
    )
    return rec


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, default=1, help="1 or 10: multiples of the base data set")
    p.add_argument(
        "--base-mb", type=float, default=2048, help="size of the scale-1 data set in MiB"
    )
    p.add_argument("--files", type=int, default=200, help="files at scale 1")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument(
        "--workers", type=int, default=2, help="daskinfer: CPU worker processes (1 thread each)"
    )
    p.add_argument("--keep-output", action="store_true")
    c.run_main("W4", p.parse_args(), run, figures=("mb_per_s", "peak_rss_mb"))


if __name__ == "__main__":
    main()
