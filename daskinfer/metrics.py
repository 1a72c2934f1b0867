"""Statistics of a run: plain snapshots the executor fills in."""

from __future__ import annotations

import dataclasses

__all__ = ["OperatorStats", "RunStats"]


@dataclasses.dataclass
class OperatorStats:
    """Figures of one physical operator (a fused stage, a pool, a limit ...)."""

    name: str
    tasks: int = 0
    blocks_in: int = 0
    blocks_out: int = 0
    rows_in: int = 0
    rows_out: int = 0
    bytes_out: int = 0
    task_seconds: float = 0.0
    actors_started: int = 0
    actors_released: int = 0
    actors_lost: int = 0
    retries: int = 0
    max_actors: int = 0
    actor_events: list[tuple[float, int]] = dataclasses.field(default_factory=list)

    def record_task(self, rows_out: int, nbytes: int, seconds: float) -> None:
        """Account one finished task."""
        self.tasks += 1
        self.rows_out += rows_out
        self.bytes_out += nbytes
        self.task_seconds += seconds


@dataclasses.dataclass
class RunStats:
    """Figures of one execution, with a readable ``str()``."""

    run_id: str
    operators: list[OperatorStats] = dataclasses.field(default_factory=list)
    wall_s: float = 0.0
    rows_out: int = 0
    tasks_submitted: int = 0
    blocks_produced: int = 0
    max_live_blocks: int = 0
    max_live_bytes: int = 0

    def __str__(self) -> str:
        lines = [
            f"run {self.run_id}: {self.rows_out} rows out in {self.wall_s:.2f} s, "
            f"{self.tasks_submitted} tasks, at most {self.max_live_blocks} blocks "
            f"({self.max_live_bytes / 2**20:.1f} MiB) alive at once"
        ]
        for op in self.operators:
            extra = f", actors started {op.actors_started} (max {op.max_actors})" if op.actors_started else ""
            lines.append(
                f"  {op.name}: {op.tasks} tasks, {op.rows_out} rows out, "
                f"{op.bytes_out / 2**20:.1f} MiB{extra}"
            )
        return "\n".join(lines)
