"""W2: CPU stage (20 ms busy loop per batch) feeding a 1-actor predictor (sleeps 20 ms per batch).

200 batches of 1024 rows. Figure: ideal / actual, ideal = max(batches x cpu_ms / CPU workers,
batches x gpu_ms): 4 s with the defaults and 2 CPU workers.

daskinfer: two CPU workers (``CPU=1``) plus one worker offering ``{"GPU": 1}`` standing in for
the accelerator; the predictor asks ``num_gpus=1``. Ray: ``ray.init(num_cpus=2, num_gpus=1)`` (a
logical GPU; nothing touches a device) and the predictor asks ``num_gpus=1, num_cpus=0``.
``loop``: one process doing both stages in turn (its ratio is about 0.5 by construction).
"""

from __future__ import annotations

import time

import _common as c


def burn(batch, ms):
    # a busy loop, not a sleep: the CPU stage really occupies a core
    end = time.perf_counter() + ms / 1000.0
    x = 0
    while time.perf_counter() < end:
        x += 1
    batch["z"] = batch["id"] * 2
    return batch


class Predictor:
    def __init__(self, ms):
        self.ms = ms

    def __call__(self, batch):
        time.sleep(self.ms / 1000.0)  # an accelerator that leaves the CPU free
        batch["pred"] = batch["z"] + 1
        return batch


def _consume(batches):
    rows, total = 0, 0
    for b in batches:
        rows += len(b["pred"])
        total += int(b["pred"].sum())
    return rows, total


def run(args) -> dict:
    nb, bs = args.batches, args.batch_rows
    n = nb * bs
    rec: dict = {
        "batches": nb,
        "batch_rows": bs,
        "cpu_ms": args.cpu_ms,
        "gpu_ms": args.gpu_ms,
        "cpu_workers": args.workers,
    }
    if args.engine == "daskinfer":
        import daskinfer as di

        with c.dask_cluster(cpu_workers=args.workers, threads_per_worker=1, gpu_workers=1):
            ds = (
                di.range(n, override_num_blocks=nb)
                .map_batches(burn, batch_size=bs, num_cpus=1, fn_kwargs={"ms": args.cpu_ms})
                .map_batches(
                    Predictor,
                    concurrency=1,
                    num_gpus=1,
                    batch_size=bs,
                    fn_constructor_kwargs={"ms": args.gpu_ms},
                )
            )
            with c.Timer() as t:
                got = _consume(ds.iter_batches(batch_size=bs))
        rec["version"] = c.daskinfer_version()
    elif args.engine == "ray":
        with c.ray_session(args.workers, num_gpus=1) as ray:
            ds = (
                ray.data.range(n, override_num_blocks=nb)
                .map_batches(burn, batch_size=bs, num_cpus=1, fn_kwargs={"ms": args.cpu_ms})
                .map_batches(
                    Predictor,
                    concurrency=1,
                    num_gpus=1,
                    num_cpus=0,
                    batch_size=bs,
                    fn_constructor_kwargs={"ms": args.gpu_ms},
                )
            )
            with c.Timer() as t:
                got = _consume(ds.iter_batches(batch_size=bs, batch_format="numpy"))
        rec["version"] = c.ray_version()
    else:
        import numpy as np

        pred = Predictor(args.gpu_ms)

        def batches():
            for i in range(nb):
                yield pred(
                    burn({"id": np.arange(i * bs, (i + 1) * bs, dtype=np.int64)}, args.cpu_ms)
                )

        with c.Timer() as t:
            got = _consume(batches())
    rows, total = got
    ideal = max(nb * args.cpu_ms / 1000.0 / args.workers, nb * args.gpu_ms / 1000.0)
    ok = rows == n and total == n * (n - 1) + n  # sum(2 * id + 1)
    rec.update(
        ideal_s=ideal,
        wall_s=t.s,
        ideal_over_actual=ideal / t.s,
        rows=rows,
        checksum=total,
        correct=bool(ok),
    )
    return rec


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--batch-rows", type=int, default=1024)
    p.add_argument("--cpu-ms", type=float, default=20.0)
    p.add_argument("--gpu-ms", type=float, default=20.0)
    p.add_argument(
        "--workers", type=int, default=2, help="CPU workers (daskinfer) / CPU slots (ray)"
    )
    c.run_main("W2", p.parse_args(), run, figures=("ideal_over_actual",))


if __name__ == "__main__":
    main()
