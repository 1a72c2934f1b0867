"""Blocks and batches: conversions between the block format and the user's format.

A block is a ``pandas.DataFrame`` with a default ``RangeIndex`` (a dask partition).
Columns holding N-D values (images, embeddings) are ``TensorArray`` columns (one array
under all the rows; ``tensor.py``) where a stage returned them as one array, or object
columns whose elements are ``numpy`` arrays of one shape (sources, and pandas batches that
hold them so); in the ``"numpy"`` format either becomes one array.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa

from daskinfer._internal.tensor import (
    TensorArray,
    TensorDtype,
    fixed_shape_tensor,
    tensor_to_arrow,
)

BatchFormat = Literal["numpy", "pandas", "pyarrow"]
BATCH_FORMATS: tuple[str, ...] = ("numpy", "pandas", "pyarrow")


class BatchConversionError(TypeError):
    """A batch could not be turned into a block (plain, so it pickles as-is)."""


def concat_blocks(pieces: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate blocks into one with a fresh RangeIndex."""
    non_empty = [p for p in pieces if len(p.columns) or len(p)]
    if not non_empty:
        return pieces[0].reset_index(drop=True) if pieces else pd.DataFrame()
    if len(non_empty) == 1:
        block = non_empty[0]
        if isinstance(block.index, pd.RangeIndex) and block.index.start == 0:
            return block
        return block.reset_index(drop=True)
    return pd.concat(_align_null_columns(non_empty), ignore_index=True)


def _align_null_columns(pieces: list[pd.DataFrame]) -> list[pd.DataFrame]:
    """Give a column that is all None in some pieces the type the others agree on.

    A row function's block whose rows all had None for a timestamp (or a number) holds
    an object column there; concatenated as it is, it would turn the whole column into
    objects, where Arrow would have kept the type.
    """
    first = pieces[0]
    if all(p.dtypes.equals(first.dtypes) for p in pieces[1:]):
        return pieces
    out = list(pieces)
    for name in first.columns:
        dtypes = {
            p[name].dtype for p in pieces if name in p.columns and not _all_null_objects(p[name])
        }
        if len(dtypes) != 1:
            continue
        (dtype,) = dtypes
        for i, piece in enumerate(out):
            if (
                name in piece.columns
                and piece[name].dtype != dtype
                and _all_null_objects(piece[name])
            ):
                with contextlib.suppress(TypeError, ValueError):
                    out[i] = piece.astype({name: dtype})
    return out


def _all_null_objects(col: pd.Series) -> bool:
    return col.dtype == object and bool(col.isna().all())


def slice_block(block: pd.DataFrame, start: int, stop: int) -> pd.DataFrame:
    """Rows ``[start, stop)`` of a block (a view where pandas allows one)."""
    if start == 0 and stop >= len(block):
        return block
    return block.iloc[start:stop]


def column_to_numpy(col: pd.Series) -> np.ndarray:
    """A column in the numpy format: N-D rows as one array (a tensor column's own, no copy)."""
    if isinstance(col.dtype, TensorDtype):
        return col.array.values  # type: ignore[attr-defined,no-any-return]  # no copy
    values = col.to_numpy()
    if values.dtype == object and len(values) and isinstance(values[0], np.ndarray):
        first_shape = values[0].shape
        if all(isinstance(v, np.ndarray) and v.shape == first_shape for v in values):
            return np.stack(values)  # type: ignore[no-any-return]
    return values  # type: ignore[no-any-return]


def join_column_pieces(pieces: Sequence[np.ndarray]) -> np.ndarray:
    """One numpy-format column from consecutive pieces of it (a batch across blocks).

    Pieces whose rows differ in shape (images of different sizes, in blocks stacked
    apart) cannot be one array: they become an object column of per-row arrays, as a
    block of such rows is, and as Ray Data's variable-shaped tensors are.
    """
    if len(pieces) == 1:
        return pieces[0]
    try:
        return np.concatenate(pieces)
    except ValueError:
        column = np.empty(sum(len(p) for p in pieces), dtype=object)
        i = 0
        for piece in pieces:
            for row in piece:
                column[i] = row
                i += 1
        return column


def block_to_batch(block: pd.DataFrame, batch_format: str) -> Any:
    """Turn a block into a batch in ``batch_format``."""
    if batch_format == "numpy":
        return {name: column_to_numpy(block[name]) for name in block.columns}
    if batch_format == "pandas":
        return block
    if batch_format == "pyarrow":
        return block_to_arrow(block)
    raise ValueError(f"unknown batch_format {batch_format!r}; use one of {BATCH_FORMATS}")


def _tensor_array(name: str, col: pd.Series) -> pa.Array | None:
    """An object column of N-D arrays (ndim >= 2 per row) as a fixed-shape tensor array.

    pyarrow converts 1-D cells to list arrays by itself but refuses deeper ones. Rows of
    one shape and dtype become Arrow's canonical ``fixed_shape_tensor`` type, which
    Parquet keeps, and which ``arrow_to_pandas`` turns back into a ``TensorArray``.
    """
    if isinstance(col.dtype, TensorDtype):
        return tensor_to_arrow(col.array.values)  # type: ignore[attr-defined]
    if col.dtype != object or not len(col):
        return None
    values = col.to_numpy()
    first = values[0]
    if not isinstance(first, np.ndarray) or first.ndim < 2:
        return None
    if not all(
        isinstance(v, np.ndarray) and v.shape == first.shape and v.dtype == first.dtype
        for v in values
    ):
        shapes = sorted({str(getattr(v, "shape", type(v).__name__)) for v in values})
        raise BatchConversionError(
            f"column {name!r} holds N-D arrays of different shapes or dtypes ({', '.join(shapes[:4])}"
            f"{' ...' if len(shapes) > 4 else ''}), which Arrow and Parquet cannot store; "
            "give every row the same shape (e.g. read_images(size=(h, w)))"
        )
    return fixed_shape_tensor(np.stack(values))


def block_to_arrow(block: pd.DataFrame) -> pa.Table:
    """Convert a block to a pyarrow Table.

    Object columns of 1-D arrays become list arrays; of N-D arrays (one shape per
    column), ``fixed_shape_tensor`` arrays.
    """
    tensors = {}
    for name in block.columns:
        tensor = _tensor_array(str(name), block[name])
        if tensor is not None:
            tensors[name] = tensor
    if not tensors:
        return pa.Table.from_pandas(block, preserve_index=False)
    rest = pa.Table.from_pandas(block.drop(columns=list(tensors)), preserve_index=False)
    arrays = [tensors[name] if name in tensors else rest[str(name)] for name in block.columns]
    return pa.Table.from_arrays(arrays, names=[str(name) for name in block.columns])


def arrow_to_pandas(table: pa.Table) -> pd.DataFrame:
    """``Table.to_pandas``, with ``fixed_shape_tensor`` columns as ``TensorArray`` columns."""
    tensors = [
        i for i, field in enumerate(table.schema) if isinstance(field.type, pa.FixedShapeTensorType)
    ]
    if not tensors:
        return table.to_pandas()
    columns: dict[str, Any] = {}
    for i in tensors:
        column = table.column(i)
        chunks = column.chunks
        if chunks:
            stacked = np.concatenate([chunk.to_numpy_ndarray() for chunk in chunks])
        else:
            tensor_type = column.type
            stacked = np.empty(
                (0, *tensor_type.shape), dtype=tensor_type.value_type.to_pandas_dtype()
            )
        columns[table.column_names[i]] = TensorArray(stacked)
    out = table.drop_columns([table.column_names[i] for i in tensors]).to_pandas()
    for i in tensors:
        name = table.column_names[i]
        out.insert(i, name, columns[name])
    return out


def _array_to_column(name: str, values: Any) -> Any:
    if isinstance(values, pd.Series):
        return values.to_numpy() if values.dtype == object else values.array
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.to_pandas().array if values.type != pa.null() else values.to_pylist()
    arr = values if isinstance(values, np.ndarray) else _as_array(name, values)
    if arr.ndim == 0:
        raise BatchConversionError(
            f"column {name!r} of the returned batch is a scalar ({arr!r}); "
            "return one value per row (an array or list)"
        )
    if arr.ndim > 1:
        if arr.dtype == object:  # rows of Python objects: one cell per row, as given
            column = np.empty(len(arr), dtype=object)
            for i in range(len(arr)):
                column[i] = arr[i]
            return column
        return TensorArray(arr)  # no copy: the rows stay one array
    return arr


def _as_array(name: str, values: Any) -> np.ndarray:
    if isinstance(values, (list, tuple)) and values and isinstance(values[0], np.ndarray):
        shapes = {v.shape for v in values if isinstance(v, np.ndarray)}
        if len(shapes) == 1 and len(values) == sum(isinstance(v, np.ndarray) for v in values):
            return np.stack(values)
        column = np.empty(len(values), dtype=object)
        column[:] = list(values)
        return column
    try:
        return np.asarray(values)
    except Exception as exc:  # noqa: BLE001  # any failure becomes one clear error
        if isinstance(exc, ValueError) and isinstance(values, (list, tuple)) and values:
            # rows of different lengths (token ids without padding, ragged lists): one
            # array per row in an object column, as Ray Data keeps them
            return _ragged_column(values)
        raise BatchConversionError(
            f"column {name!r} of the returned batch could not become an array: {exc}"
        ) from None


def _ragged_column(values: Sequence[Any]) -> np.ndarray:
    column = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        column[i] = value
        if isinstance(value, (list, tuple)):
            with contextlib.suppress(ValueError):  # a ragged row stays the list it is
                column[i] = np.asarray(value)
    return column


def _length(values: Any) -> int:
    if isinstance(values, np.ndarray):
        return len(values) if values.ndim else -1
    try:
        return len(values)
    except TypeError:
        return -1


def batch_to_block(batch: Any) -> pd.DataFrame:
    """Turn what a user's function returned into a block, or explain what is wrong."""
    if isinstance(batch, pd.DataFrame):
        if isinstance(batch.index, pd.RangeIndex) and batch.index.start == 0:
            return batch
        return batch.reset_index(drop=True)
    if isinstance(batch, pa.Table):
        return arrow_to_pandas(batch)
    if isinstance(batch, Mapping):
        lengths = {str(k): _length(v) for k, v in batch.items()}
        if len(set(lengths.values())) > 1:
            raise BatchConversionError(
                "the returned batch has columns of unequal length "
                f"{lengths}; every column must have one value per row"
            )
        columns = {str(k): _array_to_column(str(k), v) for k, v in batch.items()}
        n = next(iter(lengths.values()), 0)
        return pd.DataFrame(columns, index=pd.RangeIndex(max(n, 0)))
    raise BatchConversionError(
        f"a batch function returned {type(batch).__name__}; return a dict of "
        "column name -> numpy array, a pandas.DataFrame or a pyarrow.Table"
    )


def rows_of(block: pd.DataFrame) -> list[dict[str, Any]]:
    """The block's rows as plain dicts (N-D values stay numpy arrays)."""
    if not len(block.columns):
        return [{} for _ in range(len(block))]
    columns = {name: _column_values(block[name]) for name in block.columns}
    return [
        dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)
    ]


def _column_values(col: pd.Series) -> list[Any]:
    if isinstance(col.dtype, TensorDtype):
        return list(column_to_numpy(col))
    values = col.to_numpy()
    if values.dtype == object:
        return [None if _is_missing(v) else v for v in values]
    if values.dtype.kind in "mM":
        # numpy's tolist() turns datetime64[ns] into plain integers (nanoseconds), and a
        # row function that returns the row would then write the column as int64;
        # pandas gives Timestamps / Timedeltas, as Ray Data's rows hold
        return [None if v is pd.NaT else v for v in col.tolist()]
    return values.tolist()  # type: ignore[no-any-return]


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA


def block_from_rows(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Build a block from row dicts (the output of ``map`` / ``flat_map``)."""
    if not rows:
        return pd.DataFrame()
    names: dict[str, None] = {}
    for row in rows:
        if not isinstance(row, Mapping):
            raise BatchConversionError(
                f"a row function returned {type(row).__name__}; return a dict of "
                "column name -> value"
            )
        names.update(dict.fromkeys(row))
    columns: dict[str, Any] = {}
    for name in names:
        values = _as_array(name, [row.get(name) for row in rows])
        if values.dtype == object and _first_is_time(values):
            # Timestamps with a None among them: numpy keeps objects, pandas the times
            columns[name] = pd.Series(values, dtype=object).infer_objects()
        else:
            columns[name] = values
    return batch_to_block(columns)


def _first_is_time(values: np.ndarray) -> bool:
    first = next((v for v in values if v is not None), None)
    return isinstance(first, (pd.Timestamp, pd.Timedelta, datetime.datetime, datetime.timedelta))


def block_is_flat(block: pd.DataFrame) -> bool:
    """Whether every column holds fixed-width numpy values (numbers, booleans, times).

    Such a block (``TensorArray`` columns included) travels as a few raw buffers and
    converts to the numpy format by copying them; a column of objects (strings, N-D
    values kept per row) costs Python work per row to unpickle and to stack.
    """
    return all(
        isinstance(dt, TensorDtype) or (isinstance(dt, np.dtype) and dt.kind in "biufcmM")
        for dt in block.dtypes
    )


def block_nbytes(block: pd.DataFrame) -> int:
    """Approximate in-memory size of a block, counting N-D object cells."""
    nbytes = 0
    for name in block.columns:
        col = block[name]
        values = col.to_numpy() if col.dtype == object else None
        if values is not None and len(values) and isinstance(values[0], np.ndarray):
            nbytes += int(values[0].nbytes) * len(values)
        else:
            nbytes += int(col.memory_usage(index=False, deep=col.dtype == object))
    return nbytes
