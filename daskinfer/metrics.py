"""Statistics of a run: plain objects the executor fills in as it goes.

``Dataset.stats()`` returns a :class:`RunStats`. Its fields are for programs; its
``str()`` is the report for people, ending with the stage that limited throughput and why.
The same figures feed the progress bars, the dashboard page and the Prometheus metrics
(see :meth:`RunStats.snapshot`).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["LATENCY_BUCKETS_S", "OperatorStats", "RunStats"]

# upper bounds of the stage-latency histogram (seconds from submission to result)
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)


@dataclasses.dataclass
class OperatorStats:
    """Figures of one physical operator (a fused stage, a pool, a limit ...).

    Times are seconds. ``compute_s`` is time inside the stage's code on the workers (the
    user's functions or predictor), measured there; ``wait_input_s`` is wall time during
    which the stage had room for more work but no input to give it; ``blocked_output_s``
    is wall time during which it had input and room but the next stage (or the consumer)
    had not taken its earlier output: backpressure.
    """

    name: str
    kind: str = "tasks"  # source | tasks | actors | limit | repartition
    tasks: int = 0
    blocks_in: int = 0
    blocks_out: int = 0
    rows_in: int = 0
    rows_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    task_seconds: float = 0.0  # submission to result, summed over tasks
    compute_s: float = 0.0
    wait_input_s: float = 0.0
    blocked_output_s: float = 0.0
    first_submit_s: float | None = None  # since the run started
    finished_s: float | None = None
    slots: int = 1  # tasks (or actors) the stage can run at once, at its widest
    actors_started: int = 0
    actors_released: int = 0
    actors_lost: int = 0
    retries: int = 0
    errors: int = 0
    quarantined_rows: int = 0  # set aside by on_error ("skip" or "quarantine")
    oom_splits: int = 0
    timeouts: int = 0  # batches that ran past timeout_s (their worker was restarted)
    max_actors: int = 0
    tasks_measured: int = 0  # tasks (or actor calls) whose time in code was reported
    bundle_growths: int = 0  # times the pool grew its work per call (overhead-bound)
    actor_events: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    counters: dict[str, float] = dataclasses.field(default_factory=dict)
    gpu_busy_samples: int = 0
    gpu_busy_sum: float = 0.0
    latency_counts: list[int] = dataclasses.field(
        default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1)
    )
    latency_sum_s: float = 0.0

    def record_task(self, rows_out: int, nbytes: int, seconds: float) -> None:
        """Account one finished task (``seconds``: from submission to its result)."""
        self.tasks += 1
        self.rows_out += rows_out
        self.bytes_out += nbytes
        self.task_seconds += seconds
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.latency_sum_s += seconds

    def add_counters(self, counters: Mapping[str, Any]) -> None:
        """Fold counters a predictor reported (``daskinfer_metrics()``) into the totals."""
        for name, value in counters.items():
            try:
                self.counters[str(name)] = self.counters.get(str(name), 0.0) + float(value)
            except (TypeError, ValueError):
                continue  # a counter we cannot add up is not worth failing a job for

    # --- derived figures ------------------------------------------------------
    def wall_s(self, now_s: float | None = None) -> float:
        """Seconds from the stage's first task to its end (or to ``now_s``)."""
        if self.first_submit_s is None:
            return 0.0
        end = self.finished_s if self.finished_s is not None else now_s
        return max(0.0, (end or self.first_submit_s) - self.first_submit_s)

    def rows_per_s(self, now_s: float | None = None) -> float:
        wall = self.wall_s(now_s)
        return self.rows_out / wall if wall > 0 else 0.0

    def busy_fraction(self, now_s: float | None = None) -> float:
        """Share of the stage's slots kept busy by its own code over its wall time."""
        wall = self.wall_s(now_s)
        return min(1.0, self.compute_s / (wall * max(1, self.slots))) if wall > 0 else 0.0

    @property
    def gpu_busy(self) -> float | None:
        """Mean GPU utilisation (0-1) sampled by NVML on the stage's GPU workers."""
        return self.gpu_busy_sum / self.gpu_busy_samples if self.gpu_busy_samples else None

    @property
    def padding_waste(self) -> tuple[float, float] | None:
        """Padded tokens over real tokens (before, after) where token-aware batching ran.

        "Before" is what fixed batches in input order would have computed.
        """
        real = self.counters.get("tokens_real", 0.0)
        if real <= 0 or "tokens_padded" not in self.counters:
            return None
        before = self.counters.get("tokens_padded_in_order", self.counters["tokens_padded"])
        return before / real, self.counters["tokens_padded"] / real

    def latency_buckets(self) -> list[tuple[float, int]]:
        """Cumulative histogram: (upper bound, count), the last bound being +inf."""
        out, total = [], 0
        for bound, count in zip((*LATENCY_BUCKETS_S, math.inf), self.latency_counts, strict=True):
            total += count
            out.append((bound, total))
        return out


@dataclasses.dataclass
class RunStats:
    """Figures of one execution, with a readable ``str()``."""

    run_id: str
    pipeline: str = ""
    operators: list[OperatorStats] = dataclasses.field(default_factory=list)
    wall_s: float = 0.0
    rows_out: int = 0
    tasks_submitted: int = 0
    blocks_produced: int = 0
    max_live_blocks: int = 0
    max_live_bytes: int = 0
    state: str = "running"  # running | finished | failed | not executed
    error: str | None = None
    started_at: float = dataclasses.field(default_factory=time.time)  # epoch seconds
    _started_mono: float = dataclasses.field(default_factory=time.monotonic, repr=False)
    # rows set aside by on_error="quarantine", with their errors (pandas frames)
    quarantine: list[Any] = dataclasses.field(default_factory=list, repr=False)
    # a resumable write that continued an earlier one: source blocks (and their rows)
    # that the earlier run had written and this one skipped
    resumed_blocks: int = 0
    resumed_rows: int = 0

    @classmethod
    def not_executed(cls) -> RunStats:
        return cls(run_id="", state="not executed")

    def quarantined(self) -> Any:
        """The rows ``on_error="quarantine"`` set aside: their input columns plus
        ``_error``, ``_traceback`` and ``_stage`` (a ``pandas.DataFrame``, maybe empty)."""
        import pandas as pd

        if not self.quarantine:
            return pd.DataFrame(columns=["_error", "_traceback", "_stage"])
        return pd.concat(self.quarantine, ignore_index=True)

    def elapsed_s(self) -> float:
        return self.wall_s if self.state != "running" else time.monotonic() - self._started_mono

    def operator(self, name: str) -> OperatorStats:
        """The stage called ``name`` (as ``explain()`` and ``str()`` print it)."""
        for op in self.operators:
            if op.name == name:
                return op
        raise KeyError(f"no stage {name!r}; stages: {[op.name for op in self.operators]}")

    def bottleneck(self) -> tuple[OperatorStats, str] | None:
        """The stage that limited throughput, and why, in words."""
        now = self.elapsed_s()
        working = [
            op for op in self.operators if op.kind in ("source", "tasks", "actors") and op.tasks
        ]
        if not working:
            return None
        top = max(working, key=lambda op: (op.busy_fraction(now), op.compute_s))
        busy = top.busy_fraction(now)
        unit = "actors" if top.kind == "actors" else "task slots"
        reason = f"its code kept {busy:.0%} of its {top.slots} {unit} busy"
        up = [
            op
            for op in self.operators
            if op.blocked_output_s > 0.05 and self.operators.index(op) < self.operators.index(top)
        ]
        down = [
            op
            for op in self.operators
            if op.wait_input_s > 0.05 and self.operators.index(op) > self.operators.index(top)
        ]
        if up:
            reason += "; upstream " + ", ".join(
                f"{op.name} waited {op.blocked_output_s:.1f} s for it to take output" for op in up
            )
        if down:
            reason += "; downstream " + ", ".join(
                f"{op.name} waited {op.wait_input_s:.1f} s for input" for op in down
            )
        if busy < 0.5:
            reason += (
                " (no stage was busy more than half the time: the job is limited by "
                "scheduling overhead, data transfer or the consumer)"
            )
        return top, reason

    def __str__(self) -> str:
        if self.state == "not executed":
            return "Dataset has not been executed yet"
        wall = self.elapsed_s()
        lines = [
            (
                f"run {self.run_id} ({self.state}): {self.rows_out} rows out in {wall:.2f} s "
                f"({self.rows_out / wall if wall > 0 else 0:.1f} rows/s), "
                f"{self.tasks_submitted} tasks, at most {self.max_live_blocks} blocks "
                f"({self.max_live_bytes / 2**20:.1f} MiB) alive at once"
            )
        ]
        if self.resumed_blocks:
            lines.append(
                f"  resumed: {self.resumed_blocks} source blocks ({self.resumed_rows} rows) were "
                "written before and skipped"
            )
        for op in self.operators:
            lines.append(
                f"  {op.name}: {op.tasks} tasks, {op.rows_in} rows in, {op.rows_out} rows out "
                f"in {op.blocks_out} blocks, {op.bytes_out / 2**20:.1f} MiB out; "
                f"{op.rows_per_s(wall):.1f} rows/s over {op.wall_s(wall):.2f} s"
            )
            if op.kind in ("source", "tasks", "actors") and op.tasks:
                lines.append(
                    f"      time in code {op.compute_s:.2f} s (busy {op.busy_fraction(wall):.0%} "
                    f"of {op.slots} {'actors' if op.kind == 'actors' else 'slots'}), waiting for "
                    f"input {op.wait_input_s:.2f} s, blocked on output {op.blocked_output_s:.2f} s"
                )
            extras = []
            if op.actors_started:
                extras.append(
                    f"actors started {op.actors_started} (max {op.max_actors} at once), "
                    f"lost {op.actors_lost}"
                )
            if op.bundle_growths:
                extras.append(
                    f"work per call grown {op.bundle_growths}x (actors idled between calls)"
                )
            if op.retries:
                extras.append(f"retries {op.retries}")
            if op.errors or op.quarantined_rows:
                extras.append(f"errors {op.errors}, rows quarantined {op.quarantined_rows}")
            if op.timeouts:
                extras.append(f"batches timed out {op.timeouts}")
            if op.oom_splits:
                extras.append(f"out-of-memory splits {op.oom_splits}")
            if op.padding_waste is not None:
                before, after = op.padding_waste
                extras.append(f"padded/real tokens {before:.2f} in input order -> {after:.2f}")
            if op.gpu_busy is not None:
                extras.append(f"GPU busy {op.gpu_busy:.0%} (NVML)")
            if extras:
                lines.append("      " + "; ".join(extras))
        found = self.bottleneck()
        if found is not None:
            lines.append(f"bottleneck: {found[0].name}: {found[1]}")
        if self.error:
            lines.append(f"error: {self.error.splitlines()[0]}")
        return "\n".join(lines)

    def snapshot(
        self, stage_state: Mapping[str, Mapping[str, Any]] | None = None
    ) -> dict[str, Any]:
        """A plain dict of the figures (msgpack-friendly), for the dashboard and /metrics.

        ``stage_state`` adds live figures only the executor knows (in flight, queued,
        actors busy), keyed by stage name.
        """
        wall = self.elapsed_s()
        stages = []
        for op in self.operators:
            live = dict((stage_state or {}).get(op.name, {}))
            stages.append(
                {
                    "name": op.name,
                    "kind": op.kind,
                    "rows_done": op.rows_out,
                    "rows_in": op.rows_in,
                    "rows_expected": live.pop("rows_expected", None),
                    "rows_per_s": op.rows_per_s(wall),
                    "batches_done": op.tasks,
                    "bytes_out": op.bytes_out,
                    "in_flight": live.pop("in_flight", 0),
                    "queued": live.pop("queued", 0),
                    "actors_alive": live.pop("actors_alive", 0),
                    "actors_busy": live.pop("actors_busy", 0),
                    "actor_workers": list(live.pop("actor_workers", [])),
                    "actors_started": op.actors_started,
                    "actors_lost": op.actors_lost,
                    "retries": op.retries,
                    "errors": op.errors,
                    "quarantined_rows": op.quarantined_rows,
                    "oom_splits": op.oom_splits,
                    "timeouts": op.timeouts,
                    "task_seconds": op.task_seconds,
                    "compute_s": op.compute_s,
                    "wait_input_s": op.wait_input_s,
                    "blocked_output_s": op.blocked_output_s,
                    "busy_fraction": op.busy_fraction(wall),
                    "latency_buckets": [[b, c] for b, c in op.latency_buckets()],
                    "latency_sum_s": op.latency_sum_s,
                    "gpu_busy": op.gpu_busy,
                    **live,
                }
            )
        found = self.bottleneck()
        return {
            "run": self.run_id,
            "pipeline": self.pipeline,
            "state": self.state,
            "error": self.error,
            "started": self.started_at,
            "time": time.time(),
            "wall_s": wall,
            "rows_out": self.rows_out,
            "bottleneck": None if found is None else {"stage": found[0].name, "reason": found[1]},
            "stages": stages,
        }
