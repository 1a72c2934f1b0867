"""What the CPU stages of W7 cost on this host, alone and with N processes at once.

On the H200 machine, W7's CPU stages ran far slower per item than the same code on the
2-core development machine: a read task took 236 ms for 64 images (3.7 ms each; here
about 1 ms), a tokenize task 285 ms for 512 texts (here 28 ms). That sets W7's ceiling:
13 readers at 3.7 ms an image feed at most 3,500 images/s, 0.40 of the GPU-only loop. This
probe says which it is: the host's cores (slow, or shared: hyperthreads), contention
between processes, or the code. Each of N processes (spawned, as Dask's nanny spawns
workers) runs the same work in a loop; the JSON line gives per-process milliseconds per
item, for N = 1 and up to the worker count W7 uses, and how long a fresh process takes to
import transformers, alone and N at once.

    python benchmarks/host_probe.py                  # N = 1, 4, 8, 13
    python benchmarks/host_probe.py --procs 1,2      # a quick look here
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _read_images_ms(args: tuple[list[str], int, float]) -> list[float]:
    """ms per image for each of ``reps`` reads of the block (starts at ``start_at``)."""
    urls, reps, start_at = args
    from daskinfer.io.files import _read_images

    _read_images(urls[:2], (224, 224), "RGB", True, {})
    time.sleep(max(0.0, start_at - time.time()))  # all processes start together
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _read_images(urls, (224, 224), "RGB", True, {})
        out.append((time.perf_counter() - t0) * 1000 / len(urls))
    return out


def _tokenize_ms(args: tuple[str, list[str], int, float]) -> list[float]:
    """ms per text for each of ``reps`` tokenizations of the batch, W7's settings."""
    path, texts, reps, start_at = args
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as W7's workers have it
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok(texts[:2], padding="max_length", truncation=True, max_length=64, return_tensors="np")
    time.sleep(max(0.0, start_at - time.time()))
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        tok(texts, padding="max_length", truncation=True, max_length=64, return_tensors="np")
        out.append((time.perf_counter() - t0) * 1000 / len(texts))
    return out


def _import_s(n: int) -> list[float]:
    """Seconds for ``n`` fresh interpreters, started at once, to import transformers."""
    code = "import time; t = time.perf_counter(); import transformers, torch; print(time.perf_counter() - t)"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(n)
    ]
    return [float(p.communicate()[0].strip() or "nan") for p in procs]


def _across(fn, make_args, n: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    with ctx.Pool(n) as pool:
        start_at = time.time() + 3.0 + 0.3 * n  # after every process has warmed up
        per_proc = pool.map(fn, [make_args(start_at) for _ in range(n)])
    medians = [statistics.median(v) for v in per_proc]
    return {
        "ms_per_item_median": round(statistics.median(medians), 4),
        "ms_per_item_worst": round(max(medians), 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--procs", default="1,4,8,13", help="process counts to try")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--images", type=int, default=64, help="images per read (read_images' block)")
    p.add_argument("--texts", type=int, default=512, help="texts per tokenize call (W7's batch)")
    args = p.parse_args()

    import _common as c
    import w7_gpu

    root = w7_gpu.make_images(args.images, 256)
    urls = [f"file://{root}/{n}" for n in sorted(os.listdir(root)) if n.endswith(".jpg")][
        : args.images
    ]
    path, _ = c.minilm_path()
    texts = c.sentences(args.texts)
    procs = [int(x) for x in args.procs.split(",")]
    record: dict[str, object] = {
        "benchmark": "host_probe",
        "cores": os.cpu_count(),
        "cores_allowed": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "threads_per_core": _threads_per_core(),
    }
    for n in procs:
        record[f"read_images_n{n}"] = _across(_read_images_ms, lambda s: (urls, args.reps, s), n)
        record[f"tokenize_n{n}"] = _across(_tokenize_ms, lambda s: (path, texts, args.reps, s), n)
    for n in (1, procs[-1]):
        seconds = _import_s(n)
        record[f"import_transformers_n{n}_s"] = {
            "median": round(statistics.median(seconds), 2),
            "max": round(max(seconds), 2),
        }
    record["correct"] = True
    print(json.dumps(record))


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None
            )
    except OSError:
        return None


def _threads_per_core() -> int | None:
    try:
        with open("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list") as f:
            text = f.read().strip()
    except OSError:
        return None
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


if __name__ == "__main__":
    main()
