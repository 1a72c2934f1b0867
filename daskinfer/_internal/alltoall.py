"""Ray Data's all-to-all verbs (``sort``, ``random_shuffle``, ``groupby``), done by dask.

Every output block of these may need rows from every input block, so they cannot
stream: like Ray Data, they hold all their input first. daskinfer runs the pipeline up
to the verb (``to_dask()``: its blocks stay on the workers), lets dask move the rows
between workers (``sort_values``: quantile boundaries, then a shuffle; a random shuffle
is a sort on random draws), persists the result on the cluster and continues from it,
as ``from_dask`` of a persisted frame.

dask's task-based shuffle is used rather than its peer-to-peer one: the latter converts
partitions to Arrow, which blocks of per-row arrays or tensor columns do not survive.

The functions named here run on the workers: plain and picklable, holding no client.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from daskinfer._internal.batching import batch_to_block, block_to_batch, concat_blocks

SHUFFLE_METHOD = "tasks"
#: the column of random draws that ``random_shuffle`` sorts on, dropped after
SHUFFLE_KEY = "__daskinfer_shuffle_key"


def persisted(frame: Any) -> Any:
    """``frame`` computed and held on the cluster; errors (unsortable values) raise here."""
    from distributed import wait

    from daskinfer.cluster import current_client

    client = current_client()
    with client.as_current():
        held = client.persist(frame)
        wait(held)
    for future in client.futures_of(held):
        if future.status == "error":
            future.result()  # raises the task's exception, with the worker's traceback
    return held


def sort_frame(frame: Any, keys: list[str], ascending: list[bool]) -> Any:
    """``frame`` sorted by ``keys``; rows with equal keys end in one partition (dask
    partitions by the first key's quantiles), in input order (a stable sort)."""
    from daskinfer.cluster import current_client

    with current_client().as_current():  # the boundaries are computed now, on the cluster
        return frame.sort_values(
            keys if len(keys) > 1 else keys[0],
            ascending=ascending if len(ascending) > 1 else ascending[0],
            sort_function=_stable_sort,
            sort_function_kwargs={"by": keys, "ascending": ascending},
            shuffle_method=SHUFFLE_METHOD,
        )


def _stable_sort(block: pd.DataFrame, by: list[str], ascending: list[bool], **_: Any) -> Any:
    return block.sort_values(by, ascending=ascending, kind="stable", na_position="last")


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each value (splitmix64's finaliser): well-mixed draws from
    ``seed`` and a position with no state, so a row's draw does not depend on its block."""
    z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def add_shuffle_key(
    block: pd.DataFrame,
    seed: int,
    offsets: Sequence[int],
    partition_info: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """``block`` with each row's random draw, from ``seed`` and the row's position in
    the dataset (``offsets``: where each block starts)."""
    start = offsets[partition_info["number"]] if partition_info else 0
    positions = np.arange(start, start + len(block), dtype=np.uint64)
    with np.errstate(over="ignore"):
        draws = _splitmix64(_splitmix64(positions ^ np.uint64(seed)))
    return block.assign(**{SHUFFLE_KEY: (draws >> np.uint64(1)).astype(np.int64)})


def shuffle_frame(frame: Any, rows: Sequence[int], seed: int, num_blocks: int | None) -> Any:
    """``frame``'s rows in the order of their random draws: a sort on them.

    The draws depend only on the seed and the rows' positions (``rows``: each block's
    count), and the order is theirs across all blocks, so a seed gives one order
    however the pipeline cut its blocks and however many come out (a hash partitioning
    would tie the order to the number of blocks).
    """
    from daskinfer.cluster import current_client

    offsets = [0, *itertools.accumulate(rows)][:-1]
    keyed = frame.map_partitions(
        add_shuffle_key, seed=seed, offsets=offsets, meta=_with_key_meta(frame._meta)
    )
    with current_client().as_current():  # the boundaries are computed now, on the cluster
        moved = keyed.sort_values(
            SHUFFLE_KEY,
            npartitions=num_blocks or frame.npartitions,
            shuffle_method=SHUFFLE_METHOD,
        )
    return moved.map_partitions(_drop_key, meta=frame._meta)


def _with_key_meta(meta: pd.DataFrame) -> pd.DataFrame:
    return meta.assign(**{SHUFFLE_KEY: np.array([], dtype=np.int64)})


def _drop_key(block: pd.DataFrame) -> pd.DataFrame:
    return block.drop(columns=[SHUFFLE_KEY]).reset_index(drop=True)


def group_runs(block: pd.DataFrame, keys: Sequence[str]) -> list[pd.DataFrame]:
    """A sorted block cut into its groups, in order (each group's rows are adjacent)."""
    if not len(block):
        return []
    values = block[list(keys)]
    # a new group starts where any key differs from the row before (nulls equal nulls)
    changed = np.zeros(len(block), dtype=bool)
    changed[0] = True
    for name in keys:
        column = values[name]
        same = (column.shift() == column) | (column.isna() & column.shift().isna())
        changed |= ~same.to_numpy(dtype=bool, na_value=False)
    starts = [*np.flatnonzero(changed).tolist(), len(block)]
    return [block.iloc[a:b].reset_index(drop=True) for a, b in itertools.pairwise(starts)]


@dataclasses.dataclass(frozen=True)
class GroupsApplier:
    """A whole-block function: ``fn`` called on each group of a sorted block.

    ``fn`` is the user's function, or, in an actor (a callable class given to
    ``map_groups``), built on the worker from ``cls`` and its arguments (see
    ``GroupsActor``).
    """

    fn: Callable[..., Any]
    keys: tuple[str, ...]
    batch_format: str
    fn_args: tuple[Any, ...] = ()
    fn_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def __name__(self) -> str:
        """The stage's name in ``explain()``, ``stats()`` and the dashboard."""
        inner = getattr(self.fn, "__name__", None) or type(self.fn).__name__
        return f"map_groups({inner})"

    def __call__(self, block: pd.DataFrame) -> pd.DataFrame:
        return apply_to_groups(
            self.fn, block, self.keys, self.batch_format, self.fn_args, self.fn_kwargs
        )


class GroupsActor:
    """``map_groups`` with a callable class: the class is built once per actor."""

    def __init__(
        self,
        cls: type,
        keys: tuple[str, ...],
        batch_format: str,
        fn_args: tuple[Any, ...],
        fn_kwargs: Mapping[str, Any],
        ctor_args: tuple[Any, ...],
        ctor_kwargs: Mapping[str, Any],
    ) -> None:
        instance = cls(*ctor_args, **ctor_kwargs)
        self.apply = GroupsApplier(instance, keys, batch_format, fn_args, fn_kwargs)

    def __call__(self, block: pd.DataFrame) -> pd.DataFrame:
        return self.apply(block)


def apply_to_groups(
    fn: Callable[..., Any],
    block: pd.DataFrame,
    keys: Sequence[str],
    batch_format: str,
    fn_args: Sequence[Any],
    fn_kwargs: Mapping[str, Any],
) -> pd.DataFrame:
    outputs = []
    for group in group_runs(block, keys):
        result = fn(block_to_batch(group, batch_format), *fn_args, **fn_kwargs)
        outputs.append(batch_to_block(result))
    return concat_blocks(outputs) if outputs else block.iloc[:0]


def grouped_frame(frame: Any, keys: list[str], kind: str, columns: list[str], ddof: int = 1) -> Any:
    """One row per group: its keys, then ``kind(column)`` (Ray's names), sorted by key."""
    grouped = frame.groupby(keys, dropna=False, sort=False)
    # split_out=1 spelled out: with dask 2026.8, persisting a grouped reduction over 16
    # or more partitions with split_out left to dask loses groups (100 groups over 31
    # partitions persisted as 23; compute() gives all 100); the result is one partition
    if kind == "count":
        out = grouped.size(split_out=1).to_frame("count()")
    else:
        selected = grouped[columns]
        if kind == "std":
            out = selected.std(ddof=ddof, split_out=1)
        else:
            out = getattr(selected, kind)(split_out=1)
        out = out.rename(columns={c: f"{kind}({c})" for c in columns})
    out = out.reset_index()
    return sort_frame(out, keys, [True] * len(keys))
