"""Logical plan -> physical plan: fuse adjacent CPU stages, attach resources."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from daskinfer._internal import shipping
from daskinfer._internal.plan import (
    BlocksSource,
    Limit,
    LogicalPlan,
    MapStage,
    Repartition,
    Source,
)
from daskinfer._internal.transforms import Transform
from daskinfer.cluster import CPU


@dataclasses.dataclass(frozen=True, eq=False)
class SourceSpec:
    """Produce the source's blocks, with whole-block transforms fused in.

    ``resources``: what a fused stage asks of Dask for each task (CPUs only; reads ask
    for nothing of their own)."""

    source: Source
    transforms: tuple[Transform, ...]
    name: str
    resources: Mapping[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, eq=False)
class TaskStageSpec:
    """Re-batch input to ``batch_size`` rows and run fused transforms as tasks."""

    transforms: tuple[Transform, ...]
    batch_size: int | None
    resources: Mapping[str, float]
    concurrency: int | None
    name: str


@dataclasses.dataclass(frozen=True, eq=False)
class ActorStageSpec:
    """Run batches through a pool of predictor actors."""

    stage: MapStage
    name: str


@dataclasses.dataclass(frozen=True)
class LimitSpec:
    """Pass through the first ``n`` rows, then stop everything upstream."""

    n: int
    name: str


@dataclasses.dataclass(frozen=True)
class RepartitionSpec:
    """Barrier: wait for all input, then cut it into ``n`` blocks (see ``Repartition``)."""

    n: int
    name: str
    shuffle: bool = False


PhysicalOp = SourceSpec | TaskStageSpec | ActorStageSpec | LimitSpec | RepartitionSpec


def _source_block_rows(source: Source) -> tuple[int, ...] | None:
    if isinstance(source, BlocksSource):
        return source.rows
    return source.block_rows


def _one_batch_per_block(batch_size: int, into: SourceSpec) -> bool:
    """Whether every block of the source is exactly one batch of ``batch_size`` rows (the
    last may be shorter), so that running the stage inside the reads gives it the same
    batches as re-cutting them would.

    Then fusing is never worse: the stage's own tasks could not split a batch either,
    and a read and a separate task per block would cost two tasks and a transfer. With
    W2's shape (200 reads of one batch each, a CPU stage of 20 ms a batch, then a
    predictor, no ``num_cpus``) the reads and the stage's tasks shared the CPU workers'
    threads, each task waited for its block to come from the other worker, the threads
    were busy half the time, and the predictor's gaps between calls summed to 0.12-0.51 s
    in 5 runs; fused, 0.13-0.18 s.
    Blocks of several batches do not fuse: a block's batches would run one after
    another in one task, where separate tasks run them side by side.
    """
    rows = _source_block_rows(into.source)
    if into.transforms or not rows:
        return False  # a fused transform may have changed the rows
    return all(r == batch_size for r in rows[:-1]) and 0 < rows[-1] <= batch_size


def _asked(resources: Mapping[str, float]) -> dict[str, float]:
    """The resources asked for, without those asked at 0."""
    return {k: v for k, v in resources.items() if v}


def _resources_fuse_into_read(stage: MapStage, into: SourceSpec) -> bool:
    """Whether the reads can run ``stage`` with the resources it asks for, as Ray fuses
    a read with a ``map_batches(num_cpus=1)``.

    CPUs only: a read on an accelerator's worker would take the threads that feed it.
    And only a stage whose function travels inside each task (see ``shipping``): a
    large one travels as a dependency, and Dask would send every read, which then asks
    for a CPU and cannot be pinned to a worker, to the one worker holding it.
    """
    resources = _asked(stage.resources)
    if not resources and not into.resources:
        return True
    if any(k != CPU for k in resources):
        return False
    if resources and into.resources and dict(into.resources) != resources:
        return False
    return shipping.travel_inline((*into.transforms, stage.transform))


def _fusable(stage: MapStage, into: Any) -> bool:
    if stage.is_actor or stage.concurrency is not None:
        return False
    if isinstance(into, SourceSpec):
        # a timed stage runs as its own tasks: a read task is not retried piecewise
        if getattr(stage.transform, "timeout_s", None) or not _resources_fuse_into_read(
            stage, into
        ):
            return False
        return stage.batch_size is None or _one_batch_per_block(stage.batch_size, into)
    if isinstance(into, TaskStageSpec):
        return (
            stage.batch_size is None
            and into.concurrency is None
            and _resources_fuse_into_task(stage, into)
        )
    return False


def _resources_fuse_into_task(stage: MapStage, into: TaskStageSpec) -> bool:
    """The same resources, or none after a stage that asks only for CPUs: a stage that
    asks for nothing runs anywhere, inside such a task as well (Ray fuses it too, its
    default being a CPU). Not into a stage that asks for a GPU: it would run on the
    accelerator's worker."""
    asked, held = _asked(stage.resources), _asked(into.resources)
    return asked == held or (not asked and all(k == CPU for k in held))


def plan(logical: LogicalPlan) -> list[PhysicalOp]:
    """Map a logical plan to physical operators.

    A whole-block stage (``batch_size=None``: row verbs, projections, sinks) fuses into
    the task stage before it when both ask for the same resources; a stage with a
    ``batch_size`` starts a new task stage, because exact batches need its input
    re-cut across block boundaries, unless the source's blocks are known to be one
    batch each (see ``_one_batch_per_block``). Actor stages never fuse.
    """
    ops: list[PhysicalOp] = [SourceSpec(logical.source, (), logical.source.name)]
    for op in logical.ops:
        last = ops[-1]
        if isinstance(op, MapStage):
            if _fusable(op, last):
                assert isinstance(last, SourceSpec | TaskStageSpec)
                fused = dataclasses.replace(
                    last,
                    transforms=(*last.transforms, op.transform),
                    name=f"{last.name}->{op.name}",
                )
                if isinstance(fused, SourceSpec) and not fused.resources:
                    fused = dataclasses.replace(fused, resources=_asked(op.resources))
                ops[-1] = fused
            elif op.is_actor:
                ops.append(ActorStageSpec(op, op.name))
            else:
                ops.append(
                    TaskStageSpec(
                        (op.transform,), op.batch_size, op.resources, op.concurrency, op.name
                    )
                )
        elif isinstance(op, Limit):
            ops.append(LimitSpec(op.n, f"Limit[{op.n}]"))
        elif isinstance(op, Repartition):
            shuffled = ", shuffle" if op.shuffle else ""
            ops.append(RepartitionSpec(op.n, f"Repartition[{op.n}{shuffled}]", op.shuffle))
    return ops


def explain(logical: LogicalPlan) -> str:
    """Readable logical and physical plans."""
    lines = ["Logical plan:", "  " + " -> ".join(logical.describe()), "Physical plan:"]
    for op in plan(logical):
        where = "CPU workers"
        if isinstance(op, ActorStageSpec):
            res = dict(op.stage.resources)
            hi = op.stage.pool_max
            where = f"actor pool {op.stage.pool_min}..{hi if hi is not None else 'no max'}" + (
                f" on workers with {res}" if res else " (CPU)"
            )
        elif isinstance(op, TaskStageSpec | SourceSpec) and op.resources:
            where = f"workers with {dict(op.resources)}"
        elif isinstance(op, (LimitSpec, RepartitionSpec)):
            where = "client bookkeeping + CPU workers"
        lines.append(f"  {op.name}  [{where}]")
    pushed = getattr(logical.source, "options", {}).get("filters")
    if pushed:
        # filter(expr=) handed to the Parquet reader too (io/pushdown.py)
        lines.append(f"Filters pushed into the read (dask DNF): {pushed}")
    return "\n".join(lines)
