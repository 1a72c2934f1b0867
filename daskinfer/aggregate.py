"""Ray Data's aggregate functions: ``Count``, ``Sum``, ``Min``, ``Max``, ``Mean``, ``Std``.

For ``Dataset.aggregate(*aggs)`` (a dict of values) and ``GroupedData.aggregate(*aggs)``
(a row per group); ``from ray.data.aggregate import Count, Mean`` ports by changing the
import. Each is named as Ray names it (``"count()"``, ``"mean(x)"``), or by
``alias_name``. Nulls (None, NaN, NaT) are skipped with ``ignore_nulls=True`` (the
default, except for ``Count``); with ``False`` a column holding one gives ``None``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from daskinfer.exceptions import PlanError

__all__ = ["AggregateFn", "Count", "Max", "Mean", "Min", "Std", "Sum"]


class AggregateFn:
    """One aggregate of one column (``Count`` may take none: it counts rows)."""

    kind = ""
    ddof = 1  # only Std takes another

    def __init__(
        self, on: str | None = None, ignore_nulls: bool = True, alias_name: str | None = None
    ) -> None:
        call = type(self).__name__
        if on is not None and not isinstance(on, str):
            raise PlanError(f"{call}(on={on!r}): give a column name")
        if on is None and not isinstance(self, Count):
            raise PlanError(f"{call}(): give the column to aggregate, e.g. {call}('x')")
        if not isinstance(ignore_nulls, bool):
            raise PlanError(f"{call}(ignore_nulls={ignore_nulls!r}): use True or False")
        if alias_name is not None and not isinstance(alias_name, str):
            raise PlanError(f"{call}(alias_name={alias_name!r}): give a column name")
        self.on = on
        self.ignore_nulls = ignore_nulls
        self.alias_name = alias_name

    def name(self) -> str:
        return self.alias_name or f"{self.kind}({self.on or ''})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(on={self.on!r}, alias_name={self.alias_name!r})"

    def result(self, merged: Mapping[str, Any]) -> Any:
        """The value from combined partial results (``_internal.aggregate.combine``)."""
        from daskinfer._internal import aggregate

        if not merged[aggregate.ROWS].count:
            return None  # no rows at all, as Ray Data
        assert self.on is not None
        return aggregate.finish(
            self.kind, merged[self.on], ignore_nulls=self.ignore_nulls, ddof=self.ddof
        )

    def of_group(self, group: pd.DataFrame) -> Any:
        """The value over one group's rows (``GroupedData.aggregate``): the group's own
        partial results, finished as a whole dataset's are."""
        from daskinfer._internal import aggregate

        merged = {aggregate.ROWS: aggregate.Partial(count=len(group))}
        if self.on is not None:
            merged[self.on] = aggregate.partial_of(group[self.on], (self.kind,))
        return self.result(merged)


class Count(AggregateFn):
    """Rows (``on=None``), or a column's values, nulls included unless ``ignore_nulls``."""

    kind = "count"

    def __init__(
        self, on: str | None = None, ignore_nulls: bool = False, alias_name: str | None = None
    ) -> None:
        super().__init__(on, ignore_nulls, alias_name)

    def result(self, merged: Mapping[str, Any]) -> Any:
        from daskinfer._internal import aggregate

        if self.on is None:
            return merged[aggregate.ROWS].count
        part = merged[self.on]
        return part.count if self.ignore_nulls else part.count + part.nulls


class Sum(AggregateFn):
    kind = "sum"


class Min(AggregateFn):
    kind = "min"


class Max(AggregateFn):
    kind = "max"


class Mean(AggregateFn):
    kind = "mean"


class Std(AggregateFn):
    """Standard deviation, divisor ``count - ddof``; one value gives 0.0, as Ray."""

    kind = "std"

    def __init__(
        self,
        on: str | None = None,
        ddof: int = 1,
        ignore_nulls: bool = True,
        alias_name: str | None = None,
    ) -> None:
        super().__init__(on, ignore_nulls, alias_name)
        if not isinstance(ddof, int) or isinstance(ddof, bool) or ddof < 0:
            raise PlanError(f"Std(ddof={ddof!r}): use an integer >= 0 (1 for the sample std)")
        self.ddof = ddof


#: the aggregate of each kind, for ``Dataset.sum`` and its kin
BY_KIND: dict[str, type[AggregateFn]] = {
    "sum": Sum,
    "min": Min,
    "max": Max,
    "mean": Mean,
    "std": Std,
}


def check_aggregates(call: str, aggs: Sequence[Any]) -> None:
    """At least one, each an ``AggregateFn``, and no two with one name."""
    if not aggs:
        raise PlanError(f"{call}(): give one or more aggregates, e.g. Count(), Mean('x')")
    for agg in aggs:
        if not isinstance(agg, AggregateFn):
            raise PlanError(
                f"{call}({agg!r}): give aggregates from daskinfer.aggregate (Count, Sum, Min, "
                "Max, Mean, Std)"
            )
    names = [agg.name() for agg in aggs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise PlanError(f"{call}: two aggregates named {twice[0]!r}; give one an alias_name")


class GroupRow:
    """A group's row for ``GroupedData.aggregate``: its keys, then each aggregate.

    Plain and picklable: it runs on the workers, once per group.
    """

    __name__ = "aggregate"  # the stage's name, as map_groups(aggregate)

    def __init__(self, keys: Sequence[str], aggs: Sequence[AggregateFn]) -> None:
        self.keys = list(keys)
        self.aggs = list(aggs)

    def __call__(self, group: pd.DataFrame) -> dict[str, list[Any]]:
        row = {key: [group[key].iloc[0]] for key in self.keys}
        for agg in self.aggs:
            row[agg.name()] = [agg.of_group(group)]
        return row
