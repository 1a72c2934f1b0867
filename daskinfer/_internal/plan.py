"""Logical plan: frozen dataclasses, one per Dataset verb. No Dask client here."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from daskinfer._internal.transforms import Transform


@dataclasses.dataclass(frozen=True, eq=False)
class DaskSource:
    """Blocks are the partitions of a dask DataFrame."""

    frame: Any
    name: str
    rows: int | None = None  # where the reader knows it (in-memory data, range)
    # for files: what identifies the blocks again after a crash (resumable writes)
    files: tuple[str, ...] = ()
    storage_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # rows of each block, where the reader cut the blocks itself (range): a stage with a
    # batch_size may then fuse into the reads (see planner._fusable)
    block_rows: tuple[int, ...] | None = None
    # made by a from_* (from_pandas, from_items, from_dask ...), which Ray Data returns
    # as a MaterializedDataset: its blocks (the partitions) are known without a run
    materialized: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class BlocksSource:
    """Blocks already computed and held on workers (``materialize``)."""

    futures: tuple[Any, ...]
    rows: tuple[int, ...]
    nbytes: tuple[int, ...]
    name: str = "Materialized"


Source = DaskSource | BlocksSource


@dataclasses.dataclass(frozen=True, eq=False)
class MapStage:
    """A stage that maps blocks: a function as tasks, or a class in an actor pool.

    ``batch_size=None`` means whole blocks: such a stage may fuse into the stage before
    it. A stage with a ``batch_size`` re-batches its input across block boundaries.
    """

    name: str
    transform: Transform
    batch_size: int | None = None
    resources: Mapping[str, float] = dataclasses.field(default_factory=dict)
    concurrency: int | None = None
    actor_class: type | None = None
    ctor_args: tuple[Any, ...] = ()
    ctor_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    pool_min: int = 0
    pool_max: int | None = 0  # None: no maximum (grows while workers have room)
    pool_initial: int = 0
    max_tasks_in_flight_per_actor: int | None = None

    @property
    def is_actor(self) -> bool:
        """Whether this stage runs in an actor pool."""
        return self.actor_class is not None


@dataclasses.dataclass(frozen=True)
class Limit:
    """Keep the first ``n`` rows."""

    n: int
    name: str = "Limit"


@dataclasses.dataclass(frozen=True)
class Repartition:
    """Re-cut the rows into ``n`` blocks (a barrier).

    Without ``shuffle``, blocks of near-equal size, in order. With it, as Ray Data's
    ``repartition(n, shuffle=True)``: every input block is cut into ``n`` contiguous
    slices of ``ceil(rows / n)`` rows, and output block ``i`` joins the ``i``-th slices of
    all input blocks (an all-to-all exchange; deterministic, not random).
    """

    n: int
    name: str = "Repartition"
    shuffle: bool = False


Op = MapStage | Limit | Repartition


@dataclasses.dataclass(frozen=True, eq=False)
class LogicalPlan:
    """A source and the ops applied to it, in order."""

    source: Source
    ops: tuple[Op, ...] = ()

    def with_op(self, op: Op) -> LogicalPlan:
        """Return a new plan with ``op`` appended."""
        return LogicalPlan(self.source, (*self.ops, op))

    def describe(self) -> Sequence[str]:
        """Names of the source and every op."""
        return [self.source.name, *(op.name for op in self.ops)]
