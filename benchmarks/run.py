"""Run the workloads of shared/WORKLOADS.md for every engine, interleaved, and write the results.

    python benchmarks/run.py                         # W1-W4, W6; 3 repetitions; docs/benchmarks.md
    python benchmarks/run.py --workloads W1,W2 --reps 5
    python benchmarks/run.py --workloads W7          # on the accelerator machine only
    python benchmarks/run.py --tiny --reps 1         # seconds per run: checks the harness only

Each run is a fresh subprocess with a timeout; the ``ray`` engine runs under
benchmarks/.ray-venv/bin/python (``bash benchmarks/ray-env.sh`` makes it), the others under
this interpreter. Within a repetition the engines of a workload run one after another, in an
order rotated each repetition. The raw JSON lines go to docs/benchmarks.jsonl; the table of
medians (min, max), the ratios the targets ask for, the machine, the versions, the date and
this command replace the results section of docs/benchmarks.md (between its markers).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RAY_PYTHON = os.path.join(HERE, ".ray-venv", "bin", "python")
START, END = "<!-- results:start -->", "<!-- results:end -->"


@dataclass
class Case:
    workload: str
    variant: str  # "tasks", "pool", "x1", "x10", "" ...
    engine: str
    argv: list[str]
    timeout_s: float
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.workload}{'/' + self.variant if self.variant else ''} {self.engine}"


SCRIPTS = {
    "W1": "w1_map.py",
    "W2": "w2_pipeline.py",
    "W3": "w3_embed.py",
    "W4": "w4_parquet.py",
    "W5": "w5_tokens.py",
    "W6": "w6_scaling.py",
    "W7": "w7_gpu.py",
}
TINY = {
    "W1": ["--rows", "20000", "--blocks", "10"],
    "W2": ["--batches", "20"],
    "W3": ["--rows", "256", "--blocks", "2", "--check-rows", "2"],
    "W4": ["--base-mb", "2", "--files", "4"],
    "W5": ["--rows", "64", "--batch-size", "32", "--blocks", "2"],
    "W6": ["--batches", "16", "--pools", "1,2", "--blocks", "4"],
    "W7": [
        "--device",
        "cpu",
        "--images",
        "8",
        "--texts",
        "32",
        "--batch-size",
        "8",
        "--workers",
        "1",
    ],
}


def cases_for(
    workload: str, engines: list[str], tiny: bool, extra: dict[str, list[str]]
) -> list[Case]:
    base = (TINY.get(workload, []) if tiny else []) + extra.get(workload, [])
    t = 180.0 if tiny else None

    def mk(variant: str, engine: str, argv: list[str], timeout: float) -> Case:
        return Case(workload, variant, engine, ["--engine", engine, *argv, *base], t or timeout)

    out: list[Case] = []
    if workload == "W1":
        for mode in ("tasks", "pool"):
            out += [mk(mode, e, ["--mode", mode], 600) for e in engines if e != "loop"]
        if "loop" in engines:
            out.append(mk("", "loop", [], 300))
    elif workload in ("W2", "W3"):
        out += [mk("", e, [], 300 if workload == "W2" else 2400) for e in engines]
    elif workload == "W4":
        for scale in (1, 10):
            out += [
                mk(f"x{scale}", e, ["--scale", str(scale)], 900 if scale == 1 else 5400)
                for e in engines
            ]
    elif workload == "W5":
        out += [
            mk("", e, [], 3600) for e in engines if e != "ray"
        ]  # Ray has no token-aware batching
    elif workload == "W6":
        out += [mk("", e, [], 900) for e in engines if e != "loop"]
    elif workload == "W7":
        out += [
            mk("", e, [], 1800) for e in engines if e != "ray"
        ]  # Ray is not on the accelerator machine
    else:
        raise SystemExit(f"unknown workload {workload!r}: use W1 to W7")
    return out


def run_case(case: Case, rep: int, ray_python: str) -> dict[str, Any]:
    python = ray_python if case.engine == "ray" else sys.executable
    cmd = [python, os.path.join(HERE, SCRIPTS[case.workload]), *case.argv]
    rec: dict[str, Any]
    started = time.time()
    if case.engine == "ray" and not os.path.exists(ray_python):
        rec = {
            "correct": False,
            "error": f"no Ray venv at {ray_python}: run `bash benchmarks/ray-env.sh`",
        }
    else:
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=case.timeout_s)
            rec = _last_json(stdout) or {
                "correct": False,
                "error": f"no JSON line (exit {proc.returncode}): {stderr[-800:]}",
            }
            rec["returncode"] = proc.returncode
            if proc.returncode and not rec.get("error"):
                rec["stderr_tail"] = stderr[-800:]
        except subprocess.TimeoutExpired:
            rec = {"correct": False, "error": f"timed out after {case.timeout_s:g} s"}
        finally:
            _kill_group(proc)
    rec.setdefault("workload", case.workload)
    rec.setdefault("engine", case.engine)
    rec.update(
        variant=case.variant,
        rep=rep,
        elapsed_s=round(time.time() - started, 2),
        cmd=" ".join(
            shlex.quote(os.path.relpath(x, ROOT) if x.startswith(ROOT) else x) for x in cmd
        ),
    )
    return rec


def _kill_group(proc: subprocess.Popen) -> None:
    """End the script and what it left behind (its cluster runs in the script's own session)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()


def _last_json(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


# ------------------------------------------------------------------ summary
def _figure(runs: list[dict[str, Any]], key: str | tuple[str, ...]) -> list[float]:
    vals = []
    for r in runs:
        if not r.get("correct"):
            continue
        v: Any = r
        for k in (key,) if isinstance(key, str) else key:
            v = v.get(k) if isinstance(v, dict) else None
        if isinstance(v, (int, float)):
            vals.append(float(v))
    return vals


def _med(vals: list[float]) -> float | None:
    return statistics.median(vals) if vals else None


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _yes(v: float | None, ok: bool) -> str:
    return "-" if v is None else ("yes" if ok else "no")


FIGURES = {
    "W1": [("rows_per_s", "rows/s")],
    "W2": [("ideal_over_actual", "ideal/actual"), ("wall_s", "wall s")],
    "W3": [("rows_per_s", "rows/s")],
    "W4": [("mb_per_s", "MB/s"), ("peak_rss_mb", "peak RSS MiB")],
    "W5": [
        ("speedup", "token-aware / fixed speed-up"),
        ("fixed_rows_per_s", "fixed rows/s"),
        ("aware_rows_per_s", "token-aware rows/s"),
        ("max_abs_diff", "max abs diff"),
    ],
    "W6": [(("efficiency", n), f"efficiency N={n}") for n in ("1", "2", "4", "8", "16", "32")],
    "W7": [
        ("resnet50_rows_per_s", "ResNet-50 rows/s"),
        ("resnet50_busy_fraction", "ResNet-50 busy (NVML)"),
        ("resnet50_busy_fraction_events", "ResNet-50 busy (CUDA events)"),
        (
            "resnet50_busy_fraction_events_from_first_call",
            "ResNet-50 busy (CUDA events) from its first call",
        ),
        ("resnet50_first_call_after_s", "ResNet-50 first call after (s)"),
        ("minilm_rows_per_s", "MiniLM rows/s"),
        ("minilm_busy_fraction", "MiniLM busy (NVML)"),
        ("minilm_busy_fraction_events", "MiniLM busy (CUDA events)"),
        (
            "minilm_busy_fraction_events_from_first_call",
            "MiniLM busy (CUDA events) from its first call",
        ),
        ("minilm_first_call_after_s", "MiniLM first call after (s)"),
    ],
}


def summarize(cases: list[Case]) -> tuple[list[str], list[str]]:
    """Markdown lines of the figures table and of the targets table."""
    table = [
        "| workload | engine | figure | median | min | max | correct runs |",
        "|---|---|---|---|---|---|---|",
    ]
    med: dict[tuple[str, str, str, Any], float | None] = {}
    for case in cases:
        for key, name in FIGURES[case.workload]:
            vals = _figure(case.runs, key)
            if not vals and isinstance(key, tuple):
                continue  # W6 pool sizes not run
            med[(case.workload, case.variant, case.engine, key)] = _med(vals)
            wl = case.workload + (f" ({case.variant})" if case.variant else "")
            ok = sum(bool(r.get("correct")) for r in case.runs)
            table.append(
                f"| {wl} | {case.engine} | {name} | {_fmt(_med(vals))} | {_fmt(min(vals) if vals else None)} "
                f"| {_fmt(max(vals) if vals else None)} | {ok}/{len(case.runs)} |"
            )
    m = med.get
    targets = ["| workload | ratio | value | target | met |", "|---|---|---|---|---|"]

    def add(wl: str, what: str, v: float | None, target: str, ok: bool) -> None:
        met = "n/a" if target.startswith("(") else _yes(v, ok)
        targets.append(f"| {wl} | {what} | {_fmt(v)} | {target} | {met} |")

    present = {c.workload for c in cases}
    if "W1" in present:
        loop = m(("W1", "", "loop", "rows_per_s"))
        for mode in ("tasks", "pool"):
            d = m(("W1", mode, "daskinfer", "rows_per_s"))
            r = _ratio(d, m(("W1", mode, "ray", "rows_per_s")))
            add("W1", f"{mode}: daskinfer / Ray rows/s", r, ">= 3", r is not None and r >= 3)
            r = _ratio(d, loop)
            add(
                "W1",
                f"{mode}: daskinfer / loop rows/s",
                r,
                ">= 0.5 (within 2x)",
                r is not None and r >= 0.5,
            )
    if "W2" in present:
        for e in ("daskinfer", "ray", "loop"):
            v = m(("W2", "", e, "ideal_over_actual"))
            if v is not None or e == "daskinfer":
                add(
                    "W2",
                    f"{e}: ideal / actual",
                    v,
                    ">= 0.9" if e == "daskinfer" else "(reference)",
                    v is not None and v >= 0.9,
                )
    if "W3" in present:
        d = m(("W3", "", "daskinfer", "rows_per_s"))
        r = _ratio(d, m(("W3", "", "loop", "rows_per_s")))
        add("W3", "daskinfer / loop rows/s", r, ">= 0.95", r is not None and r >= 0.95)
        r = _ratio(d, m(("W3", "", "ray", "rows_per_s")))
        add("W3", "daskinfer / Ray rows/s", r, "> 1", r is not None and r > 1)
    if "W4" in present:
        for e in ("daskinfer", "ray", "loop"):
            r = _ratio(m(("W4", "x10", e, "peak_rss_mb")), m(("W4", "x1", e, "peak_rss_mb")))
            if r is not None or e == "daskinfer":
                add(
                    "W4",
                    f"{e}: peak RSS 10x / 1x",
                    r,
                    "<= 1.2" if e == "daskinfer" else "(reference)",
                    r is not None and r <= 1.2,
                )
        for scale in ("x1", "x10"):
            r = _ratio(
                m(("W4", scale, "daskinfer", "mb_per_s")), m(("W4", scale, "ray", "mb_per_s"))
            )
            add("W4", f"{scale}: daskinfer / Ray MB/s", r, "> 1", r is not None and r > 1)
    if "W5" in present:
        for e in ("daskinfer", "loop"):
            v = m(("W5", "", e, "speedup"))
            if v is not None or e == "daskinfer":
                add("W5", f"{e}: token-aware speed-up", v, ">= 1.5", v is not None and v >= 1.5)
            d = m(("W5", "", e, "max_abs_diff"))
            if d is not None or e == "daskinfer":
                add("W5", f"{e}: max abs difference", d, "< 1e-4", d is not None and d < 1e-4)
    if "W6" in present:
        for e in ("daskinfer", "ray"):
            for n in ("2", "4", "8", "16", "32"):
                v = m(("W6", "", e, ("efficiency", n)))
                if v is None and n in ("16", "32"):
                    continue
                target = ">= 0.9" if (n == "8" and e == "daskinfer") else "(reference)"
                add("W6", f"{e}: efficiency N={n}", v, target, v is not None and v >= 0.9)
    if "W7" in present:
        for model in ("resnet50", "minilm"):
            d = m(("W7", "", "daskinfer", f"{model}_rows_per_s"))
            r = _ratio(d, m(("W7", "", "loop", f"{model}_rows_per_s")))
            add(
                "W7",
                f"{model}: daskinfer / GPU-only loop rows/s",
                r,
                ">= 0.9",
                r is not None and r >= 0.9,
            )
            v = m(("W7", "", "daskinfer", f"{model}_busy_fraction"))
            add(
                "W7",
                f"{model}: GPU busy fraction over the job (NVML)",
                v,
                ">= 0.9",
                v is not None and v >= 0.9,
            )
            v = m(("W7", "", "loop", f"{model}_nvml_util"))
            add(
                "W7",
                f"{model}: GPU busy fraction of the GPU-only loop (NVML)",
                v,
                "(reference)",
                v is not None and v >= 0.9,
            )
    return table, targets


# ------------------------------------------------------------------ machine, versions
def machine() -> list[str]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    gpu = "none"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            check=False,
            capture_output=True,
            text=True,
            timeout=20,
        )
        if out.returncode == 0 and out.stdout.strip():
            gpu = "; ".join(out.stdout.strip().splitlines())
    except (OSError, subprocess.SubprocessError):
        pass
    blas = (
        ", ".join(
            f"{k}={v}"
            for k, v in os.environ.items()
            if k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
        )
        or "unset"
    )
    return [
        f"- CPU: {model}; {os.cpu_count()} cores (logical); memory {mem}",
        f"- GPU: {gpu}",
        f"- OS: {platform.platform()}; OPENBLAS env: {blas}",
    ]


def versions(ray_python: str) -> list[str]:
    from importlib import metadata

    def v(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    main = f"python {platform.python_version()}, dask {v('dask')}, distributed {v('distributed')}, daskinfer {v('daskinfer')}, torch {v('torch')}, transformers {v('transformers')}, numpy {v('numpy')}, pandas {v('pandas')}, pyarrow {v('pyarrow')}"
    ray = "Ray venv missing (bash benchmarks/ray-env.sh)"
    if os.path.exists(ray_python):
        code = "import platform,ray,torch,pandas,pyarrow;print(f'python {platform.python_version()}, ray {ray.__version__}, torch {torch.__version__}, pandas {pandas.__version__}, pyarrow {pyarrow.__version__}')"
        try:
            out = subprocess.run(
                [ray_python, "-c", code], check=False, capture_output=True, text=True, timeout=120
            )
            ray = out.stdout.strip() or out.stderr.strip()[-200:]
        except (OSError, subprocess.SubprocessError) as exc:
            ray = f"? ({exc})"
    return [f"- main venv: {main}", f"- Ray venv (benchmarks/.ray-venv): {ray}"]


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def write_markdown(path: str, body: list[str]) -> None:
    text = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    block = "\n".join([START, *body, END])
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = (text.rstrip() + "\n\n" if text else "# Benchmarks\n\n") + block + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--workloads", default="W1,W2,W3,W4,W6", help="comma-separated: W1,W2,W3,W4,W5,W6,W7"
    )
    p.add_argument("--engines", default="daskinfer,ray,loop")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--tiny",
        action="store_true",
        help="tiny sizes (seconds per run): checks the harness, figures mean nothing",
    )
    p.add_argument(
        "--args",
        action="append",
        default=[],
        metavar="WN=ARGS",
        help="extra script arguments for one workload, e.g. --args 'W6=--pools 1,2,4,8,16,32'",
    )
    p.add_argument("--ray-python", default=RAY_PYTHON)
    p.add_argument(
        "--out",
        default=None,
        help="markdown file (default docs/benchmarks.md; with --tiny benchmarks/.data/tiny.md)",
    )
    p.add_argument(
        "--jsonl", default=None, help="raw JSON lines (default beside --out: docs/benchmarks.jsonl)"
    )
    args = p.parse_args()

    out = args.out or (
        os.path.join(HERE, ".data", "tiny.md")
        if args.tiny
        else os.path.join(ROOT, "docs", "benchmarks.md")
    )
    jsonl = args.jsonl or os.path.splitext(out)[0] + ".jsonl"
    engines = [e for e in args.engines.split(",") if e]
    extra: dict[str, list[str]] = {}
    for item in args.args:
        wl, _, rest = item.partition("=")
        extra.setdefault(wl.strip().upper(), []).extend(shlex.split(rest))
    workloads = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    groups = [cases_for(w, engines, args.tiny, extra) for w in workloads]
    cases = [c for g in groups for c in g]
    command = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(os.path.abspath(sys.argv[0]), ROOT), *sys.argv[1:]]
    )
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = _loadavg()
    os.makedirs(os.path.dirname(os.path.abspath(jsonl)), exist_ok=True)
    t0 = time.time()
    with open(jsonl, "w") as raw:
        for rep in range(args.reps):
            for group in groups:
                # engines of one workload variant one after another; the order rotates per repetition
                k = rep % max(1, len(group))
                for case in group[k:] + group[:k]:
                    rec = run_case(case, rep, args.ray_python)
                    case.runs.append(rec)
                    raw.write(json.dumps(rec) + "\n")
                    raw.flush()
                    status = (
                        "ok"
                        if rec.get("correct")
                        else f"FAILED: {rec.get('error', 'correct=false')}"
                    )
                    print(
                        f"[rep {rep + 1}/{args.reps}] {case.label}: {rec.get('elapsed_s')} s {status}",
                        file=sys.stderr,
                        flush=True,
                    )
    total = time.time() - t0
    table, targets = summarize(cases)
    body = [
        "",
        f"Generated by `{command}` on {started:%Y-%m-%d %H:%M} UTC; {args.reps} repetition(s), "
        f"{total / 60:.1f} min in all; load average {load_start} at the start, {_loadavg()} at the end."
        + (
            " **Tiny sizes: these figures check the harness and mean nothing.**"
            if args.tiny
            else ""
        ),
        "",
        "### Targets",
        "",
        "Ratios of medians.",
        "",
        *targets,
        "",
        "### Figures (median, min, max over the correct runs)",
        "",
        *table,
        "",
        "### Machine",
        "",
        *machine(),
        "",
        "### Versions",
        "",
        *versions(args.ray_python),
        "",
        f"Raw JSON lines, one per run, with each run's command: `{os.path.relpath(os.path.abspath(jsonl), ROOT)}`.",
        "",
    ]
    write_markdown(out, body)
    print(f"wrote {out} and {jsonl} ({total / 60:.1f} min)", file=sys.stderr)


if __name__ == "__main__":
    main()
