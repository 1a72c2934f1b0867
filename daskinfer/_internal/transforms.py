"""Block transforms: the picklable pieces of a stage that run on workers.

Each transform maps one block (``pandas.DataFrame``) to one block. A fused CPU stage is
a tuple of transforms applied in order inside one Dask task. Nothing here holds a client.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import functools
import gc
import pickle
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from daskinfer._internal.batching import (
    BatchConversionError,
    arrow_to_pandas,
    batch_to_block,
    block_from_rows,
    block_to_batch,
    concat_blocks,
    join_column_pieces,
    rows_of,
)
from daskinfer._internal.expressions import Column, PredicateError, columns_of, evaluate_values
from daskinfer._internal.expressions import evaluate as evaluate_predicate
from daskinfer._internal.tensor import TensorDtype
from daskinfer.exceptions import UserCodeError

_COPY_ON_WRITE = int(pd.__version__.split(".")[0]) >= 3


def user_code_error(stage: str, exc: BaseException) -> UserCodeError:
    """Wrap an exception from user code, keeping its worker-side traceback as text."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    err = UserCodeError(
        f"stage {stage} failed: {type(exc).__name__}: {exc}\n\nTraceback on the worker:\n{tb}",
        stage,
    )
    err.__cause__ = exc
    return err


@dataclasses.dataclass
class BatchLimits:
    """What a predictor actor learned about the batches it can take (kept across calls)."""

    max_rows: int | None = None  # the largest batch that fit in accelerator memory
    oom_splits: int = 0


_OOM_TYPE_NAMES = frozenset({"OutOfMemoryError", "ResourceExhaustedError"})


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says an accelerator ran out of memory.

    Matched by name so that no framework is imported here: ``torch.OutOfMemoryError``
    (and ``torch.cuda.OutOfMemoryError``), CuPy's ``OutOfMemoryError``, TensorFlow's
    ``ResourceExhaustedError``, and the ``RuntimeError("CUDA out of memory ...")`` of
    older torch releases. Host ``MemoryError`` is not retried: halving a batch rarely
    saves a worker that is out of RAM.
    """
    if any(cls.__name__ in _OOM_TYPE_NAMES for cls in type(exc).__mro__):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def release_accelerator_memory() -> None:
    """Return cached allocator memory to the device before a retry (torch only, if loaded)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


PREFETCH_HOOK = "prefetch_batch"


def prefetch_hook(instance: Any) -> Callable[[Any], Any] | None:
    """The predictor's ``prefetch_batch`` method, if it has one (see ``MapBatchesTransform.apply``)."""
    hook = getattr(instance, PREFETCH_HOOK, None) if instance is not None else None
    return hook if callable(hook) else None


@dataclasses.dataclass
class StagedBatch:
    """A call's first batch (rows ``start:stop``), already through ``prefetch_batch``."""

    start: int
    stop: int
    batch: Any


_NOT_STAGED = object()


class TooManyErroredRows(UserCodeError):
    """More rows failed than ``max_errored_rows`` allows."""


class ErroredRows:
    """Rows a stage's code failed on, isolated by bisection (``on_error`` skip/quarantine).

    Kept per task on the worker and sent to the client with the block's metadata: only
    tasks that finish report, and each reports once, so a retried or recomputed task
    never counts its rows twice. Quarantined rows keep their input values, with the
    error and the worker's traceback; skipped rows are only counted.
    """

    def __init__(self) -> None:
        self.frames: list[pd.DataFrame] = []
        self.counts: dict[str, int] = {}

    def record(
        self, transform: MapBatchesTransform, rows: pd.DataFrame, exc: BaseException
    ) -> None:
        count = self.counts[transform.stage] = self.counts.get(transform.stage, 0) + len(rows)
        limit = transform.max_errored_rows
        if limit is not None and limit >= 1 and count > limit:
            # one task alone exceeds the job's limit: stop here rather than bisect on
            raise TooManyErroredRows(
                f"stage {transform.stage}: more than max_errored_rows={limit:g} rows failed "
                f"(on_error={transform.on_error!r}); the last error: {type(exc).__name__}: {exc}",
                transform.stage,
            ) from exc
        if transform.on_error != "quarantine":
            return
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        bad = rows.reset_index(drop=True).copy()
        bad["_error"] = f"{type(exc).__name__}: {exc}"
        bad["_traceback"] = tb
        bad["_stage"] = transform.stage
        self.frames.append(bad)

    def report(self) -> dict[str, Any]:
        """What goes into the block's metadata event (nothing when no row failed)."""
        if not self.counts:
            return {}
        out: dict[str, Any] = {"errored_rows": dict(self.counts)}
        if self.frames:
            # pickled: the rows may hold values msgpack cannot carry (arrays, bytes)
            out["quarantine"] = pickle.dumps(pd.concat(self.frames, ignore_index=True))
        return out


class Transform:
    """One step of a stage; ``apply`` maps a block to a block."""

    stage: str

    def apply(self, block: pd.DataFrame, instance: Any = None) -> pd.DataFrame:
        """Transform one block; ``instance`` is the predictor object for class stages."""
        raise NotImplementedError  # pragma: no cover - abstract


@dataclasses.dataclass(frozen=True, eq=False)
class MapBatchesTransform(Transform):
    """Call ``fn`` (or the predictor ``instance``) on batches of ``batch_size`` rows."""

    stage: str
    fn: Any
    batch_size: int | None
    batch_format: str
    fn_args: tuple[Any, ...] = ()
    fn_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    on_error: str = "raise"  # "raise" | "skip" | "quarantine"
    max_errored_rows: float | None = None  # rows, or a fraction of the stage's rows if < 1
    timeout_s: float | None = None  # a batch running longer counts as failed (executor)

    def prepare(self, block: pd.DataFrame) -> dict[str, np.ndarray] | None:
        """The block's columns in the numpy format (None for other formats).

        Needs no predictor, so for an accelerator's actor a CPU task does it
        (``worker_fns.assemble_batch``) and the call receives the result.
        """
        if self.batch_format != "numpy":
            return None
        # converted once (private copies, so a function that edits its batch in place
        # cannot corrupt a block Dask may hand to another task) and sliced per batch;
        # a stacked N-D column is already a new array and is not copied twice
        columns = {}
        for name, values in block_to_batch(block, "numpy").items():
            stacked_here = (
                values.dtype != object
                and values.ndim > 1
                and values.base is None
                and not isinstance(block[name].dtype, TensorDtype)  # the block's own array
            )
            columns[name] = values if stacked_here else np.array(values, copy=True)
        return columns

    def rows_per_call(self, n: int, limits: BatchLimits | None) -> int:
        """Rows per call of the function for a block of ``n`` rows."""
        size = self.batch_size or max(n, 1)
        if limits is not None and limits.max_rows is not None:
            size = min(size, limits.max_rows)
        return size

    def stage_first_batch(
        self, prepared: dict[str, np.ndarray], instance: Any, limits: BatchLimits | None
    ) -> StagedBatch | None:
        """The first batch of prepared columns, through the predictor's ``prefetch_batch``.

        For a call that waits for its predictor: it runs while the previous call does.
        None when the predictor has no such hook. The hook's exceptions propagate.
        """
        hook = prefetch_hook(instance)
        if hook is None or self.batch_format != "numpy" or not prepared:
            return None
        n = len(next(iter(prepared.values())))
        stop = min(self.rows_per_call(n, limits), n)
        return StagedBatch(0, stop, hook({k: v[:stop] for k, v in prepared.items()}))

    def apply(
        self,
        block: pd.DataFrame | None,
        instance: Any = None,
        limits: BatchLimits | None = None,
        errors: ErroredRows | None = None,
        prepared: dict[str, np.ndarray] | None = None,
        staged: StagedBatch | None = None,
    ) -> pd.DataFrame:
        """Run the function over the block's batches and concatenate the outputs.

        With ``limits`` (a predictor's, kept across calls), a batch that runs out of
        accelerator memory is split in two and each half retried, and the smaller size
        is remembered for the rest of the actor's life. ``prepared`` is what
        ``prepare(block)`` returned, where the caller has done it already; then
        ``block`` may be None (the rows are rebuilt from it only to set bad rows aside).

        A predictor with a ``prefetch_batch(batch)`` method gets every batch through it
        before ``__call__`` receives what it returned; batch ``i + 1`` goes through it
        just before batch ``i`` is called, so that a copy to the accelerator that the
        hook starts (on its own stream) overlaps batch ``i``'s compute. ``staged`` is
        the first batch, put through the hook ahead of this call by the caller.
        """
        fn = instance if instance is not None else self.fn
        if block is None:
            assert prepared is not None, "apply() needs a block or its prepared columns"
            block = _LazyRows(prepared)
        n = len(block)
        if self.batch_format == "numpy":
            columns = prepared if prepared is not None else self.prepare(block)
            assert columns is not None

            def make(start: int, stop: int) -> Any:
                return {k: v[start:stop] for k, v in columns.items()}

        else:

            def make(start: int, stop: int) -> Any:
                return self._piece(block, start, stop)

        results: list[Any] = []
        isolate = None
        if self.on_error != "raise" and errors is not None:

            def isolate(start: int, stop: int, exc: BaseException) -> None:
                errors.record(self, block.iloc[start:stop], exc)

        if n == 0:
            return self._apply_to_no_rows(fn, make)
        hook = prefetch_hook(instance)
        ahead: dict[tuple[int, int], Any] = {}
        if staged is not None:
            ahead[staged.start, staged.stop] = staged.batch

        def make_staged(start: int, stop: int) -> Any:
            assert hook is not None  # only called where there is one
            batch = ahead.pop((start, stop), _NOT_STAGED)
            return hook(make(start, stop)) if batch is _NOT_STAGED else batch

        start = 0
        while start < n:
            # the size is looked up per batch: once a batch has run out of memory, the
            # rest of the block goes at the size learned, not at the one it started with
            size = self.rows_per_call(n, limits)
            stop = min(start + size, n)
            if hook is None:
                self._call(fn, make, start, stop, limits, results, isolate)
            else:
                if (start, stop) not in ahead:
                    ahead.clear()  # staged at a size since found too big: let it go
                following = (stop, min(stop + size, n))
                if stop < n and following not in ahead:
                    # a failure here is not final: the batch is staged again in its
                    # turn, where its error is handled (split on OOM, set aside, raised)
                    with contextlib.suppress(Exception):
                        ahead[following] = hook(make(*following))
                self._call(fn, make_staged, start, stop, limits, results, isolate)
            start = max(stop, start + 1)
        try:
            return _concat_results(results)
        except BatchConversionError as exc:
            raise user_code_error(self.stage, exc) from exc

    def _apply_to_no_rows(self, fn: Any, make: Callable[[int, int], Any]) -> pd.DataFrame:
        """The one call a stage that received no rows at all makes, for its columns.

        Its output's columns let an empty result still say what it would hold (an empty
        ``to_pandas()`` with the stage's columns). Ray Data makes no such call, so code
        written for it may fail on an empty batch (``np.stack([])``, a tokenizer given no
        text): then the stage's result is empty with no columns, not an error.
        """
        try:
            return _concat_results(_collect(fn(make(0, 0), *self.fn_args, **self.fn_kwargs)))
        except Exception:  # noqa: BLE001 - see above: no rows, nothing to fail on
            return pd.DataFrame()

    def _call(
        self,
        fn: Any,
        make: Callable[[int, int], Any],
        start: int,
        stop: int,
        limits: BatchLimits | None,
        results: list[Any],
        isolate: Callable[[int, int, BaseException], None] | None = None,
    ) -> None:
        bad_rows = False
        try:
            results.extend(_collect(fn(make(start, stop), *self.fn_args, **self.fn_kwargs)))
            return
        except UserCodeError:
            raise
        except Exception as exc:
            oom = is_out_of_memory(exc)
            if oom and limits is not None and stop - start >= 2:
                pass  # split below
            elif isolate is not None and not oom and stop - start == 1:
                isolate(start, stop, exc)  # the failing row, isolated: set it aside
                return
            elif isolate is not None and not oom and stop - start > 1:
                bad_rows = True  # bisect below, to find the rows that fail
            else:
                raise user_code_error(self.stage, exc) from exc
        if bad_rows:
            assert isolate is not None
            mid = start + (stop - start + 1) // 2
            self._call(fn, make, start, mid, limits, results, isolate)
            self._call(fn, make, mid, stop, limits, results, isolate)
            return
        # out of memory: split outside the except block, so that the failed attempt's
        # frames (and the tensors they hold) are gone before the halves run
        assert limits is not None  # OOM is retried only with limits (else raised above)
        release_accelerator_memory()
        half = (stop - start + 1) // 2
        limits.oom_splits += 1
        limits.max_rows = min(limits.max_rows or half, half)
        # the rest of the range goes in pieces of the size learned so far (which a
        # piece that fails again makes smaller still), not in two fixed halves
        pos = start
        while pos < stop:
            step = limits.max_rows or half
            self._call(fn, make, pos, min(pos + step, stop), limits, results, isolate)
            pos += step

    def _piece(self, block: pd.DataFrame, start: int, stop: int) -> Any:
        piece = block.iloc[start:stop] if (start, stop) != (0, len(block)) else block
        if isinstance(piece.index, pd.RangeIndex) and piece.index.start != 0:
            piece = piece.reset_index(drop=True)
        if self.batch_format == "pandas":
            # a function that edits its DataFrame in place (df["x"] *= 2) must not reach
            # the block, which Dask may hand to another task or keep (materialize); with
            # copy-on-write (pandas >= 3) a shallow copy defers the copy to the first edit
            piece = piece.copy(deep=not _COPY_ON_WRITE)
        return block_to_batch(piece, self.batch_format)


class _LazyRows:
    """Stands in for a block that arrived as prepared columns: its length, and its rows
    (rebuilt only when some are set aside by ``on_error``)."""

    def __init__(self, columns: dict[str, np.ndarray]) -> None:
        self.columns = columns
        self._n = len(next(iter(columns.values()))) if columns else 0

    def __len__(self) -> int:
        return self._n

    @functools.cached_property
    def iloc(self) -> Any:
        # bisecting bad rows slices many times: build the block once
        return batch_to_block(self.columns).iloc


def _collect(result: Any) -> list[Any]:
    """The batches a batch function's call gave: one, or all it yielded (a generator)."""
    if isinstance(result, collections.abc.Iterator):
        return list(result)  # run here, so that its errors are the call's
    return [result]


def _concat_results(results: list[Any]) -> pd.DataFrame:
    """One block from many batch results; numpy dicts are joined column by column."""
    if len(results) > 1 and all(isinstance(r, dict) for r in results):
        keys = list(results[0])
        if all(list(r) == keys for r in results) and all(
            isinstance(v, np.ndarray) and v.ndim >= 1 for r in results for v in r.values()
        ):
            lengths = [{len(v) for v in r.values()} for r in results]
            if all(len(ls) <= 1 for ls in lengths):
                return batch_to_block(
                    {k: join_column_pieces([r[k] for r in results]) for k in keys}
                )
    return concat_blocks([batch_to_block(r) for r in results])


@dataclasses.dataclass(frozen=True, eq=False)
class RowTransform(Transform):
    """Ray's row verbs: ``map`` (row -> row), ``filter`` (row -> bool), ``flat_map``."""

    stage: str
    kind: str  # "map" | "filter" | "flat_map"
    fn: Callable[..., Any] | None  # None for a class: the actor's instance is called
    fn_args: tuple[Any, ...] = ()
    fn_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def apply(self, block: pd.DataFrame, instance: Any = None) -> pd.DataFrame:
        """Apply the row function (or the actor's instance of the class) to every row."""
        fn = instance if instance is not None else self.fn
        assert fn is not None, f"{self.stage}: a class's stage runs in its actors only"
        rows = rows_of(block)
        try:
            if self.kind == "filter":
                keep = [bool(fn(row, *self.fn_args, **self.fn_kwargs)) for row in rows]
                # a boolean array is a row mask even for no rows (an empty list would
                # select no columns)
                return block[np.asarray(keep, dtype=bool)].reset_index(drop=True)
            if self.kind == "map":
                out = [fn(row, *self.fn_args, **self.fn_kwargs) for row in rows]
            else:
                out = [
                    new_row for row in rows for new_row in fn(row, *self.fn_args, **self.fn_kwargs)
                ]
            if not out:
                return pd.DataFrame()
            return block_from_rows(out)
        except BatchConversionError as exc:
            raise user_code_error(self.stage, exc) from exc
        except Exception as exc:
            raise user_code_error(self.stage, exc) from exc


@dataclasses.dataclass(frozen=True, eq=False)
class PredicateFilterTransform(Transform):
    """``filter(expr=...)``: keep the rows where a parsed predicate holds, vectorised.

    ``predicate`` is a tree of ``_internal/expressions.py`` (plain data); ``expression``
    is what the user wrote, for messages.
    """

    stage: str
    expression: str
    predicate: Any

    def apply(self, block: pd.DataFrame, instance: Any = None) -> pd.DataFrame:
        """Evaluate the predicate on the block's columns and keep the rows where it holds."""
        if not len(block):
            return block  # nothing to test; the columns pass on
        try:
            keep = evaluate_predicate(self.predicate, block)
        except PredicateError as exc:
            err = PredicateError(f"filter(expr={self.expression!r}): {exc}")
            raise user_code_error(self.stage, err) from err
        except Exception as exc:
            raise user_code_error(self.stage, exc) from exc
        return block[keep].reset_index(drop=True)


@dataclasses.dataclass(frozen=True, eq=False)
class AddColumnTransform(Transform):
    """``add_column(name, fn)``: ``fn(batch)`` returns the new column's values."""

    stage: str
    name: str
    fn: Callable[..., Any]
    batch_format: str

    def apply(self, block: pd.DataFrame, instance: Any = None) -> pd.DataFrame:
        """Compute the column on the whole block and attach it."""
        try:
            values = self.fn(block_to_batch(block, self.batch_format))
            column = batch_to_block({self.name: values})[self.name]
        except Exception as exc:
            raise user_code_error(self.stage, exc) from exc
        if len(column) != len(block):
            raise user_code_error(
                self.stage,
                BatchConversionError(
                    f"add_column({self.name!r}) got {len(column)} values for a batch "
                    f"of {len(block)} rows; return one value per row"
                ),
            )
        out = block.copy(deep=False)
        out[self.name] = column.to_numpy() if column.dtype == object else column.array
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class WithColumnsTransform(Transform):
    """``with_column`` / ``with_columns``: columns computed from expressions, vectorised.

    ``columns`` pairs each name with a tree of ``_internal/expressions.py`` (plain data);
    ``call`` is the call as written, for messages. Every expression reads the
    block as it came in (as in Ray's one projection); an existing column is replaced in
    its place, new ones follow in order. Only the columns an expression reads go through
    Arrow; the others are passed on untouched.
    """

    stage: str
    call: str
    columns: tuple[tuple[str, Any], ...]

    def apply(self, block: pd.DataFrame, instance: Any = None) -> pd.DataFrame:
        """Evaluate the expressions on the block and attach their columns."""
        read = {c for _, node in self.columns for c in columns_of(node)}
        if not len(block) and not read <= set(block.columns):
            return block  # no rows, and not the columns to compute from: nothing to do
        try:
            # a bare column is copied as it is (see _expression_column), not evaluated
            computed = [node for _, node in self.columns if not isinstance(node, Column)]
            values = iter(evaluate_values(computed, block))
            new = {
                name: _expression_column(
                    node, None if isinstance(node, Column) else next(values), block
                )
                for name, node in self.columns
            }
        except PredicateError as exc:
            err = PredicateError(f"{self.call}: {exc}")
            raise user_code_error(self.stage, err) from err
        except Exception as exc:
            raise user_code_error(self.stage, exc) from exc
        out = block.copy(deep=False)
        for name, column in new.items():
            out[name] = column
        return out


def _expression_column(node: Any, value: Any, block: pd.DataFrame) -> Any:
    """An expression's value as a block column (a constant repeated on every row)."""
    if isinstance(node, Column):
        # the column itself, not a round trip through Arrow: its dtype (a category, a
        # tensor, a time zone) stays exactly as it was
        if node.name not in block.columns:
            raise PredicateError(
                f"column {node.name!r} is not in the block; its columns are {list(block.columns)}"
            )
        column = block[node.name]
        return column.to_numpy() if column.dtype == object else column.array
    if isinstance(value, pa.Scalar):
        value = pa.repeat(value, len(block))
    if pa.types.is_null(value.type):
        return np.full(len(block), None, dtype=object)
    series = arrow_to_pandas(pa.table({"value": value}))["value"]
    return series.to_numpy() if series.dtype == object else series.array


@dataclasses.dataclass(frozen=True, eq=False)
class ProjectTransform(Transform):
    """``select_columns`` / ``drop_columns`` / ``rename_columns``."""

    stage: str
    select: Sequence[str] | None = None
    drop: Sequence[str] | None = None
    rename: Mapping[str, str] | None = None

    def apply(self, block: pd.DataFrame, instance: Any = None) -> pd.DataFrame:
        """Project the block's columns."""
        wanted = list(self.select or ()) + list(self.drop or ()) + list(self.rename or ())
        missing = [c for c in wanted if c not in block.columns]
        if missing and (len(block.columns) or len(block)):
            raise user_code_error(
                self.stage,
                KeyError(
                    f"columns {missing} do not exist; the block has columns {list(block.columns)}"
                ),
            )
        if self.select is not None:
            return block[list(self.select)] if len(block.columns) else block
        if self.drop is not None:
            return block.drop(columns=[c for c in self.drop if c in block.columns])
        if self.rename is not None:
            return block.rename(columns=dict(self.rename))
        return block


def apply_chain(
    transforms: Sequence[Transform],
    block: pd.DataFrame | None,
    instance: Any = None,
    limits: BatchLimits | None = None,
    errors: ErroredRows | None = None,
    prepared: dict[str, np.ndarray] | None = None,
    staged: StagedBatch | None = None,
) -> pd.DataFrame:
    """Apply fused transforms in order; ``errors`` collects the rows any of them set aside.

    ``instance``, ``limits``, ``prepared`` (the first transform's ``prepare(block)``,
    in which case ``block`` may be None) and ``staged`` go to the first transform only.
    """
    for i, transform in enumerate(transforms):
        if isinstance(transform, MapBatchesTransform):
            first = i == 0
            block = transform.apply(
                block,
                instance if first else None,
                limits if first else None,
                errors,
                prepared if first else None,
                staged if first else None,
            )
        else:
            block = transform.apply(block, instance if i == 0 else None)
    return block
