"""Dataset: a lazy, immutable pipeline over a dask DataFrame, with Ray Data's verbs."""

from __future__ import annotations

import collections
import concurrent.futures
import inspect
import itertools
import logging
import numbers
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import pandas as pd
import pyarrow as pa

from daskinfer import cluster
from daskinfer._internal.batching import (
    BATCH_FORMATS,
    block_to_arrow,
    block_to_batch,
    concat_blocks,
    join_column_pieces,
    rows_of,
)
from daskinfer._internal.expressions import ValueList, columns_of, parse_predicate, render
from daskinfer._internal.plan import (
    BlocksSource,
    DaskSource,
    Limit,
    LogicalPlan,
    MapStage,
    Repartition,
)
from daskinfer._internal.planner import explain as explain_plan
from daskinfer._internal.ray_args import TRANSFORM_ARGS, WRITER_ARGS, takes_ray_args
from daskinfer._internal.sampling import SampleTransform
from daskinfer._internal.transforms import (
    AddColumnTransform,
    MapBatchesTransform,
    PredicateFilterTransform,
    ProjectTransform,
    RowTransform,
    Transform,
    WithColumnsTransform,
)
from daskinfer.compute import ActorPoolStrategy, TaskPoolStrategy
from daskinfer.exceptions import PlanError
from daskinfer.expressions import Expr

if TYPE_CHECKING:
    import dask.dataframe as dd

    from daskinfer._internal.executor import StreamingExecutor
    from daskinfer.aggregate import AggregateFn
    from daskinfer.grouped import GroupedData
    from daskinfer.metrics import RunStats

__all__ = ["Dataset"]

logger = logging.getLogger("daskinfer")

DEFAULT_BATCH_SIZE = 1024
_MIN_FETCHES_IN_FLIGHT = 8
# blocks held or being fetched by a consumer stop growing past this many bytes (a
# single block is always fetched, whatever its size)
_MAX_FETCH_BYTES = 256 * 2**20


def _gather(futures: list[Any]) -> list[Any]:
    """The results of ``futures`` (of one client) in one request."""
    if len(futures) == 1:
        return [futures[0].result()]
    return list(futures[0].client.gather(futures))


def _fn_name(fn: Any) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _check_positive_int(value: Any, what: str, fix: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PlanError(f"{what}={value!r} is not valid: {fix}")


def _check_batch_format(batch_format: Any, call: str) -> str:
    if batch_format == "default":
        return "numpy"
    if batch_format not in BATCH_FORMATS:
        raise PlanError(
            f"{call}(batch_format={batch_format!r}) is not a known format; "
            f"use one of {', '.join(repr(f) for f in BATCH_FORMATS)}"
        )
    return str(batch_format)


def _check_amount(value: Any, name: str, call: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or value < 0:
        raise PlanError(f"{call}({name}={value!r}): {name} must be a number >= 0")
    return float(value)


def _resources(
    call: str,
    num_cpus: Any,
    num_gpus: Any,
    resources: Mapping[str, float] | None,
) -> dict[str, float]:
    out: dict[str, float] = {}
    if resources is not None:
        if not isinstance(resources, Mapping):
            raise PlanError(
                f"{call}(resources={resources!r}) must be a mapping such as {{'GPU': 1}}"
            )
        for k, v in resources.items():
            amount = _check_amount(v, f"resources[{k!r}]", call)
            if not isinstance(k, str):
                raise PlanError(f"{call}(resources=...): resource names must be strings, got {k!r}")
            if amount:
                out[k] = amount
    gpus = _check_amount(num_gpus, "num_gpus", call)
    cpus = _check_amount(num_cpus, "num_cpus", call)
    if gpus:
        out["GPU"] = gpus
    if cpus:
        out["CPU"] = cpus
    return out


def _check_args(call: str, **named: Any) -> None:
    for name, value in named.items():
        if value is None:
            continue
        want_mapping = name.endswith("kwargs")
        ok = isinstance(value, Mapping) if want_mapping else isinstance(value, (tuple, list))
        if not ok:
            kind = "a dict" if want_mapping else "a tuple or list"
            raise PlanError(f"{call}({name}={value!r}): {name} must be {kind}")


class Dataset:
    """A lazy, immutable pipeline of blocks; every verb returns a new Dataset.

    Create one with ``daskinfer.read_parquet``, ``from_pandas`` and friends. Nothing runs
    until a consuming verb (``iter_batches``, ``take``, ``to_pandas``, ``write_parquet``
    ...) is called; then a streaming executor runs the plan on the Dask cluster.

    Examples
    --------
    >>> import daskinfer as di
    >>> ds = di.range(10).map_batches(lambda b: {"id": b["id"] * 2})
    >>> ds.take(2)  # doctest: +SKIP
    [{'id': 0}, {'id': 2}]
    """

    def __init__(self, logical_plan: LogicalPlan) -> None:
        self._plan = logical_plan
        self._last_stats: RunStats | None = None

    def __repr__(self) -> str:
        return f"Dataset({' -> '.join(self._plan.describe())})"

    def _with(self, op: Any) -> Dataset:
        return Dataset(self._plan.with_op(op))

    # ------------------------------------------------------------------ transforms
    @takes_ray_args("map_batches", TRANSFORM_ARGS, remote_options=True)
    def map_batches(
        self,
        fn: Callable[..., Any] | type,
        /,
        *,
        batch_size: int | str | None = "default",
        batch_format: str = "numpy",
        zero_copy_batch: bool = False,
        compute: ActorPoolStrategy | TaskPoolStrategy | None = None,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        resources: Mapping[str, float] | None = None,
        fn_args: Sequence[Any] | None = None,
        fn_kwargs: Mapping[str, Any] | None = None,
        fn_constructor_args: Sequence[Any] | None = None,
        fn_constructor_kwargs: Mapping[str, Any] | None = None,
        concurrency: int | tuple[int, int] | tuple[int, int, int] | None = None,
        on_error: str = "raise",
        max_errored_rows: float | None = None,
        timeout_s: float | None = None,
    ) -> Dataset:
        """Apply ``fn`` to batches of rows.

        A function runs as Dask tasks on CPU workers (or on workers with the resources
        asked for). A callable class runs in a pool of Dask actors: each actor builds
        one instance on its worker (``__init__`` loads the model once) and calls it on
        every batch it receives.

        Parameters
        ----------
        fn
            ``fn(batch, *fn_args, **fn_kwargs) -> batch``, or a class whose instances are
            such callables. A batch is a ``dict[str, numpy.ndarray]`` (``"numpy"``), a
            ``pandas.DataFrame`` or a ``pyarrow.Table``; ``fn`` may return any of them.
        batch_size
            Rows per batch: exact, across block boundaries, except the last batch.
            ``None`` passes whole blocks. ``"auto"`` passes whole blocks too, and a
            predictor whose batch runs out of accelerator memory (torch, CuPy or
            TensorFlow OOM) splits it in halves and remembers the size that fit; with
            an integer, too, an out-of-memory batch is split rather than failing the
            job. The default is 1024.
        batch_format
            ``"numpy"`` (default), ``"pandas"`` or ``"pyarrow"``.
        zero_copy_batch
            Accepted for Ray Data's signature; it changes nothing. A function may edit
            its batch in place either way: numpy batches are the task's own copies, and
            pandas batches copy on the first write.
        compute
            ``ActorPoolStrategy(size=n)`` or ``(min_size=, max_size=)`` for a class;
            ``TaskPoolStrategy(size=n)`` caps concurrent tasks of a function.
        num_cpus, num_gpus, resources
            Dask worker resources per task or per actor: ``num_gpus=1`` is
            ``{"GPU": 1}``; dask-cuda workers offer ``GPU``. ``num_cpus`` is enforced
            where workers declare a ``CPU`` resource (the embedded cluster does).
        fn_args, fn_kwargs
            Extra arguments to each call.
        fn_constructor_args, fn_constructor_kwargs
            Arguments to the class's constructor, which runs on the workers only.
        concurrency
            Ray's newer spelling: an int (pool size, or task cap for a function), a
            ``(min, max)`` tuple for an autoscaling pool, or ``(min, max, initial)`` for
            one that starts with ``initial`` actors.
        on_error
            ``"raise"`` (default): an exception fails the job. ``"skip"``: a batch that
            raises is split (bisection) until the failing rows are isolated; the others
            go on and the failing ones are dropped and counted. ``"quarantine"``: the
            same, and the failing rows are kept with their error and traceback:
            ``ds.stats().quarantined()``, and ``write_parquet(..., errors_path=...)``
            writes them to a dead-letter Parquet file.
        max_errored_rows
            With ``"skip"``/``"quarantine"``, fail the job once more rows than this
            failed (an integer), or more than this fraction of the stage's rows (a
            number below 1, checked when the stage ends). ``None``: no limit.
        timeout_s
            A batch that runs longer than this counts as failed: its worker is restarted
            (a hung call cannot be interrupted otherwise; a predictor on that worker is
            replaced) and the batch is tried again, up to ``DataContext.max_retries``
            times; then ``on_error`` decides (``"raise"``: the job fails with
            ``ExecutionTimeoutError``). Needs workers started with a nanny (the default).
        """
        call = "map_batches"
        is_class = inspect.isclass(fn)
        if not callable(fn):
            raise PlanError(
                f"{call}(fn={fn!r}): fn must be a function or a callable class, "
                f"not {type(fn).__name__}"
            )
        if is_class and not callable(getattr(fn, "__call__", None)):  # noqa: B004
            raise PlanError(f"{call}({fn.__name__}): the class must define __call__(self, batch)")
        if batch_size == "default":
            batch_size = DEFAULT_BATCH_SIZE
        elif batch_size == "auto":
            # whole bundles (sized by the executor to about target_task_s of work); a
            # predictor that runs out of accelerator memory halves its batches until
            # they fit, and keeps that size
            batch_size = None
        if batch_size is not None:
            _check_positive_int(
                batch_size,
                f"{call}(batch_size",
                'use an integer >= 1, "auto", or None for whole blocks)',
            )
        batch_format = _check_batch_format(batch_format, call)
        if not isinstance(zero_copy_batch, bool):
            raise PlanError(f"{call}(zero_copy_batch={zero_copy_batch!r}): use True or False")
        _check_args(
            call,
            fn_args=fn_args,
            fn_kwargs=fn_kwargs,
            fn_constructor_args=fn_constructor_args,
            fn_constructor_kwargs=fn_constructor_kwargs,
        )
        if on_error not in ("raise", "skip", "quarantine"):
            raise PlanError(
                f'{call}(on_error={on_error!r}): use "raise" (fail the job), "skip" '
                '(drop failing rows) or "quarantine" (set them aside with their errors)'
            )
        if max_errored_rows is not None and (
            isinstance(max_errored_rows, bool)
            or not isinstance(max_errored_rows, (int, float))
            or max_errored_rows < 0
            or (max_errored_rows >= 1 and max_errored_rows != int(max_errored_rows))
        ):
            raise PlanError(
                f"{call}(max_errored_rows={max_errored_rows!r}): use a whole number of rows "
                "(>= 0), a fraction of the stage's rows (0 < f < 1), or None for no limit"
            )
        if max_errored_rows is not None and on_error == "raise":
            raise PlanError(
                f"{call}(max_errored_rows={max_errored_rows!r}) applies with "
                'on_error="skip" or "quarantine"; with on_error="raise" the first error fails the job'
            )
        if timeout_s is not None and (
            isinstance(timeout_s, bool)
            or not isinstance(timeout_s, (int, float))
            or not timeout_s > 0
        ):
            raise PlanError(
                f"{call}(timeout_s={timeout_s!r}): use a number of seconds > 0, or None"
            )
        res = _resources(call, num_cpus, num_gpus, resources)
        name = f"MapBatches({_fn_name(fn)})"
        transform = MapBatchesTransform(
            stage=name,
            fn=None if is_class else fn,
            batch_size=batch_size,  # type: ignore[arg-type]
            batch_format=batch_format,
            fn_args=tuple(fn_args or ()),
            fn_kwargs=dict(fn_kwargs or {}),
            on_error=on_error,
            max_errored_rows=max_errored_rows,
            timeout_s=float(timeout_s) if timeout_s is not None else None,
        )
        return self._with(
            self._map_stage(
                call,
                fn,
                name,
                transform,
                resources=res,
                compute=compute,
                concurrency=concurrency,
                batch_size=batch_size,  # type: ignore[arg-type]
                ctor_args=fn_constructor_args,
                ctor_kwargs=fn_constructor_kwargs,
            )
        )

    @staticmethod
    def _pool_for(
        predictor: type,
        compute: Any,
        concurrency: int | tuple[int, int] | tuple[int, int, int] | None,
        verb: str = "map_batches",
    ) -> ActorPoolStrategy:
        call = f"{verb}({predictor.__name__})"
        if compute is not None and not isinstance(compute, ActorPoolStrategy):
            raise PlanError(
                f"{call}: compute={compute!r} cannot run a class; use "
                "compute=ActorPoolStrategy(size=n) or concurrency=n"
            )
        if concurrency is not None:
            if isinstance(concurrency, tuple) and len(concurrency) == 2:
                from_concurrency = ActorPoolStrategy(
                    min_size=concurrency[0], max_size=concurrency[1]
                )
            elif isinstance(concurrency, tuple) and len(concurrency) == 3:
                # Ray's (min, max, initial): the pool starts at initial, then autoscales
                from_concurrency = ActorPoolStrategy(
                    min_size=concurrency[0],
                    max_size=concurrency[1],
                    initial_size=concurrency[2],
                )
            elif isinstance(concurrency, int) and not isinstance(concurrency, bool):
                from_concurrency = ActorPoolStrategy(size=concurrency)
            else:
                raise PlanError(
                    f"{call}(concurrency={concurrency!r}): use an int n (a pool of n "
                    "actors), a (min, max) tuple (an autoscaling pool) or (min, max, "
                    "initial) (one that starts at initial actors)"
                )
            if compute is not None and (
                compute.min_size,
                compute.max_size,
                compute.initial_size,
            ) != (
                from_concurrency.min_size,
                from_concurrency.max_size,
                from_concurrency.initial_size,
            ):
                raise PlanError(
                    f"{call}: compute={compute!r} and concurrency={concurrency!r} disagree; "
                    "give only one of them"
                )
            return compute or from_concurrency
        if compute is None:
            raise PlanError(
                f"{call}: a callable class runs in a pool of actors, so give the pool's "
                "size: compute=di.ActorPoolStrategy(size=2) or concurrency=2 (or a "
                "(min, max) tuple to autoscale)"
            )
        return compute  # type: ignore[no-any-return]

    def _map_stage(
        self,
        call: str,
        fn: Any,
        name: str,
        transform: Transform,
        *,
        resources: Mapping[str, float],
        compute: Any,
        concurrency: Any,
        batch_size: int | None,
        ctor_args: Sequence[Any] | None,
        ctor_kwargs: Mapping[str, Any] | None,
    ) -> MapStage:
        """The stage of a user's function (tasks) or callable class (an actor pool)."""
        if inspect.isclass(fn):
            pool = self._pool_for(fn, compute, concurrency, verb=call)
            return MapStage(
                name=name,
                transform=transform,
                batch_size=batch_size,
                resources=resources,
                actor_class=fn,
                ctor_args=tuple(ctor_args or ()),
                ctor_kwargs=dict(ctor_kwargs or {}),
                pool_min=pool.min_size or 1,
                pool_max=pool.max_size,
                pool_initial=pool.initial_size or 1,
                max_tasks_in_flight_per_actor=pool.max_tasks_in_flight_per_actor,
            )
        if isinstance(compute, ActorPoolStrategy):
            raise PlanError(
                f"{call}({_fn_name(fn)}, compute=ActorPoolStrategy(...)): an actor pool "
                "needs a callable class (whose __init__ runs once per actor, e.g. to load "
                "the model); pass the class itself, or drop compute= to run the function "
                "as tasks"
            )
        if ctor_args or ctor_kwargs:
            raise PlanError(
                f"{call}({_fn_name(fn)}): fn_constructor_args/kwargs apply to callable "
                "classes only; pass a class, or use fn_args/fn_kwargs"
            )
        return MapStage(
            name=name,
            transform=transform,
            batch_size=batch_size,
            resources=resources,
            concurrency=self._task_cap(call, compute, concurrency),
        )

    @staticmethod
    def _task_cap(call: str, compute: Any, concurrency: Any) -> int | None:
        if isinstance(compute, TaskPoolStrategy):
            return compute.size
        if compute is not None:
            raise PlanError(f"{call}: compute={compute!r} is not a strategy daskinfer knows")
        if concurrency is None:
            return None
        if isinstance(concurrency, tuple):
            raise PlanError(
                f"{call}(concurrency={concurrency!r}): a (min, max) pool applies to callable "
                "classes; give a function an int cap on concurrent tasks"
            )
        _check_positive_int(concurrency, f"{call}(concurrency", "use an integer >= 1)")
        return int(concurrency)

    def _row_op(
        self,
        kind: str,
        fn: Callable[..., Any] | type,
        compute: Any,
        fn_args: Any,
        fn_kwargs: Any,
        fn_constructor_args: Any,
        fn_constructor_kwargs: Any,
        num_cpus: Any,
        num_gpus: Any,
        resources: Any,
        concurrency: Any,
    ) -> Dataset:
        """A row verb's stage: a function as tasks, or a callable class in a pool of actors.

        A class goes the way ``map_batches`` takes one (one instance per actor, built on
        its worker); each call gets a whole block and calls the instance once per row.
        """
        call = kind
        is_class = inspect.isclass(fn)
        if not callable(fn):
            raise PlanError(
                f"{call}(fn={fn!r}): fn must be a function of one row (a dict) or a callable class"
            )
        if is_class and not callable(getattr(fn, "__call__", None)):  # noqa: B004
            raise PlanError(f"{call}({_fn_name(fn)}): the class must define __call__(self, row)")
        _check_args(
            call,
            fn_args=fn_args,
            fn_kwargs=fn_kwargs,
            fn_constructor_args=fn_constructor_args,
            fn_constructor_kwargs=fn_constructor_kwargs,
        )
        res = _resources(call, num_cpus, num_gpus, resources)
        name = f"{''.join(p.title() for p in kind.split('_'))}({_fn_name(fn)})"
        transform = RowTransform(
            name,
            kind,
            None if is_class else fn,
            tuple(fn_args or ()),
            dict(fn_kwargs or {}),
        )
        return self._with(
            self._map_stage(
                call,
                fn,
                name,
                transform,
                resources=res,
                compute=compute,
                concurrency=concurrency,
                batch_size=None,
                ctor_args=fn_constructor_args,
                ctor_kwargs=fn_constructor_kwargs,
            )
        )

    @takes_ray_args("map", TRANSFORM_ARGS, remote_options=True)
    def map(
        self,
        fn: Callable[[dict[str, Any]], dict[str, Any]] | type,
        /,
        *,
        compute: ActorPoolStrategy | TaskPoolStrategy | None = None,
        fn_args: Sequence[Any] | None = None,
        fn_kwargs: Mapping[str, Any] | None = None,
        fn_constructor_args: Sequence[Any] | None = None,
        fn_constructor_kwargs: Mapping[str, Any] | None = None,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        resources: Mapping[str, float] | None = None,
        concurrency: int | tuple[int, int] | tuple[int, int, int] | None = None,
    ) -> Dataset:
        """Apply ``fn(row) -> row`` to every row (a row is a dict).

        ``fn`` may be a callable class, as in Ray: give it a pool (``concurrency=n``, a
        ``(min, max)`` tuple, or ``compute=ActorPoolStrategy(...)``); each actor builds
        one instance on its worker (``fn_constructor_args``/``kwargs``) and calls it on
        every row it receives. ``compute``, ``num_cpus``, ``num_gpus``, ``resources``
        and ``concurrency`` are as in ``map_batches``.
        """
        return self._row_op(
            "map",
            fn,
            compute,
            fn_args,
            fn_kwargs,
            fn_constructor_args,
            fn_constructor_kwargs,
            num_cpus,
            num_gpus,
            resources,
            concurrency,
        )

    @takes_ray_args("filter", TRANSFORM_ARGS, remote_options=True)
    def filter(
        self,
        fn: Callable[[dict[str, Any]], bool] | type | None = None,
        /,
        expr: str | Expr | None = None,
        *,
        compute: ActorPoolStrategy | TaskPoolStrategy | None = None,
        fn_args: Sequence[Any] | None = None,
        fn_kwargs: Mapping[str, Any] | None = None,
        fn_constructor_args: Sequence[Any] | None = None,
        fn_constructor_kwargs: Mapping[str, Any] | None = None,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        resources: Mapping[str, float] | None = None,
        concurrency: int | tuple[int, int] | tuple[int, int, int] | None = None,
    ) -> Dataset:
        """Keep the rows for which ``fn(row)`` is true, or where ``expr`` holds.

        Give exactly one of them, as in Ray. ``fn`` is a function or a callable class
        (see ``map``). ``expr`` is Ray Data's string predicate, evaluated vectorised
        (Arrow compute) on whole blocks: column names, constants, ``== != < <= > >=``,
        ``in`` / ``not in`` a list, ``and`` / ``or`` / ``not``, and ``is_null(x)``,
        ``is_valid(x)`` (or ``is_not_null``), ``is_nan(x)``, ``is_in(x, [...])``; e.g.
        ``"score >= 0.5 and label in ['cat', 'dog']"``; or a predicate built with
        ``daskinfer.expressions.col``, which may compute (``col("a") + 1 > col("b")``, as
        in ``with_column``). A missing value makes a comparison unknown, and
        such rows are dropped (Arrow's rules, which Ray applies to Parquet data). The
        expression is parsed, and its columns checked where the plan knows them, here.
        """
        call = "filter"
        if (fn is None) == (expr is None):
            raise PlanError(
                f"{call}(): give exactly one of fn (a row predicate) and expr (a condition "
                'such as "x > 1"), as in Ray'
            )
        if expr is None:
            assert fn is not None
            return self._row_op(
                "filter",
                fn,
                compute,
                fn_args,
                fn_kwargs,
                fn_constructor_args,
                fn_constructor_kwargs,
                num_cpus,
                num_gpus,
                resources,
                concurrency,
            )
        if any(
            a is not None for a in (fn_args, fn_kwargs, fn_constructor_args, fn_constructor_kwargs)
        ):
            raise PlanError(
                f"{call}(expr=...): fn_args/fn_kwargs and fn_constructor_args/kwargs go "
                "with fn; an expression takes none (as in Ray)"
            )
        text, predicate = self._predicate(expr)
        known = self._known_columns()
        missing = [c for c in columns_of(predicate) if known is not None and c not in known]
        if missing:
            raise PlanError(
                f"{call}(expr={text!r}): no column {', '.join(map(repr, missing))}; the "
                f"dataset has columns {known}"
            )
        if isinstance(compute, ActorPoolStrategy):
            raise PlanError(
                f"{call}(expr={text!r}, compute=ActorPoolStrategy(...)): an expression runs "
                "as tasks; drop compute=, or cap the tasks with concurrency=n"
            )
        res = _resources(call, num_cpus, num_gpus, resources)
        task_cap = self._task_cap(call, compute, concurrency)
        name = f"Filter({text if len(text) <= 60 else text[:57] + '...'})"
        return self._with_filter_pushed_into_read(predicate)._with(
            MapStage(
                name=name,
                transform=PredicateFilterTransform(name, text, predicate),
                resources=res,
                concurrency=task_cap,
            )
        )

    def _with_filter_pushed_into_read(self, predicate: Any) -> Dataset:
        """This Dataset with ``predicate`` also given to its Parquet read, where it can be.

        Only right after ``read_parquet`` (or after other ``filter(expr=)`` stages, which
        commute with it): the reader then skips partitions, row groups and rows the
        condition rules out (see ``io/pushdown.py``). It is a saving, never a change of
        result, so anything that stops it leaves the plan as it was.
        """
        source = self._plan.source
        if not (isinstance(source, DaskSource) and source.name == "ReadParquet"):
            return self
        if not all(
            isinstance(op, MapStage) and isinstance(op.transform, PredicateFilterTransform)
            for op in self._plan.ops
        ):
            return self
        from daskinfer.io.pushdown import push_into_parquet

        try:
            pushed = push_into_parquet(source, predicate)
        except Exception:  # dask refused the filters: the filter stage alone does the job
            logger.debug("filter not pushed into read_parquet", exc_info=True)
            return self
        if pushed is None:
            return self
        return Dataset(LogicalPlan(pushed, self._plan.ops))

    @staticmethod
    def _predicate(expr: Any) -> tuple[str, Any]:
        """``filter(expr=...)``'s text and parsed predicate (a string or an ``Expr``)."""
        if isinstance(expr, str):
            return expr, parse_predicate(expr)
        if isinstance(expr, Expr):
            return expr.text(), expr.predicate()
        raise PlanError(
            f'filter(expr={expr!r}): expr takes a string such as "x > 1", or a predicate '
            "built with daskinfer.expressions.col (col('x') > 1)"
        )

    @takes_ray_args("flat_map", TRANSFORM_ARGS, remote_options=True)
    def flat_map(
        self,
        fn: Callable[[dict[str, Any]], Iterable[dict[str, Any]]] | type,
        /,
        *,
        compute: ActorPoolStrategy | TaskPoolStrategy | None = None,
        fn_args: Sequence[Any] | None = None,
        fn_kwargs: Mapping[str, Any] | None = None,
        fn_constructor_args: Sequence[Any] | None = None,
        fn_constructor_kwargs: Mapping[str, Any] | None = None,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        resources: Mapping[str, float] | None = None,
        concurrency: int | tuple[int, int] | tuple[int, int, int] | None = None,
    ) -> Dataset:
        """Replace every row by the rows ``fn(row)`` returns (zero or more).

        ``fn`` may be a callable class run in a pool of actors; see ``map``.
        """
        return self._row_op(
            "flat_map",
            fn,
            compute,
            fn_args,
            fn_kwargs,
            fn_constructor_args,
            fn_constructor_kwargs,
            num_cpus,
            num_gpus,
            resources,
            concurrency,
        )

    def add_column(
        self,
        col: str,
        fn: Callable[[Any], Any],
        /,
        *,
        batch_format: str = "pandas",
    ) -> Dataset:
        """Add (or replace) column ``col`` with ``fn(batch)``, one value per row."""
        if not isinstance(col, str) or not col:
            raise PlanError(f"add_column(col={col!r}): the column name must be a non-empty string")
        if not callable(fn):
            raise PlanError(f"add_column({col!r}, fn={fn!r}): fn must be callable")
        fmt = _check_batch_format(batch_format, "add_column")
        name = f"AddColumn({col})"
        return self._with(MapStage(name=name, transform=AddColumnTransform(name, col, fn, fmt)))

    @takes_ray_args("with_column", TRANSFORM_ARGS, remote_options=True)
    def with_column(
        self,
        column_name: str,
        expr: Expr,
        *,
        compute: TaskPoolStrategy | None = None,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        resources: Mapping[str, float] | None = None,
        concurrency: int | None = None,
    ) -> Dataset:
        """Add column ``column_name`` (or replace it, in its place) with ``expr``'s values.

        ``expr`` is built with ``daskinfer.expressions`` (``col("price") * 2``,
        ``(col("a") > 0) & col("b").is_not_null()``, ``lit(1)``, ``col("x").round()``)
        and computed vectorised with Arrow compute on whole blocks, as in Ray; the other
        columns pass on untouched. Its columns are checked, where the plan knows them,
        at the call. ``compute=TaskPoolStrategy(size=n)`` or ``concurrency=n`` caps the
        concurrent tasks; ``num_cpus``, ``num_gpus``, ``resources`` as in
        ``map_batches``. Without them the stage fuses with its neighbours.
        """
        return self._with_expressions(
            "with_column",
            [(column_name, expr)],
            compute,
            num_cpus,
            num_gpus,
            resources,
            concurrency,
        )

    @takes_ray_args("with_columns", TRANSFORM_ARGS, remote_options=True)
    def with_columns(
        self,
        exprs: Mapping[str, Expr] | None = None,
        *more_exprs: Mapping[str, Expr],
        compute: TaskPoolStrategy | None = None,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        resources: Mapping[str, float] | None = None,
        concurrency: int | None = None,
    ) -> Dataset:
        """Add or replace several columns, ``{name: expr}``, in one stage.

        Every expression reads the columns as they were before this call (Ray's one
        projection): ``{"a": col("b"), "b": col("a")}`` swaps them. Replaced columns
        keep their place; new ones follow in the mapping's order (then ``more_exprs``'s;
        a name given twice takes the last expression). No expressions: the same
        dataset, as in Ray. The other arguments are ``with_column``'s.
        """
        named: list[tuple[Any, Any]] = []
        for arg in ([] if exprs is None else [exprs]) + list(more_exprs):
            if not isinstance(arg, Mapping):
                raise PlanError(
                    f"with_columns({arg!r}): pass a dict of column name -> expression, "
                    "e.g. {'y': col('x') * 2} (unnest() is not provided)"
                )
            named.extend(arg.items())
        return self._with_expressions(
            "with_columns", named, compute, num_cpus, num_gpus, resources, concurrency
        )

    def _with_expressions(
        self,
        verb: str,
        named: list[tuple[Any, Any]],
        compute: Any,
        num_cpus: Any,
        num_gpus: Any,
        resources: Any,
        concurrency: Any,
    ) -> Dataset:
        """The stage of ``with_column`` / ``with_columns``, checked here before any work."""
        columns: dict[str, Any] = {}
        for name, expr in named:
            if not isinstance(name, str) or not name:
                raise PlanError(f"{verb}: the column name {name!r} must be a non-empty string")
            columns[name] = self._value_expression(verb, name, expr)
        if not columns:
            return self  # as in Ray
        if verb == "with_column":
            ((only, node),) = columns.items()
            call = f"with_column({only!r}, {render(node)})"
        else:
            text = ", ".join(f"{n!r}: {render(node)}" for n, node in columns.items())
            call = f"with_columns({{{text if len(text) <= 80 else text[:77] + '...'}}})"
        known = self._known_columns()
        read = [c for node in columns.values() for c in columns_of(node)]
        missing = list(dict.fromkeys(c for c in read if known is not None and c not in known))
        if missing:
            raise PlanError(
                f"{call}: no column {', '.join(map(repr, missing))}; the dataset has "
                f"columns {known}"
            )
        if isinstance(compute, ActorPoolStrategy):
            raise PlanError(
                f"{call}: compute=ActorPoolStrategy(...) runs a class; an expression runs "
                "as tasks: drop compute=, or cap the tasks with concurrency=n"
            )
        res = _resources(verb, num_cpus, num_gpus, resources)
        task_cap = self._task_cap(verb, compute, concurrency)
        name = f"{'WithColumn' if verb == 'with_column' else 'WithColumns'}({', '.join(columns)})"
        transform = WithColumnsTransform(name, call, tuple(columns.items()))
        return self._with(
            MapStage(name=name, transform=transform, resources=res, concurrency=task_cap)
        )

    @staticmethod
    def _value_expression(verb: str, name: str, expr: Any) -> Any:
        """The tree of ``expr``, a ``daskinfer.expressions.Expr``, or a PlanError saying why not."""
        where = f"{verb}({name!r}, {expr!r})"
        if isinstance(expr, Expr):
            if isinstance(expr.node, ValueList):
                raise PlanError(f"{where}: a list is not a column's value; use is_in([...])")
            return expr.node
        if isinstance(expr, str):
            fix = "build it with daskinfer.expressions.col, e.g. col('x') * 2 (Ray takes no strings here)"
        elif callable(expr):
            fix = "for a function of the batch, use add_column(name, fn) or map_batches"
        else:
            fix = "for a constant, use daskinfer.expressions.lit(value)"
        raise PlanError(f"{where}: the value must be an expression; {fix}")

    def _project(self, call: str, transform: Transform, names: Sequence[str]) -> Dataset:
        known = self._known_columns()
        missing = [n for n in names if known is not None and n not in known]
        if missing:
            raise PlanError(
                f"{call}: columns {missing} do not exist; the dataset has columns {known}"
            )
        return self._with(MapStage(name=transform.stage, transform=transform))

    def select_columns(self, cols: str | Sequence[str], /) -> Dataset:
        """Keep only ``cols``, in that order."""
        names = [cols] if isinstance(cols, str) else list(cols)
        self._check_names("select_columns", names)
        return self._project(
            "select_columns", ProjectTransform("SelectColumns", select=names), names
        )

    def drop_columns(self, cols: str | Sequence[str], /) -> Dataset:
        """Remove ``cols``."""
        names = [cols] if isinstance(cols, str) else list(cols)
        self._check_names("drop_columns", names)
        return self._project("drop_columns", ProjectTransform("DropColumns", drop=names), names)

    def rename_columns(self, names: Mapping[str, str], /) -> Dataset:
        """Rename columns: ``{"old": "new"}``."""
        if not isinstance(names, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in names.items()
        ):
            raise PlanError(f"rename_columns({names!r}): pass a dict of old name -> new name")
        return self._project(
            "rename_columns", ProjectTransform("RenameColumns", rename=dict(names)), list(names)
        )

    @staticmethod
    def _check_names(call: str, names: list[Any]) -> None:
        if not names or not all(isinstance(n, str) for n in names):
            raise PlanError(f"{call}({names!r}): pass a column name or a list of column names")

    def _known_columns(self) -> list[str] | None:
        """Output columns where they follow from the plan without running it."""
        source = self._plan.source
        if isinstance(source, DaskSource):
            columns: list[str] | None = [str(c) for c in source.frame.columns]
        else:
            columns = None
        for op in self._plan.ops:
            t = op.transform if isinstance(op, MapStage) else None
            if isinstance(t, ProjectTransform) and t.select is not None:
                columns = list(t.select)  # known again, whatever came before
                continue
            if columns is None or isinstance(op, (Limit, Repartition)):
                continue
            if isinstance(t, ProjectTransform):
                if t.drop is not None:
                    columns = [c for c in columns if c not in t.drop]
                elif t.rename is not None:
                    columns = [t.rename.get(c, c) for c in columns]
            elif isinstance(t, AddColumnTransform):
                columns = [*columns, t.name] if t.name not in columns else columns
            elif isinstance(t, WithColumnsTransform):
                columns = [*columns, *(n for n, _ in t.columns if n not in columns)]
            elif (isinstance(t, RowTransform) and t.kind == "filter") or isinstance(
                t, (PredicateFilterTransform, SampleTransform)
            ):
                continue  # rows go, columns stay
            else:
                columns = None
        return columns

    def repartition(self, num_blocks: int, /, *, shuffle: bool = False) -> Dataset:
        """Re-cut the rows into ``num_blocks`` blocks.

        This is a barrier: all input is computed (and held on the workers) first. By
        default the blocks are of near-equal size and keep the rows' order.
        ``shuffle=True`` is Ray Data's all-to-all exchange: each input block is cut into
        ``num_blocks`` contiguous slices (``ceil(rows / num_blocks)`` rows each, the last
        ones shorter or empty) and output block ``i`` joins the ``i``-th slice of every
        input block, in input order. So each output block holds rows from every input
        block of at least ``num_blocks`` rows; the exchange is deterministic, not random
        (as in Ray; for a random order see ``iter_batches(local_shuffle_buffer_size=)``).
        Each slice is cut where its block lives, and an output task fetches only its
        slices.
        """
        _check_positive_int(num_blocks, "repartition(num_blocks", "use an integer >= 1)")
        if not isinstance(shuffle, bool):
            raise PlanError(f"repartition(shuffle={shuffle!r}): use True or False")
        return self._with(Repartition(num_blocks, shuffle=shuffle))

    def limit(self, limit: int, /) -> Dataset:
        """Keep the first ``limit`` rows; upstream work stops once they are produced."""
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise PlanError(f"limit({limit!r}): use an integer >= 0")
        return self._with(Limit(limit))

    def union(self, *others: Dataset) -> Dataset:
        """This Dataset's rows, then each of ``others``' rows, as one Dataset (lazy).

        As Ray Data's ``union``, of sources (readers, ``from_*``, materialized Datasets):
        apply stages after the union (``a.union(b).map_batches(...)``), which runs them
        once over both. Columns missing from one side are null there, as pandas concatenates.
        """
        import dask.dataframe as dd

        from daskinfer.io._source import keep_object_columns

        datasets = [self, *others]
        for position, ds in enumerate(datasets):
            if not isinstance(ds, Dataset):
                raise PlanError(
                    f"union(): argument {position} is {type(ds).__name__}, not a Dataset"
                )
            if ds._plan.ops:
                raise PlanError(
                    f"union(): {' -> '.join(ds._plan.describe())} has stages after its "
                    "source; daskinfer unions sources: union them first and apply the stages "
                    "to the union (di.read_parquet(a).union(di.read_parquet(b)).map_batches(...))"
                )
        if len(datasets) == 1:
            return self
        sources = [ds._plan.source for ds in datasets]
        frames = [
            src.frame if isinstance(src, DaskSource) else Dataset(LogicalPlan(src)).to_dask()
            for src in sources
        ]
        with keep_object_columns():  # N-D values must not become strings
            frame = dd.concat(frames)
        files: tuple[str, ...] = ()
        storage_options: dict[str, Any] = {}
        options: dict[str, Any] = {}
        file_sources = [s for s in sources if isinstance(s, DaskSource) and s.files]
        if len(file_sources) == len(sources) and all(
            dict(s.storage_options) == dict(file_sources[0].storage_options) for s in file_sources
        ):
            # read again from the same files after a crash (write_*(resume=True))
            files = tuple(f for s in file_sources for f in s.files)
            storage_options = dict(file_sources[0].storage_options)
            options = {"union": [{"reader": s.name, **dict(s.options)} for s in file_sources]}
        rows = [s.rows if isinstance(s, DaskSource) else sum(s.rows) for s in sources]
        source = DaskSource(
            frame,
            f"Union({', '.join(s.name for s in sources)})",
            sum(r for r in rows if r is not None) if all(r is not None for r in rows) else None,
            files,
            storage_options,
            options,
            materialized=all(
                isinstance(s, BlocksSource) or (isinstance(s, DaskSource) and s.materialized)
                for s in sources
            ),
        )
        return Dataset(LogicalPlan(source))

    # --- all-to-all verbs (Ray Data's; rows moved between workers by dask) --------
    def sort(self, key: str | list[str], descending: bool | list[bool] = False) -> Dataset:
        """The rows ordered by ``key`` (a column, or several, the first first).

        As in Ray Data, a barrier: every output block may need rows of every input
        block. Here it runs the pipeline up to it when called (Ray: when the result is
        consumed), lets dask's shuffle move the rows between workers, and continues from
        the sorted rows held in the cluster's memory, as ``materialize()`` does. Rows
        with equal keys keep their order (a stable sort); nulls come last.
        """
        from daskinfer._internal import alltoall

        keys = self._key_columns("sort", key)
        if isinstance(descending, bool):
            order = [descending] * len(keys)
        elif (
            isinstance(descending, list | tuple)
            and len(descending) == len(keys)
            and all(isinstance(d, bool) for d in descending)
        ):
            order = list(descending)
        else:
            raise PlanError(
                f"sort(descending={descending!r}): use True or False, or one of them per "
                f"key ({len(keys)} of them)"
            )
        frame = self.to_dask()
        if not len(frame.columns):  # no rows, so no columns to sort by
            return Dataset._no_rows()
        sorted_frame = alltoall.sort_frame(frame, keys, [not d for d in order])
        return self._held(alltoall.persisted(sorted_frame), f"Sort[{', '.join(keys)}]")

    def random_shuffle(self, *, seed: int | None = None, num_blocks: int | None = None) -> Dataset:
        """The rows in a random order, every row once; the same ``seed`` gives the same order.

        A barrier, run when called, as ``sort``: each row goes to a random block
        (``num_blocks`` of them, by default as many as there are now) and each block's
        rows are put in a random order. A row's draw comes from the seed and its
        position, so a seed gives the same order on every run of the same data, however
        the blocks were cut.
        """
        from daskinfer._internal import alltoall

        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise PlanError(f"random_shuffle(seed={seed!r}): use an integer >= 0, or None")
        if num_blocks is not None and (
            not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1
        ):
            raise PlanError(f"random_shuffle(num_blocks={num_blocks!r}): use an integer >= 1")
        frame, rows = self._to_dask_with_rows()
        if not len(frame.columns):
            return Dataset._no_rows()
        if seed is None:
            seed = secrets.randbits(63)
        shuffled = alltoall.shuffle_frame(frame, rows, seed, num_blocks)
        return self._held(alltoall.persisted(shuffled), "RandomShuffle")

    # --- splitting and zipping (Ray Data's; over materialized blocks) -------------
    def split_at_indices(self, indices: list[int]) -> list[Dataset]:
        """Materialized Datasets of the rows before ``indices[0]``, between each two
        positions, and after the last (``len(indices) + 1`` of them; a position past
        the end is the end), as in Ray Data. Runs the pipeline; a block a cut falls in
        is sliced on its worker, whole blocks are shared."""
        from daskinfer._internal import splits

        positions = splits.check_indices(indices, "split_at_indices")
        mat = self.materialize()
        source = mat._plan.source
        assert isinstance(source, BlocksSource)
        total = sum(source.rows)
        bounds = [0, *(min(i, total) for i in positions), total]
        client = cluster.current_client()
        parts = []
        for start, stop in itertools.pairwise(bounds):
            futures, rows, nbytes = [], [], []
            for number, lo, hi in splits.pieces_of(source.rows, start, stop):
                block, count = source.futures[number], source.rows[number]
                if (lo, hi) != (0, count):
                    block = client.submit(splits.slice_rows, block, lo, hi, pure=False)
                futures.append(block)
                rows.append(hi - lo)
                nbytes.append(source.nbytes[number] * (hi - lo) // max(count, 1))
            parts.append(
                Dataset(LogicalPlan(BlocksSource(tuple(futures), tuple(rows), tuple(nbytes))))
            )
        return parts

    def split(self, n: int, *, equal: bool = False, locality_hints: Any = None) -> list[Dataset]:
        """``n`` materialized Datasets of consecutive rows, as Ray Data's ``split``.

        Their row counts differ by at most one; with ``equal=True`` each has exactly
        ``count // n`` rows and the rest are dropped, as Ray does.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise PlanError(f"split(n={n!r}): use an integer >= 1")
        if locality_hints is not None:
            raise PlanError(
                "split(locality_hints=...): Ray's actor placement hints; here the splits' "
                "blocks stay on the workers that hold them"
            )
        mat = self.materialize()
        total = mat.count()
        each, extra = divmod(total, n)
        sizes = [each] * n if equal else [each + (1 if k < extra else 0) for k in range(n)]
        cuts = list(itertools.accumulate(sizes))
        parts = mat.split_at_indices(cuts[:-1])
        if equal and extra:
            parts[-1] = parts[-1].split_at_indices([each])[0]
        return parts

    def split_proportionately(self, proportions: list[float]) -> list[Dataset]:
        """Materialized Datasets holding these fractions of the rows, plus one with the
        rest (``len(proportions) + 1``), as in Ray Data: the proportions are each above
        0 and sum to less than 1."""
        if (
            not isinstance(proportions, list | tuple)
            or not proportions
            or not all(isinstance(p, int | float) and not isinstance(p, bool) for p in proportions)
            or any(p <= 0 for p in proportions)
            or sum(proportions) >= 1
        ):
            raise PlanError(
                f"split_proportionately(proportions={proportions!r}): give fractions above 0 "
                "that sum to less than 1 (the rest is the last split)"
            )
        mat = self.materialize()
        total = mat.count()
        cuts = [int(total * share) for share in itertools.accumulate(proportions)]
        return mat.split_at_indices(cuts)

    def train_test_split(
        self,
        test_size: float,
        *,
        shuffle: bool = False,
        seed: int | None = None,
        stratify: Any = None,
    ) -> tuple[Dataset, Dataset]:
        """``(train, test)``: the last ``test_size`` rows (a count, or a fraction of
        them) are the test split, after a ``random_shuffle(seed=seed)`` with
        ``shuffle=True``, as in Ray Data."""
        if stratify is not None:
            raise PlanError(
                "train_test_split(stratify=...): not provided; split each class's rows "
                "(filter) and union the splits"
            )
        fraction = isinstance(test_size, float)
        if (
            isinstance(test_size, bool)
            or not isinstance(test_size, int | float)
            or ((fraction and not 0 < test_size < 1) or (not fraction and test_size < 1))
        ):
            raise PlanError(
                f"train_test_split(test_size={test_size!r}): give a fraction between 0 and "
                "1, or a number of rows >= 1"
            )
        source = self.random_shuffle(seed=seed) if shuffle else self.materialize()
        total = source.count()
        test_rows = int(total * test_size) if fraction else int(test_size)
        if test_rows > total:
            raise PlanError(
                f"train_test_split(test_size={test_size!r}): the dataset has {total} rows"
            )
        train, test = source.split_at_indices([total - test_rows])
        return train, test

    def zip(self, *others: Dataset) -> Dataset:
        """This Dataset's columns, then each of ``others``', row by row (as Ray Data's
        ``zip``). All must have as many rows; a column name taken already gets the
        suffix ``_1`` (``_2`` for the second other ...). Runs the pipelines."""
        from daskinfer._internal import splits

        if not others or not all(isinstance(o, Dataset) for o in others):
            raise PlanError(f"zip({others!r}): give one or more Datasets")
        sources = [cast(BlocksSource, ds.materialize()._plan.source) for ds in (self, *others)]
        counts = [sum(s.rows) for s in sources]
        if len(set(counts)) > 1:
            raise PlanError(
                f"zip: the datasets have {counts} rows; they must have as many rows each"
            )
        left, rights = sources[0], sources[1:]
        client = cluster.current_client()
        futures: list[Any] = []
        nbytes: list[int] = []
        offset = 0
        for block, count, size in zip(left.futures, left.rows, left.nbytes, strict=True):
            layout: list[list[tuple[int, int]]] = []
            pieces: list[Any] = []
            for right in rights:
                found = splits.pieces_of(right.rows, offset, offset + count)
                layout.append([(lo, hi) for _, lo, hi in found])
                pieces.extend(right.futures[number] for number, _, _ in found)
                size += sum(
                    right.nbytes[n] * (hi - lo) // max(right.rows[n], 1) for n, lo, hi in found
                )
            futures.append(client.submit(splits.zip_columns, block, layout, *pieces, pure=False))
            nbytes.append(size)
            offset += count
        return Dataset(LogicalPlan(BlocksSource(tuple(futures), left.rows, tuple(nbytes))))

    def groupby(self, key: str | list[str]) -> GroupedData:
        """The rows grouped by ``key`` (a column or several): ``map_groups`` and the
        aggregates (``count``, ``sum``, ``min``, ``max``, ``mean``, ``std``), as Ray Data's
        ``GroupedData``. Nothing runs until one of those is called."""
        from daskinfer.grouped import GroupedData

        return GroupedData(self, self._key_columns("groupby", key))

    def _key_columns(self, call: str, key: Any) -> list[str]:
        if isinstance(key, str):
            keys = [key]
        elif isinstance(key, list | tuple) and key and all(isinstance(k, str) for k in key):
            keys = list(key)
        else:
            raise PlanError(f"{call}(key={key!r}): give a column name, or a list of them")
        self._require_columns(call, keys)
        return keys

    def _require_columns(self, call: str, columns: Sequence[str]) -> None:
        """Fail before any work where the plan knows the columns and one is missing."""
        known = self._known_columns()
        missing = [c for c in columns if known is not None and c not in known]
        if missing:
            raise PlanError(
                f"{call}: no column {missing[0]!r} in the dataset (its columns: {known})"
            )

    @staticmethod
    def _no_rows() -> Dataset:
        """A materialized Dataset of no blocks: what ``materialize()`` of an empty one
        gives, for a verb that found no rows after running the pipeline once."""
        return Dataset(LogicalPlan(BlocksSource((), (), ())))

    @staticmethod
    def _held(frame: Any, name: str) -> Dataset:
        """A Dataset over a dask frame persisted on the cluster."""
        from daskinfer.io._source import _dataset

        return _dataset(frame, name, materialized=True)

    def random_sample(self, fraction: float, /, *, seed: int | None = None) -> Dataset:
        """Keep each row with probability ``fraction`` (about that share of the rows), in order.

        As Ray Data's: the count is not exact. ``seed`` makes the sample the same on each
        run over the same data and blocks; without it, each run samples afresh.
        """
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, numbers.Real)
            or not 0 <= fraction <= 1
        ):
            raise PlanError(f"random_sample({fraction!r}): give a fraction from 0 to 1")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise PlanError(f"random_sample(seed={seed!r}): give an integer >= 0, or None")
        return self._with(
            MapStage(
                name="RandomSample",
                transform=SampleTransform("RandomSample", float(fraction), seed),
            )
        )

    # ------------------------------------------------------------------ execution
    def _execute(
        self, client: Any = None, *, consumer_prefetch: int = 0, keep_origins_apart: bool = False
    ) -> StreamingExecutor:
        from daskinfer._internal.executor import execute

        ex = execute(
            self._plan,
            client,
            consumer_prefetch=consumer_prefetch,
            keep_origins_apart=keep_origins_apart,
        )
        self._last_stats = ex.stats
        return ex

    def iter_internal_blocks(
        self, *, prefetch_blocks: int = 1, client: Any = None
    ) -> Iterator[pd.DataFrame]:
        """Yield output blocks (pandas) in order, fetching ``prefetch_blocks`` ahead."""
        for _, block in self._iter_output(prefetch_blocks, client, keep_origins_apart=False):
            yield block

    def _iter_output(
        self, prefetch_blocks: int, client: Any, *, keep_origins_apart: bool
    ) -> Iterator[tuple[int | None, pd.DataFrame]]:
        """Output blocks in order, each with the position of its source block (if one)."""
        # several fetches in flight hide the per-fetch round trip, which otherwise caps
        # a stream of small blocks at a few hundred per second
        window = max(prefetch_blocks, _MIN_FETCHES_IN_FLIGHT)
        ex = self._execute(
            client, consumer_prefetch=window + 1, keep_origins_apart=keep_origins_apart
        )
        # blocks fetched or being fetched: each with its group's fetch and its place in it
        pending: collections.deque[tuple[Any, concurrent.futures.Future[Any], int]] = (
            collections.deque()
        )
        pool = concurrent.futures.ThreadPoolExecutor(window, thread_name_prefix="daskinfer-fetch")
        try:
            while True:
                # start fetching what is ready, up to the window, once half of it has
                # been used up, so that fetches go out in groups; wait only when nothing
                # is pending (waiting with blocks in hand could starve the executor,
                # whose memory budget counts the blocks we hold)
                group: list[Any] = []
                if len(pending) <= window // 2:
                    held = sum(ref.nbytes for ref, _, _ in pending)
                    while len(pending) + len(group) < window:
                        if (pending or group) and held >= _MAX_FETCH_BYTES:
                            break
                        ref = ex.next_output(block=not pending and not group)
                        if ref is None:
                            break
                        group.append(ref)
                        held += ref.nbytes
                if group:
                    # one gather for all the blocks ready at once: one round trip to the
                    # scheduler and one request per worker instead of one per block (a
                    # block each from W6's 8 sleeping actors, 160 a second, was more
                    # than the client fetched one by one on two cores, and the actors
                    # stood idle while the outputs waiting for it held the pool back)
                    fetch = pool.submit(_gather, [ref.future for ref in group])
                    pending.extend((ref, fetch, i) for i, ref in enumerate(group))
                if not pending:
                    return
                ref, fetch, i = pending.popleft()
                block = fetch.result()[i]
                origin = ref.origin
                ex.consumed(ref)
                yield origin, block
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            ex.close()

    def iter_batches(
        self,
        *,
        batch_size: int | None = 256,
        batch_format: str = "numpy",
        prefetch_batches: int = 1,
        drop_last: bool = False,
        local_shuffle_buffer_size: int | None = None,
        local_shuffle_seed: int | None = None,
    ) -> Iterator[Any]:
        """Stream batches to this process as they are produced, in order.

        ``batch_size=None`` yields whole blocks. Batches are exact except the last one
        (dropped with ``drop_last=True``).

        ``local_shuffle_buffer_size=n`` shuffles the rows on their way, as Ray Data does:
        rows are buffered in this process, and once the buffer holds at least ``n`` rows
        (and at least a batch) each batch is drawn at random from it; when no more rows
        come, the rest is drained. Every row comes exactly once. A larger buffer mixes
        rows from further apart, at the cost of memory here and of a later first batch.
        ``local_shuffle_seed`` makes the order reproducible, whatever the block sizes of
        a run, as long as the rows come in the same order (``preserve_order``, the
        default); without a buffer it does nothing, as in Ray.
        """
        shuffle = self._check_iteration(
            "iter_batches",
            batch_size,
            prefetch_batches,
            local_shuffle_buffer_size,
            local_shuffle_seed,
        )
        fmt = _check_batch_format(batch_format, "iter_batches")
        if not isinstance(drop_last, bool):
            raise PlanError(f"iter_batches(drop_last={drop_last!r}): use True or False")
        return self._iter_batches(batch_size, fmt, prefetch_batches, drop_last, shuffle)

    @staticmethod
    def _check_iteration(
        call: str,
        batch_size: Any,
        prefetch_batches: Any,
        local_shuffle_buffer_size: Any,
        local_shuffle_seed: Any,
    ) -> tuple[int, int | None] | None:
        """Check the arguments of an iterating call; the shuffle (buffer rows, seed) or None."""
        if batch_size is not None:
            _check_positive_int(
                batch_size,
                f"{call}(batch_size",
                "use an integer >= 1, or None for whole blocks)",
            )
        if not isinstance(prefetch_batches, int) or prefetch_batches < 0:
            raise PlanError(f"{call}(prefetch_batches={prefetch_batches!r}): use an integer >= 0")
        if local_shuffle_seed is not None and (
            not isinstance(local_shuffle_seed, numbers.Integral)
            or isinstance(local_shuffle_seed, bool)
            or local_shuffle_seed < 0
        ):
            raise PlanError(
                f"{call}(local_shuffle_seed={local_shuffle_seed!r}): use an integer >= 0, "
                "or None for a different order on each run"
            )
        if local_shuffle_buffer_size is None:
            return None
        _check_positive_int(
            local_shuffle_buffer_size,
            f"{call}(local_shuffle_buffer_size",
            "use an integer >= 1 (rows buffered here to draw batches from; a buffer "
            "smaller than batch_size counts as one batch), or None for no shuffle)",
        )
        if batch_size is None:
            # as Ray: whole blocks cannot be drawn at random from a buffer of rows
            raise PlanError(
                f"{call}(local_shuffle_buffer_size={local_shuffle_buffer_size}) needs a "
                "batch_size: shuffled batches are drawn from the buffer row by row; give "
                "batch_size=n instead of None"
            )
        seed = int(local_shuffle_seed) if local_shuffle_seed is not None else None
        return int(local_shuffle_buffer_size), seed

    def _iter_batches(
        self,
        batch_size: int | None,
        fmt: str,
        prefetch: int,
        drop_last: bool,
        shuffle: tuple[int, int | None] | None = None,
    ) -> Iterator[Any]:
        if shuffle is not None:
            assert batch_size is not None  # _check_iteration refused a shuffle without one
            yield from self._iter_shuffled_batches(batch_size, fmt, prefetch, drop_last, shuffle)
            return
        # blocks not yet handed out, and how many rows of the first one were; slicing
        # by offset keeps this linear in the rows (re-concatenating the rest after each
        # batch would copy a large block once per batch)
        if batch_size is not None and fmt == "numpy":
            yield from self._iter_numpy_batches(batch_size, prefetch, drop_last)
            return
        buffered: collections.deque[pd.DataFrame] = collections.deque()
        offset = rows = 0
        for block in self.iter_internal_blocks(prefetch_blocks=prefetch):
            if batch_size is None:
                if len(block):
                    yield block_to_batch(block, fmt)
                continue
            if not len(block):
                continue
            buffered.append(block)
            rows += len(block)
            while rows >= batch_size:
                pieces, wanted = [], batch_size
                while wanted:
                    head = buffered[0]
                    stop = min(len(head), offset + wanted)
                    pieces.append(head.iloc[offset:stop])
                    wanted -= stop - offset
                    if stop == len(head):
                        buffered.popleft()
                        offset = 0
                    else:
                        offset = stop
                rows -= batch_size
                yield block_to_batch(concat_blocks(pieces).reset_index(drop=True), fmt)
        if batch_size is not None and rows and not drop_last:
            pieces = [buffered[0].iloc[offset:], *list(buffered)[1:]]
            yield block_to_batch(concat_blocks(pieces).reset_index(drop=True), fmt)

    def _iter_numpy_batches(self, batch_size: int, prefetch: int, drop_last: bool) -> Iterator[Any]:
        # each block becomes numpy columns once; batches are slices of them, joined
        # with np.concatenate only where a batch spans two blocks
        buffered: collections.deque[dict[str, Any]] = collections.deque()
        offset = rows = 0

        def take(n: int) -> dict[str, Any]:
            nonlocal offset, rows
            pieces = []
            while n:
                head = buffered[0]
                length = len(next(iter(head.values()))) if head else 0
                stop = min(length, offset + n)
                pieces.append({k: v[offset:stop] for k, v in head.items()})
                n -= stop - offset
                rows -= stop - offset
                if stop == length:
                    buffered.popleft()
                    offset = 0
                else:
                    offset = stop
            if len(pieces) == 1:
                return pieces[0]
            return {k: join_column_pieces([p[k] for p in pieces]) for k in pieces[0]}

        for block in self.iter_internal_blocks(prefetch_blocks=prefetch):
            if not len(block) or not len(block.columns):
                continue
            buffered.append(block_to_batch(block, "numpy"))
            rows += len(block)
            while rows >= batch_size:
                yield take(batch_size)
        if rows and not drop_last:
            yield take(rows)

    def _iter_shuffled_batches(
        self,
        batch_size: int,
        fmt: str,
        prefetch: int,
        drop_last: bool,
        shuffle: tuple[int, int | None],
    ) -> Iterator[Any]:
        from daskinfer._internal.local_shuffle import NUMPY_ROWS, PANDAS_ROWS, shuffled_batches

        buffer_rows, seed = shuffle
        blocks = self.iter_internal_blocks(prefetch_blocks=prefetch)
        if fmt == "numpy":
            # each block becomes numpy columns once, as unshuffled batches do; the
            # buffer permutes and slices the arrays
            pieces = (block_to_batch(b, "numpy") for b in blocks if len(b) and len(b.columns))
            yield from shuffled_batches(
                pieces, NUMPY_ROWS, batch_size, buffer_rows, seed, drop_last
            )
            return
        for batch in shuffled_batches(
            blocks, PANDAS_ROWS, batch_size, buffer_rows, seed, drop_last
        ):
            yield block_to_batch(batch, fmt)

    def iter_rows(self) -> Iterator[dict[str, Any]]:
        """Stream rows (dicts) to this process, in order."""
        for block in self.iter_internal_blocks():
            yield from rows_of(block)

    def iter_torch_batches(
        self,
        *,
        batch_size: int | None = 256,
        dtypes: Any = None,
        device: str = "cpu",
        collate_fn: Callable[[dict[str, Any]], Any] | None = None,
        prefetch_batches: int = 1,
        drop_last: bool = False,
        local_shuffle_buffer_size: int | None = None,
        local_shuffle_seed: int | None = None,
    ) -> Iterator[Any]:
        """Like ``iter_batches``, with numeric columns as ``torch.Tensor`` on ``device``.

        Text columns stay numpy object arrays. ``dtypes`` is one torch dtype or a dict
        per column; ``collate_fn`` replaces the conversion entirely. ``device="auto"``
        (Ray's default) is this process's GPU where torch sees one, else the CPU.
        ``local_shuffle_buffer_size`` and ``local_shuffle_seed`` shuffle the rows as in
        ``iter_batches``.
        """
        import torch

        # checked here, at the call, and under this call's name; iter_batches checks again
        self._check_iteration(
            "iter_torch_batches",
            batch_size,
            prefetch_batches,
            local_shuffle_buffer_size,
            local_shuffle_seed,
        )
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise PlanError(
                f"iter_torch_batches(device={device!r}): not a torch device ({exc}); use "
                "'cpu', 'cuda', 'cuda:0' or 'auto'"
            ) from None
        if not isinstance(drop_last, bool):
            raise PlanError(f"iter_torch_batches(drop_last={drop_last!r}): use True or False")
        batches = self.iter_batches(
            batch_size=batch_size,
            batch_format="numpy",
            prefetch_batches=prefetch_batches,
            drop_last=drop_last,
            local_shuffle_buffer_size=local_shuffle_buffer_size,
            local_shuffle_seed=local_shuffle_seed,
        )
        return self._torch_batches(batches, dtypes, device, collate_fn)

    @staticmethod
    def _torch_batches(
        batches: Iterator[dict[str, Any]],
        dtypes: Any,
        device: str,
        collate_fn: Callable[[dict[str, Any]], Any] | None,
    ) -> Iterator[Any]:
        import torch

        for batch in batches:
            if collate_fn is not None:
                yield collate_fn(batch)
                continue
            out = {}
            for name, values in batch.items():
                if values.dtype == object or values.dtype.kind in "USO":
                    out[name] = values
                    continue
                dtype = dtypes.get(name) if isinstance(dtypes, Mapping) else dtypes
                if not values.flags.writeable:
                    # arrays that share memory with a fetched block are read-only; torch
                    # warns on those (and writing to the tensor would be undefined)
                    values = values.copy()
                out[name] = torch.as_tensor(values, dtype=dtype, device=device)
            yield out

    def to_pandas(self, limit: int | None = None) -> pd.DataFrame:
        """Gather the rows to this process as one ``pandas.DataFrame``.

        As in Ray Data, ``limit`` is a guard, not a truncation: a dataset of more rows
        raises (after reading ``limit + 1`` of them). ``ds.limit(n).to_pandas()`` truncates.
        """
        if limit is not None and (
            not isinstance(limit, int) or isinstance(limit, bool) or limit < 0
        ):
            raise PlanError(f"to_pandas(limit={limit!r}) is not valid: use an integer >= 0")
        return self._all_within(
            limit, "to_pandas", f"or truncate first: ds.limit({limit}).to_pandas()"
        )

    def _all_within(self, limit: int | None, call: str, fix: str) -> pd.DataFrame:
        """All rows, reading at most ``limit + 1`` of them; more than ``limit`` raise."""
        df = self._head(limit + 1 if limit is not None else None)
        if limit is not None and len(df) > limit:
            raise PlanError(
                f"{call}(limit={limit}): the dataset has more than {limit} rows; raise "
                f"the limit, {fix}"
            )
        return df

    def _head(self, n: int | None) -> pd.DataFrame:
        """The first ``n`` rows (all with ``None``) in one DataFrame, in this process."""
        ds = self.limit(n) if n is not None else self
        blocks = list(ds.iter_internal_blocks(prefetch_blocks=4))
        self._last_stats = ds._last_stats
        return concat_blocks(blocks) if blocks else pd.DataFrame()

    def to_arrow(self) -> pa.Table:
        """Gather the rows to this process as one ``pyarrow.Table``."""
        return block_to_arrow(self.to_pandas())

    def take(self, limit: int = 20) -> list[dict[str, Any]]:
        """The first ``limit`` rows, as dicts."""
        return rows_of(self._head(limit))

    def take_all(self, limit: int | None = None) -> list[dict[str, Any]]:
        """All rows as dicts; raises if there are more than ``limit``."""
        return rows_of(self._all_within(limit, "take_all", "or use take(n) / iter_rows()"))

    def take_batch(self, batch_size: int = 20, *, batch_format: str = "numpy") -> Any:
        """The first ``batch_size`` rows as one batch; raises if there are none (as Ray)."""
        _check_positive_int(batch_size, "take_batch(batch_size", "use an integer >= 1)")
        fmt = _check_batch_format(batch_format, "take_batch")
        head = self._head(batch_size)
        if not len(head):
            raise PlanError(
                "take_batch(): the dataset is empty, so there is no batch to return; "
                "take(n) or take_all() return an empty list instead"
            )
        return block_to_batch(head, fmt)

    def show(self, limit: int = 20) -> None:
        """Print the first ``limit`` rows."""
        for row in self.take(limit):
            print(row)

    def count(self) -> int:
        """Number of rows (computed on the workers; no data comes to this process)."""
        ex = self._execute()
        total = 0
        for ref in ex:
            total += ref.rows
            ex.consumed(ref)
        return total

    # --- aggregates (Ray Data's; each block reduced on its worker) -----------------
    def sum(self, on: str | list[str] | None = None, ignore_nulls: bool = True) -> Any:
        """Sum of a column (a value), or of several (``{"sum(a)": ..., ...}``).

        As in Ray Data: ``on=None`` takes every column; nulls (None, NaN, NaT) are
        skipped, or with ``ignore_nulls=False`` make the result ``None``; an empty
        dataset, or a column of nulls only, gives ``None``. Each block is summed on its
        worker; only the partial sums come to this process.
        """
        return self._aggregate("sum", on, ignore_nulls)

    def min(self, on: str | list[str] | None = None, ignore_nulls: bool = True) -> Any:
        """Smallest value of a column, or of several (``{"min(a)": ...}``); see ``sum``."""
        return self._aggregate("min", on, ignore_nulls)

    def max(self, on: str | list[str] | None = None, ignore_nulls: bool = True) -> Any:
        """Largest value of a column, or of several (``{"max(a)": ...}``); see ``sum``."""
        return self._aggregate("max", on, ignore_nulls)

    def mean(self, on: str | list[str] | None = None, ignore_nulls: bool = True) -> Any:
        """Mean of a column, or of several (``{"mean(a)": ...}``); see ``sum``."""
        return self._aggregate("mean", on, ignore_nulls)

    def std(
        self, on: str | list[str] | None = None, ddof: int = 1, ignore_nulls: bool = True
    ) -> Any:
        """Standard deviation (divisor ``count - ddof``) of a column, or of several.

        Combined from each block's count, mean and squared deviations, as Ray Data's
        Welford-style ``std`` (one value gives 0.0); otherwise as ``sum``.
        """
        if not isinstance(ddof, int) or isinstance(ddof, bool) or ddof < 0:
            raise PlanError(f"std(ddof={ddof!r}): use an integer >= 0 (1 for the sample std)")
        return self._aggregate("std", on, ignore_nulls, ddof=ddof)

    def unique(self, column: str, ignore_nulls: bool = False) -> list[Any]:
        """The distinct values of ``column``, in order of first appearance.

        As in Ray Data, nulls count as a value unless ``ignore_nulls=True``. Each block
        finds its own distinct values on its worker; only those come to this process.
        """
        from daskinfer._internal import aggregate

        if not isinstance(column, str):
            raise PlanError(f"unique(column={column!r}): give one column name")
        self._check_aggregate_args("unique", [column], ignore_nulls)
        partials = self.map_batches(
            aggregate.UniqueValues(column), batch_size=None, batch_format="pandas"
        ).to_pandas()
        lists = list(partials[aggregate.PARTIAL_COLUMN]) if len(partials) else []
        return aggregate.merge_unique(lists, ignore_nulls=ignore_nulls)

    def _aggregate(
        self, kind: str, on: str | list[str] | None, ignore_nulls: bool, ddof: int = 1
    ) -> Any:

        if on is None:
            columns = self.columns()
        elif isinstance(on, str):
            columns = [on]
        elif isinstance(on, list | tuple) and on and all(isinstance(c, str) for c in on):
            columns = list(on)
        else:
            raise PlanError(
                f"{kind}(on={on!r}): give a column name, a list of them, or None for all"
            )
        self._check_aggregate_args(kind, columns, ignore_nulls)
        from daskinfer.aggregate import BY_KIND

        options: dict[str, Any] = {"ddof": ddof} if kind == "std" else {}
        aggs = [BY_KIND[kind](c, ignore_nulls=ignore_nulls, **options) for c in columns]
        results, rows = self._run_aggregates(kind, aggs)
        if not rows:
            return None  # no rows at all, as Ray Data
        # as Ray Data: one column gives its value, several a mapping
        return next(iter(results.values())) if len(results) == 1 else results

    def aggregate(self, *aggs: AggregateFn) -> dict[str, Any]:
        """Several aggregates in one pass: ``{name: value}``, as Ray Data's ``aggregate``.

        ``aggs`` are ``daskinfer.aggregate``'s ``Count``, ``Sum``, ``Min``, ``Max``,
        ``Mean`` and ``Std`` (``from ray.data.aggregate import ...`` ports by changing
        the import); each is named ``"sum(x)"`` or by its ``alias_name``. Every block
        is reduced once, on its worker, for all of them.
        """
        from daskinfer._internal.aggregate import NUMERIC_KINDS
        from daskinfer.aggregate import check_aggregates

        check_aggregates("aggregate", aggs)
        for agg in aggs:
            if agg.on is not None and agg.kind in NUMERIC_KINDS:
                self._check_aggregate_args(agg.kind, [agg.on], agg.ignore_nulls)
        self._require_columns("aggregate", [a.on for a in aggs if a.on is not None])
        return self._run_aggregates("aggregate", list(aggs))[0]

    def _run_aggregates(self, call: str, aggs: Sequence[AggregateFn]) -> tuple[dict[str, Any], int]:
        """``{name: value}`` of ``aggs``, and the rows they saw: every block reduced once,
        on its worker, to the partial results all of them need, combined here."""
        from daskinfer._internal import aggregate

        wanted: dict[str, list[str]] = {}
        for agg in aggs:
            if agg.on is not None:  # a Count needs the column's counts only
                wanted.setdefault(agg.on, []).extend([] if agg.kind == "count" else [agg.kind])
        reduce = aggregate.PartialAggregates(
            call, tuple((c, tuple(dict.fromkeys(k))) for c, k in wanted.items())
        )
        partials = self.map_batches(reduce, batch_size=None, batch_format="pandas").to_pandas()
        rows = list(partials[aggregate.PARTIAL_COLUMN]) if len(partials) else []
        merged = aggregate.combine(rows, list(wanted))
        return {agg.name(): agg.result(merged) for agg in aggs}, merged[aggregate.ROWS].count

    def _check_aggregate_args(self, kind: str, columns: list[str], ignore_nulls: Any) -> None:
        if not isinstance(ignore_nulls, bool):
            raise PlanError(f"{kind}(ignore_nulls={ignore_nulls!r}): use True or False")
        self._require_columns(kind, columns)
        source = self._plan.source
        if kind in ("sum", "mean", "std") and not self._plan.ops and isinstance(source, DaskSource):
            # the source's types are known here: text fails now, not on the workers
            dtypes = source.frame.dtypes
            for name in columns:
                if not (
                    pd.api.types.is_numeric_dtype(dtypes[name])
                    or pd.api.types.is_bool_dtype(dtypes[name])
                ):
                    raise PlanError(
                        f"{kind}({name!r}): the column holds {dtypes[name]}, not numbers"
                    )

    def num_blocks(self) -> int:
        """Number of blocks of a materialized Dataset, without running anything.

        As in Ray Data, only a materialized Dataset has a fixed number of blocks: the
        result of ``materialize()``, and that of a ``from_*`` (``from_pandas``,
        ``from_items``, ``from_numpy``, ``from_arrow``, ``from_dask``), which Ray returns
        materialized and whose blocks here are its partitions. Any other Dataset (a
        reader's, ``range``'s, or one with a verb applied) raises ``PlanError``, where
        Ray raises ``NotImplementedError``: call ``materialize()`` first.
        """
        source = self._plan.source
        if not self._plan.ops:
            if isinstance(source, BlocksSource):
                return len(source.futures)
            if isinstance(source, DaskSource) and source.materialized:
                return int(source.frame.npartitions)
        raise PlanError(
            f"num_blocks() of {self!r}: the number of blocks is known only once the "
            "Dataset is materialized (it changes as the pipeline runs, as in Ray Data); "
            "call ds.materialize().num_blocks()"
        )

    def size_bytes(self) -> int:
        """In-memory size of the rows, in bytes; runs the pipeline unless materialized.

        The sum of the output blocks' sizes, as the workers measure them (no data comes
        to this process); a materialized Dataset answers from its blocks without a run.
        As in Ray Data, but the size is that of the pandas blocks (numbers as in Arrow,
        e.g. 8 bytes a row for ``range``'s int64 ``id``; text and object columns count
        their Python objects), and Ray answers ``range`` and ``from_*`` without a run.
        """
        source = self._plan.source
        if not self._plan.ops and isinstance(source, BlocksSource):
            return int(sum(source.nbytes))
        ex = self._execute()
        total = 0
        for ref in ex:
            total += ref.nbytes
            ex.consumed(ref)
        return total

    def input_files(self) -> list[str]:
        """The files the Dataset reads, without running anything; ``[]`` if none.

        As in Ray Data: whatever verbs follow the reader, in the paths' order (each
        once), as the filesystem names them (``/data/a.csv``, ``bucket/key.parquet``:
        no ``file://`` or ``s3://``). A ``from_*``, ``range`` or a materialized Dataset
        reads no files. (Ray 2.60 gives ``[]`` for ``read_parquet``; here its files.)
        """
        from fsspec.core import split_protocol

        source = self._plan.source
        if not isinstance(source, DaskSource):
            return []
        return list(dict.fromkeys(split_protocol(url)[1] for url in source.files))

    def materialize(self) -> Dataset:
        """Run the pipeline and keep its output blocks in the cluster's memory."""
        ex = self._execute()
        futures, rows, nbytes = [], [], []
        for ref in ex:
            futures.append(ref.future)
            rows.append(ref.rows)
            nbytes.append(ref.nbytes)
            ex.consumed(ref)
        ds = Dataset(LogicalPlan(BlocksSource(tuple(futures), tuple(rows), tuple(nbytes))))
        ds._last_stats = ex.stats
        return ds

    def to_dask(self) -> dd.DataFrame:
        """Run the pipeline and return its output as a dask DataFrame (held on workers)."""
        return self._to_dask_with_rows()[0]

    def _to_dask_with_rows(self) -> tuple[dd.DataFrame, tuple[int, ...]]:
        """``to_dask()``, and the number of rows of each of its partitions."""
        import dask.dataframe as dd

        mat = self.materialize()
        source = mat._plan.source
        assert isinstance(source, BlocksSource)
        if not source.futures:
            return dd.from_pandas(pd.DataFrame(), npartitions=1), (0,)
        meta = source.futures[0].client.submit(lambda b: b.iloc[:0], source.futures[0]).result()
        from daskinfer.io._source import keep_object_columns

        with keep_object_columns():  # N-D values must not become strings
            frame = dd.from_delayed(list(source.futures), meta=meta, verify_meta=False)
        return frame, source.rows

    def schema(self) -> pa.Schema:
        """The output's schema; runs the pipeline on its first rows when needed."""
        source = self._plan.source
        if not self._plan.ops and isinstance(source, DaskSource):
            meta = source.frame._meta
            # an object column's meta says nothing of its values (bytes, images, text
            # under pandas 2): those come from a row, the others from the metadata
            if not any(dtype == object for dtype in meta.dtypes):
                return block_to_arrow(meta).schema
        return block_to_arrow(self._head(1)).schema

    def columns(self) -> list[str]:
        """Names of the output columns."""
        known = self._known_columns()
        return known if known is not None else list(self.schema().names)

    def stats(self) -> RunStats:
        """Figures of the last execution started from this Dataset (live while it runs).

        Fields for programs (per stage: rows, batches, time in the user's code, time
        waiting for input and blocked on output, retries, actors, padding, GPU busy;
        ``bottleneck()``); ``print(ds.stats())`` gives the readable report.
        """
        from daskinfer.metrics import RunStats

        return self._last_stats if self._last_stats is not None else RunStats.not_executed()

    def explain(self) -> str:
        """The logical and the physical plan (which stages fused, where each runs)."""
        return explain_plan(self._plan)

    # ------------------------------------------------------------------ sinks
    def _write(
        self,
        fmt: str,
        path: str,
        mode: str,
        storage_options: Mapping[str, Any] | None,
        options: Mapping[str, Any],
        errors_path: str | None = None,
        resume: bool = False,
    ) -> list[str]:
        from daskinfer.io.sinks import FileSink, check_file_options

        if not isinstance(resume, bool):
            raise PlanError(f"write_{fmt}(resume={resume!r}): use True or False")
        options = check_file_options(fmt, options, self._known_columns())
        sink = FileSink(path, fmt, mode=mode, storage_options=storage_options, options=options)
        sink.recover()  # a commit that a dead driver left half done comes first
        sink.check_destination()
        if resume:
            return self._write_resumable(sink, errors_path)
        ds = self._with(sink.stage())
        try:
            manifest = list(ds.iter_internal_blocks(prefetch_blocks=8))
            self._last_stats = ds._last_stats
            if self._last_stats is not None:
                # the last stage's output is the manifest (one row per file): report
                # the rows written instead
                self._last_stats.rows_out = int(sum(int(b["rows"].sum()) for b in manifest))
        except BaseException:
            sink.abort()
            raise
        self._write_quarantine(sink, errors_path, on_failure=sink.abort)
        return sink.commit(
            [p for block in manifest for p in block["path"].tolist()],
            partitions=[p for block in manifest for p in block["partition"].tolist()],
        )

    def _write_quarantine(
        self, sink: Any, errors_path: str | None, on_failure: Callable[[], None]
    ) -> None:
        stats = self._last_stats
        if stats is None or not stats.quarantine:
            return
        # before the commit: if the dead letters cannot be written, nothing is
        # committed and the job can be rerun, rather than rows silently lost
        try:
            where = sink.write_quarantine(stats.quarantined(), errors_path)
        except BaseException:
            on_failure()
            raise
        logger.warning(
            "%d rows failed and were quarantined; they are in %s", len(stats.quarantined()), where
        )

    def _write_resumable(self, sink: Any, errors_path: str | None) -> list[str]:
        """Write, journaling each source block once all its rows are in parts.

        The journal and the parts stay when the job fails (or its driver dies), so that
        the next ``resume=True`` writes only the blocks not yet written; the final commit
        is the same single step as without ``resume``.
        """
        import dataclasses

        from daskinfer._internal.plan import LogicalPlan
        from daskinfer.exceptions import DaskInferError
        from daskinfer.io.resume import (
            ResumeJournal,
            check_resumable,
            describe_source,
            pipeline_fingerprint,
        )

        check_resumable(self._plan)
        source = describe_source(self._plan)
        fingerprint = pipeline_fingerprint(
            self._plan, {"format": sink.fmt, "options": sink.options}
        )
        journal = ResumeJournal(sink.fs, sink.temp_root, sink._url)
        written = journal.open(source, fingerprint)
        n_blocks = source["blocks"]
        remaining = [k for k in range(n_blocks) if k not in written]
        resumed_blocks = len(written)
        resumed_rows = sum(int(p["rows"]) for parts in written.values() for p in parts)
        rows_now = 0
        if remaining:
            src = self._plan.source
            assert isinstance(src, DaskSource)  # describe_source refused any other
            if len(remaining) < n_blocks:
                src = dataclasses.replace(
                    src,
                    frame=src.frame.partitions[remaining],
                    rows=None,
                    block_rows=(
                        tuple(src.block_rows[k] for k in remaining)
                        if src.block_rows is not None
                        else None
                    ),
                )
            ds = Dataset(LogicalPlan(src, self._plan.ops))._with(sink.stage(journal.parts_dir))
            # position in ``remaining`` of the block being written, and its parts
            position, parts = 0, cast(list[dict[str, Any]], [])

            def complete_up_to(end: int) -> None:
                nonlocal position, parts
                while position < end:
                    journal.record(remaining[position], parts)
                    written[remaining[position]], parts = parts, []
                    position += 1

            try:
                # blocks come in source order, never mixing two source blocks: when the
                # first output of block i arrives, every block before i is complete
                for origin, manifest in ds._iter_output(8, None, keep_origins_apart=True):
                    if origin is None or origin < position:
                        raise DaskInferError(
                            f"resumable write: output from source block {origin} out of order"
                        )
                    complete_up_to(origin)
                    parts.extend(manifest[["path", "rows", "partition"]].to_dict("records"))
                    rows_now += int(manifest["rows"].sum())
                complete_up_to(len(remaining))
            finally:
                self._last_stats = ds._last_stats
        else:
            from daskinfer.metrics import RunStats

            self._last_stats = RunStats(
                run_id=sink.run_id, pipeline=" -> ".join(self._plan.describe()), state="finished"
            )
            logger.info("resume: every source block was already written; committing")
        stats = self._last_stats
        if stats is not None:
            stats.rows_out = rows_now
            stats.resumed_blocks = resumed_blocks
            stats.resumed_rows = resumed_rows
        self._write_quarantine(sink, errors_path, on_failure=lambda: None)
        parts_in_order = [p for k in range(n_blocks) for p in written[k]]
        return sink.commit(
            [p["path"] for p in parts_in_order],
            partitions=[p.get("partition", "") for p in parts_in_order],
            cleanup=[journal.dir],
        )

    @takes_ray_args("write_parquet", WRITER_ARGS)
    def write_parquet(
        self,
        path: str,
        /,
        *,
        mode: str = "error",
        storage_options: Mapping[str, Any] | None = None,
        compression: str = "snappy",
        partition_cols: Sequence[str] | None = None,
        min_rows_per_file: int | None = None,
        max_rows_per_file: int | None = None,
        num_rows_per_file: int | None = None,
        errors_path: str | None = None,
        resume: bool = False,
        **arrow_parquet_args: Any,
    ) -> list[str]:
        """Write Parquet files under ``path`` (a directory or any fsspec URL).

        Workers write parts under a hidden temporary directory inside ``path``; only
        when every part is written are they renamed into place, so a failed job leaves
        no partial output. ``mode``: ``"error"`` (default; refuse a non-empty
        destination), ``"overwrite"`` (replace its files once the new ones are written)
        or ``"append"``. Returns the paths written, in row order.

        As in Ray Data: ``partition_cols`` writes Hive directories (``year=2024/``,
        the partition columns left out of the files); ``min_rows_per_file=n`` makes files
        of n rows (the last one shorter), where by default each block is a file
        (``num_rows_per_file`` is its old name); ``max_rows_per_file`` splits larger
        ones; ``arrow_parquet_args`` go to ``pyarrow.parquet.write_table``
        (``row_group_size=``, ``use_dictionary=``, ...) and are checked at the call.

        Rows that ``map_batches(..., on_error="quarantine")`` set aside go to a
        dead-letter Parquet file under ``errors_path`` (a directory; by default
        ``<path>/_errors/``, which readers of ``path`` skip), with their ``_error``,
        ``_traceback`` and ``_stage``.

        ``resume=True`` makes the write survive a crash of the driver: each source block
        is journaled (hidden, under ``path``) once all its rows are written, and a rerun
        with ``resume=True`` writes only the blocks not yet written, then commits all at
        once. The source blocks are identified by the files (path, size, modification
        time) or the in-memory data, and the pipeline by its stages' code and arguments;
        a rerun with a changed source or pipeline is refused. No batch then mixes rows
        of two source blocks, and the output keeps the source's order.
        """
        return self._write(
            "parquet",
            path,
            mode,
            storage_options,
            {
                "compression": compression,
                "partition_cols": partition_cols,
                "min_rows_per_file": min_rows_per_file,
                "max_rows_per_file": max_rows_per_file,
                "num_rows_per_file": num_rows_per_file,
                "parquet_args": arrow_parquet_args,
            },
            errors_path,
            resume,
        )

    @takes_ray_args("write_csv", WRITER_ARGS)
    def write_csv(
        self,
        path: str,
        /,
        *,
        mode: str = "error",
        storage_options: Mapping[str, Any] | None = None,
        min_rows_per_file: int | None = None,
        max_rows_per_file: int | None = None,
        num_rows_per_file: int | None = None,
        errors_path: str | None = None,
        resume: bool = False,
    ) -> list[str]:
        """Write CSV files (with a header) under ``path``; see ``write_parquet``."""
        rows = {
            "min_rows_per_file": min_rows_per_file,
            "max_rows_per_file": max_rows_per_file,
            "num_rows_per_file": num_rows_per_file,
        }
        return self._write("csv", path, mode, storage_options, rows, errors_path, resume)

    @takes_ray_args("write_json", WRITER_ARGS)
    def write_json(
        self,
        path: str,
        /,
        *,
        mode: str = "error",
        storage_options: Mapping[str, Any] | None = None,
        min_rows_per_file: int | None = None,
        max_rows_per_file: int | None = None,
        num_rows_per_file: int | None = None,
        errors_path: str | None = None,
        resume: bool = False,
        **pandas_json_args: Any,
    ) -> list[str]:
        """Write JSON-lines files under ``path``; see ``write_parquet``.

        ``pandas_json_args`` go to ``pandas.DataFrame.to_json`` over the defaults
        ``orient="records", lines=True``, as in Ray Data (``date_format=``,
        ``double_precision=``, ...).
        """
        options = {
            "min_rows_per_file": min_rows_per_file,
            "max_rows_per_file": max_rows_per_file,
            "num_rows_per_file": num_rows_per_file,
            "json_args": pandas_json_args,
        }
        return self._write("json", path, mode, storage_options, options, errors_path, resume)

    @takes_ray_args("write_numpy", WRITER_ARGS)
    def write_numpy(
        self,
        path: str,
        /,
        *,
        column: str,
        mode: str = "error",
        storage_options: Mapping[str, Any] | None = None,
        min_rows_per_file: int | None = None,
        max_rows_per_file: int | None = None,
        num_rows_per_file: int | None = None,
        resume: bool = False,
    ) -> list[str]:
        """Write one column to ``.npy`` files under ``path``, as Ray Data does.

        Each file holds one array: the column's rows of a block (or of
        ``min_rows_per_file`` rows) stacked along the first axis, so N-D rows (embeddings,
        images of one size) keep their shape. Rows of different shapes are refused.
        ``read_numpy`` reads such files back. Otherwise as ``write_parquet``.
        """
        options = {
            "column": column,
            "min_rows_per_file": min_rows_per_file,
            "max_rows_per_file": max_rows_per_file,
            "num_rows_per_file": num_rows_per_file,
        }
        return self._write("numpy", path, mode, storage_options, options, None, resume)

    @takes_ray_args("write_images", WRITER_ARGS)
    def write_images(
        self,
        path: str,
        column: str,
        file_format: str = "png",
        *,
        mode: str = "error",
        storage_options: Mapping[str, Any] | None = None,
        resume: bool = False,
    ) -> list[str]:
        """Write each row's ``column`` (an HxW or HxWxC uint8 array) as an image file.

        ``file_format`` is any format Pillow writes (``png``, ``jpeg``/``jpg``, ``webp``,
        ...); files are named in row order (``<run>_<000000>.png``). Needs the
        ``images`` extra. Otherwise as ``write_parquet``.
        """
        options = {"column": column, "file_format": file_format}
        return self._write("images", path, mode, storage_options, options, None, resume)
