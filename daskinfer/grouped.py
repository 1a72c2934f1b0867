"""``Dataset.groupby(key)``: Ray Data's ``GroupedData``, over dask's shuffle.

Like Ray Data's, a grouped dataset sorts its rows by key first (``Dataset.sort``, which
runs the pipeline up to it), so every group's rows are adjacent in one block and the
groups come in key order. ``map_groups`` then calls the user's function once per group,
as a whole-block stage over the sorted blocks (tasks, or an actor pool for a callable
class), and ``aggregate(Count(), Mean("x"), ...)`` computes a row per group the same way.
The one-aggregate verbs (``count``, ``sum``, ...) are dask's grouped reductions, which
need no sort.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from daskinfer._internal import alltoall
from daskinfer._internal.batching import BATCH_FORMATS
from daskinfer._internal.ray_args import TRANSFORM_ARGS, takes_ray_args
from daskinfer.compute import ActorPoolStrategy, TaskPoolStrategy
from daskinfer.exceptions import PlanError

if TYPE_CHECKING:
    from daskinfer.aggregate import AggregateFn
    from daskinfer.dataset import Dataset


class GroupedData:
    """The rows of a Dataset grouped by the values of ``keys`` (``Dataset.groupby``)."""

    def __init__(self, dataset: Dataset, keys: list[str]) -> None:
        self._dataset = dataset
        self._keys = keys

    def __repr__(self) -> str:
        return f"GroupedData(keys={self._keys!r})"

    @takes_ray_args("map_groups", TRANSFORM_ARGS, remote_options=True)
    def map_groups(
        self,
        fn: Callable[..., Any] | type,
        /,
        *,
        batch_format: str = "default",
        zero_copy_batch: bool = False,
        compute: ActorPoolStrategy | TaskPoolStrategy | None = None,
        fn_args: Sequence[Any] | None = None,
        fn_kwargs: Mapping[str, Any] | None = None,
        fn_constructor_args: Sequence[Any] | None = None,
        fn_constructor_kwargs: Mapping[str, Any] | None = None,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        concurrency: int | tuple[int, int] | tuple[int, int, int] | None = None,
    ) -> Dataset:
        """Call ``fn`` on each group (one batch of all its rows); its outputs, in key order.

        As in Ray Data: ``batch_format`` ``"default"``/``"numpy"`` (a dict of arrays),
        ``"pandas"`` or ``"pyarrow"``; ``fn`` returns a batch of any number of rows. A
        callable class runs in an actor pool (``concurrency=`` or ``compute=``), built
        once per actor with ``fn_constructor_args``/``kwargs``. Runs the pipeline up to
        the grouping when called (the sort is a barrier); the groups' calls stream.
        """
        fmt = "numpy" if batch_format == "default" else batch_format
        if fmt not in BATCH_FORMATS:
            raise PlanError(
                f"map_groups(batch_format={batch_format!r}): use 'default', 'numpy', "
                "'pandas' or 'pyarrow'"
            )
        if not callable(fn):
            raise PlanError(f"map_groups({fn!r}): give a function, or a callable class")
        args, kwargs = tuple(fn_args or ()), dict(fn_kwargs or {})
        keys = tuple(self._keys)
        resources: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        if isinstance(fn, type):
            if concurrency is None and not isinstance(compute, ActorPoolStrategy):
                raise PlanError(
                    f"map_groups({fn.__name__}): a callable class runs in a pool of actors; "
                    "give its size, e.g. concurrency=2"
                )
            ctor = (
                fn,
                keys,
                fmt,
                args,
                kwargs,
                tuple(fn_constructor_args or ()),
                dict(fn_constructor_kwargs or {}),
            )
            return self._sorted().map_batches(
                alltoall.GroupsActor,
                batch_size=None,
                batch_format="pandas",
                fn_constructor_args=ctor,
                compute=compute,
                concurrency=concurrency,
                **resources,
            )
        if fn_constructor_args or fn_constructor_kwargs:
            raise PlanError(
                "map_groups: fn_constructor_args and fn_constructor_kwargs are for a "
                "callable class; a function takes fn_args and fn_kwargs"
            )
        return self._sorted().map_batches(
            alltoall.GroupsApplier(fn, keys, fmt, args, kwargs),
            batch_size=None,
            batch_format="pandas",
            compute=compute,
            concurrency=concurrency,
            **resources,
        )

    def count(self) -> Dataset:
        """One row per group: its keys and ``count()``, the number of its rows."""
        return self._aggregate("count", None)

    def sum(self, on: str | list[str] | None = None, ignore_nulls: bool = True) -> Dataset:
        """One row per group: its keys and ``sum(c)`` for each column ``c`` of ``on``
        (``None``: every column that is not a key)."""
        return self._aggregate("sum", on, ignore_nulls)

    def min(self, on: str | list[str] | None = None, ignore_nulls: bool = True) -> Dataset:
        """One row per group: its keys and ``min(c)``; see ``sum``."""
        return self._aggregate("min", on, ignore_nulls)

    def max(self, on: str | list[str] | None = None, ignore_nulls: bool = True) -> Dataset:
        """One row per group: its keys and ``max(c)``; see ``sum``."""
        return self._aggregate("max", on, ignore_nulls)

    def mean(self, on: str | list[str] | None = None, ignore_nulls: bool = True) -> Dataset:
        """One row per group: its keys and ``mean(c)``; see ``sum``."""
        return self._aggregate("mean", on, ignore_nulls)

    def std(
        self, on: str | list[str] | None = None, ddof: int = 1, ignore_nulls: bool = True
    ) -> Dataset:
        """One row per group: its keys and ``std(c)`` (divisor ``count - ddof``)."""
        if not isinstance(ddof, int) or isinstance(ddof, bool) or ddof < 0:
            raise PlanError(f"std(ddof={ddof!r}): use an integer >= 0 (1 for the sample std)")
        return self._aggregate("std", on, ignore_nulls, ddof)

    def aggregate(self, *aggs: AggregateFn) -> Dataset:
        """One row per group: its keys, then each aggregate (``daskinfer.aggregate``'s
        ``Count``, ``Sum``, ``Min``, ``Max``, ``Mean``, ``Std``), named as Ray names them
        or by ``alias_name``; in key order. Computed per group after the sort, so every
        aggregate's options hold (``ignore_nulls=False``, ``ddof``)."""
        from daskinfer.aggregate import GroupRow, check_aggregates

        check_aggregates("aggregate", aggs)
        present = self._dataset._known_columns()
        for agg in aggs:
            if agg.on is not None and present is not None and agg.on not in present:
                raise PlanError(f"aggregate: no column {agg.on!r} (the columns: {present})")
        return self._sorted().map_batches(
            alltoall.GroupsApplier(GroupRow(self._keys, aggs), tuple(self._keys), "pandas"),
            batch_size=None,
            batch_format="pandas",
        )

    def _sorted(self) -> Dataset:
        return self._dataset.sort(self._keys)

    def _aggregate(
        self, kind: str, on: str | list[str] | None, ignore_nulls: bool = True, ddof: int = 1
    ) -> Dataset:
        from daskinfer.io._source import _dataset

        if ignore_nulls is not True:
            # dask's grouped reductions skip nulls; Ray's ignore_nulls=False (a group
            # holding a null gives null) has no counterpart there
            raise PlanError(
                f"groupby(...).{kind}(ignore_nulls={ignore_nulls!r}): only True (nulls "
                "skipped) is provided here; aggregate() takes each aggregate's own, e.g. "
                f"groupby(...).aggregate({kind.capitalize()}('x', ignore_nulls=False))"
            )
        frame = self._dataset.to_dask()
        present = [str(c) for c in frame.columns]
        if not present:  # no rows: nothing to group
            return self._dataset._no_rows()
        missing = [k for k in self._keys if k not in present]
        if missing:
            raise PlanError(f"groupby: no column {missing[0]!r} (the columns: {present})")
        if kind == "count":
            columns: list[str] = []
        elif on is None:
            columns = [c for c in present if c not in self._keys]
        else:
            columns = [on] if isinstance(on, str) else list(on)
            absent = [c for c in columns if c not in present]
            if absent:
                raise PlanError(
                    f"groupby(...).{kind}: no column {absent[0]!r} (the columns: {present})"
                )
        out = alltoall.persisted(alltoall.grouped_frame(frame, self._keys, kind, columns, ddof))
        return _dataset(out, f"GroupBy[{', '.join(self._keys)}].{kind}", materialized=True)
