"""Whole-dataset aggregates (Ray Data's ``sum``, ``min``, ``max``, ``mean``, ``std``, ``unique``).

Each block is reduced on its worker to one row of partial results per column (a whole-
block stage that fuses into the stage before it), so only those rows travel to the
client, which combines them. The standard deviation combines per-block counts, means
and sums of squared deviations (Chan et al.'s parallel form of Welford's method, as
Ray Data's ``Std`` does), so it is as stable as a single pass over all rows.

Nulls are ``None``, ``NaN`` and ``NaT`` (pandas' ``isna``), as in Ray Data: skipped with
``ignore_nulls=True``; with ``False``, a column holding one gives ``None``. An empty
dataset, or a column of nulls only, gives ``None``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

#: the partial results a block gives for one column
PARTIAL_COLUMN = "partials"

#: the kinds that need numbers
NUMERIC_KINDS = ("sum", "mean", "std")
#: the key of the partial result that counts a block's rows
ROWS = "__rows__"


@dataclasses.dataclass
class Partial:
    """One column's partial results over some rows: the non-null ones' count, sum,
    min, max, mean and sum of squared deviations from that mean, and the nulls' count."""

    count: int = 0
    nulls: int = 0
    total: Any = None
    low: Any = None
    high: Any = None
    mean: float = 0.0
    m2: float = 0.0

    def merge(self, other: Partial) -> Partial:
        if other.count == 0:
            return dataclasses.replace(self, nulls=self.nulls + other.nulls)
        if self.count == 0:
            return dataclasses.replace(other, nulls=self.nulls + other.nulls)
        n = self.count + other.count
        delta = other.mean - self.mean
        return Partial(
            count=n,
            nulls=self.nulls + other.nulls,
            total=_add(self.total, other.total),
            low=_pick(min, self.low, other.low),
            high=_pick(max, self.high, other.high),
            mean=self.mean + delta * other.count / n,
            m2=self.m2 + other.m2 + delta * delta * self.count * other.count / n,
        )


def _add(a: Any, b: Any) -> Any:
    return b if a is None else a if b is None else a + b


def _pick(choose: Any, a: Any, b: Any) -> Any:
    return b if a is None else a if b is None else choose(a, b)


def _numeric(values: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(values.dtype) or pd.api.types.is_bool_dtype(values.dtype)


def partial_of(values: pd.Series, kinds: Sequence[str]) -> Partial:
    """One block's partial results for one column (``kinds``: those asked for)."""
    nulls = values.isna()
    kept = values[~nulls]
    part = Partial(count=len(kept), nulls=int(nulls.sum()))
    if not len(kept):
        return part
    if "sum" in kinds:
        part.total = kept.sum()
    if "min" in kinds:
        part.low = kept.min()
    if "max" in kinds:
        part.high = kept.max()
    if "mean" in kinds or "std" in kinds:
        numbers = kept.to_numpy(dtype=np.float64)
        part.mean = float(numbers.mean())
        part.m2 = float(((numbers - part.mean) ** 2).sum())
    return part


@dataclasses.dataclass(frozen=True)
class PartialAggregates:
    """The whole-block function: a block in, one row of ``Partial`` per column out.

    Plain and picklable: it runs on the workers.
    """

    call: str
    #: each column, with the kinds of aggregate asked of it
    wanted: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def __name__(self) -> str:
        """The stage's name in ``explain()``, ``stats()`` and the dashboard."""
        return self.call

    def __call__(self, block: pd.DataFrame) -> pd.DataFrame:
        missing = [c for c, _ in self.wanted if c not in block.columns]
        if missing:
            raise KeyError(
                f"{self.call}: no column {missing[0]!r} (the columns are {list(block.columns)})"
            )
        parts = {ROWS: Partial(count=len(block))}
        for name, kinds in self.wanted:
            values = block[name]
            if any(k in NUMERIC_KINDS for k in kinds) and not _numeric(values):
                raise TypeError(
                    f"{self.call}({name!r}): the column holds {values.dtype}, not numbers"
                )
            parts[name] = partial_of(values, kinds)
        cell = np.empty(1, dtype=object)
        cell[0] = parts
        return pd.DataFrame({PARTIAL_COLUMN: cell})


def combine(rows: Sequence[dict[str, Partial]], columns: Sequence[str]) -> dict[str, Partial]:
    """All blocks' partial results, column by column, and their rows under ``ROWS``."""
    names = (*columns, ROWS)
    merged = {name: Partial() for name in names}
    for row in rows:
        merged = {name: merged[name].merge(row[name]) for name in names}
    return merged


def finish(kind: str, part: Partial, *, ignore_nulls: bool, ddof: int = 1) -> Any:
    """The aggregate of one column from its combined partial results."""
    if part.count == 0 or (part.nulls and not ignore_nulls):
        return None
    if kind == "sum":
        value = part.total
    elif kind == "min":
        value = part.low
    elif kind == "max":
        value = part.high
    elif kind == "mean":
        value = part.mean
    else:  # std; one value has no spread (Ray Data's Std gives 0.0 for it, whatever ddof)
        value = 0.0 if part.count < 2 else math.sqrt(part.m2 / max(part.count - ddof, 1))
    return value.item() if isinstance(value, np.generic) else value


@dataclasses.dataclass(frozen=True)
class UniqueValues:
    """The whole-block function of ``unique``: a block's distinct values of one column,
    in order of first appearance. Plain and picklable: it runs on the workers."""

    column: str

    @property
    def __name__(self) -> str:
        return "unique"

    def __call__(self, block: pd.DataFrame) -> pd.DataFrame:
        if self.column not in block.columns:
            raise KeyError(
                f"unique: no column {self.column!r} (the columns are {list(block.columns)})"
            )
        cell = np.empty(1, dtype=object)
        cell[0] = list(pd.unique(block[self.column].to_numpy(dtype=object)))
        return pd.DataFrame({PARTIAL_COLUMN: cell})


def merge_unique(lists: Sequence[list[Any]], *, ignore_nulls: bool) -> list[Any]:
    """The distinct values of all blocks, in order of first appearance; every kind of
    null (None, NaN, NaT, pandas' NA) is one value, ``None``, as Arrow's null in Ray."""
    values = np.empty(sum(len(v) for v in lists), dtype=object)
    values[:] = [None if _is_null(v) else v for block in lists for v in block]
    distinct = [v.item() if isinstance(v, np.generic) else v for v in pd.unique(values)]
    if ignore_nulls:
        distinct = [v for v in distinct if v is not None]
    return distinct


def _is_null(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # an array or other container: not a null
        return False
