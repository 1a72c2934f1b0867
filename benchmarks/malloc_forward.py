"""MiniLM's CPU forward pass (W3's predictor, one torch thread) under glibc malloc settings.

Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also pins glibc's mmap
threshold at 128 KiB; daskinfer's actor workers raise it (``DataContext.actor_mmap_threshold``).
Each setting runs in fresh processes (malloc reads its environment once), one process alone
and two at once (W3's pool of 2 on 2 cores), on the same pre-tokenized batches:

    python benchmarks/malloc_forward.py [--batches 8] [--reps 3]

Prints one JSON line per setting: rows/s of one process and of two together, medians of reps.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

SETTINGS = {
    "plain process": ({}, None),
    "Dask worker (MALLOC_TRIM_THRESHOLD_=65536)": ({"MALLOC_TRIM_THRESHOLD_": "65536"}, None),
    "Dask worker + daskinfer's mmap threshold (32 MiB)": (
        {"MALLOC_TRIM_THRESHOLD_": "65536"},
        32 * 2**20,
    ),
}


def _forward(mmap_threshold, batches, ready, go, results):
    sys.path.insert(0, HERE)
    if mmap_threshold is not None:
        from daskinfer._internal.allocator import set_mmap_threshold

        assert set_mmap_threshold(mmap_threshold)
    import _common as c
    import torch
    import w3_embed as w

    torch.set_num_threads(1)
    path, weights = c.minilm_path()
    _tok, model = c.load_minilm(path, weights)
    text = c.sentences(256 * batches)
    encoded = [
        w.tokenize({"id": None, "text": text[i * 256 : (i + 1) * 256]}, path, 64)
        for i in range(batches)
    ]
    w.embed(model, encoded[0]["input_ids"], encoded[0]["attention_mask"])  # warm-up
    ready.put(None)
    go.wait()
    t = time.perf_counter()
    for b in encoded:
        w.embed(model, b["input_ids"], b["attention_mask"])
    results.put(time.perf_counter() - t)


def _run(env, mmap_threshold, batches, procs) -> float:
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    ps = [
        ctx.Process(target=_forward, args=(mmap_threshold, batches, ready, go, results))
        for _ in range(procs)
    ]
    # malloc reads its environment once, as the process starts: the children inherit it
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        for p in ps:
            p.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    for _ in ps:
        ready.get()
    go.set()
    times = [results.get() for _ in ps]
    for p in ps:
        p.join()
    return 256 * batches * procs / max(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    figures: dict[str, dict[int, list[float]]] = {name: {1: [], 2: []} for name in SETTINGS}
    for _ in range(args.reps):  # settings interleaved, so that drift hits them alike
        for name, (env, threshold) in SETTINGS.items():
            for procs in (1, 2):
                figures[name][procs].append(_run(env, threshold, args.batches, procs))
    for name, by_procs in figures.items():
        print(
            json.dumps(
                {
                    "setting": name,
                    "one_process_rows_per_s": round(statistics.median(by_procs[1]), 1),
                    "two_processes_rows_per_s": round(statistics.median(by_procs[2]), 1),
                    "runs": {str(k): [round(v, 1) for v in vs] for k, vs in by_procs.items()},
                }
            )
        )


if __name__ == "__main__":
    main()
