"""What ``read_images`` costs per image on one core: local files, and HTTP with latency.

W7's ResNet-50 is fed by a CPU stage that decodes and resizes JPEGs (read_images), and on
the H200 machine that stage, not the GPU, set the pace (docs/benchmarks.md). This times the
worker-side read of one block (``_read_images``: fetch, decode, resize to 224x224, convert)
in this process, with no cluster: milliseconds per block of ``--files`` JPEGs, median of
``--reps``. ``--delays`` serves the same files over a local HTTP server that holds each GET
for that many milliseconds, standing in for an object store's round trip.

``--readers-module PATH`` times another copy of the module holding ``_read_images``
(daskinfer/io/files.py; daskinfer/io/readers.py before 2026-12-07) (an older commit
checked out with ``git worktree``), interleaved with this one, for before/after figures.

    python benchmarks/read_images_cost.py
    git worktree add /tmp/old REV && python benchmarks/read_images_cost.py \\
        --readers-module /tmp/old/daskinfer/io/readers.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def _load(path: str):
    spec = importlib.util.spec_from_file_location(f"readers_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _time_block(module, urls, reps: int) -> tuple[float, bool]:
    """Median ms to read the block, and whether every read gave each file's image."""
    module._read_images(urls[:2], (224, 224), "RGB", True, {})  # imports, connections
    times, ok = [], True
    for _ in range(reps):
        t0 = time.perf_counter()
        out = module._read_images(urls, (224, 224), "RGB", True, {})
        times.append((time.perf_counter() - t0) * 1000)
        ok = (
            ok
            and list(out["path"]) == list(urls)
            and all(im.shape == (224, 224, 3) for im in out["image"])
        )
    return statistics.median(times), ok


def main() -> None:
    from tests.integration.test_io import SlowImageServer  # the test suite's server

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--files", type=int, default=64, help="JPEGs per block (read_images' default)")
    p.add_argument("--side", type=int, default=256, help="side of the generated JPEGs (W7's)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all variants")
    p.add_argument("--delays", default="0,20", help="ms each HTTP GET is held, comma-separated")
    p.add_argument(
        "--readers-module", default=None, help="another module with _read_images to compare"
    )
    args = p.parse_args()

    import w7_gpu

    import daskinfer.io.files as current  # _read_images (io/readers.py before 2026-12-07)

    root = pathlib.Path(w7_gpu.make_images(args.files, args.side))
    names = sorted(n for n in os.listdir(root) if n.endswith(".jpg"))[: args.files]
    modules = {"current": current}
    if args.readers_module:
        modules["other"] = _load(args.readers_module)
    results: dict[str, list[float]] = {}
    correct = True
    delays = [float(d) for d in args.delays.split(",") if d.strip()]
    for _ in range(args.rounds):
        for label, module in modules.items():
            key = f"{label} local"
            ms, ok = _time_block(module, [f"file://{root}/{n}" for n in names], args.reps)
            results.setdefault(key, []).append(ms)
            correct = correct and ok
        for delay in delays:
            with SlowImageServer(root, delay_s=delay / 1000) as server:
                for label, module in modules.items():
                    key = f"{label} http {delay:g} ms"
                    ms, ok = _time_block(module, [f"{server.url}/{n}" for n in names], args.reps)
                    results.setdefault(key, []).append(ms)
                    correct = correct and ok
    print(
        json.dumps(
            {
                "benchmark": "read_images_cost",
                "files": args.files,
                "side": args.side,
                "correct": correct,
                "ms_per_block_median": {
                    k: round(statistics.median(v), 1) for k, v in results.items()
                },
                "ms_per_block_rounds": {k: [round(x, 1) for x in v] for k, v in results.items()},
                "cores": os.cpu_count(),
                "pillow": __import__("PIL").__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
