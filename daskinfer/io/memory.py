"""Datasets from data the driver holds or generates: pandas, Arrow, numpy, Python objects,
dask, ``range``, torch and Hugging Face datasets.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import functools
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

import dask.dataframe as dd

from daskinfer._internal.batching import arrow_to_pandas, batch_to_block
from daskinfer._internal.plan import DaskSource, LogicalPlan
from daskinfer._internal.ray_args import READER_ARGS, takes_ray_args
from daskinfer.dataset import Dataset
from daskinfer.exceptions import PlanError
from daskinfer.io._source import (
    TARGET_BLOCK_BYTES,
    TARGET_BLOCK_ROWS,
    _blocks_wanted,
    _check_override_num_blocks,
    _dataset,
    _frame,
    _frame_per_piece,
    keep_object_columns,
)


def from_pandas(
    dfs: pd.DataFrame | Sequence[pd.DataFrame],
    *,
    npartitions: int | None = None,
    override_num_blocks: int | None = None,
) -> Dataset:
    """A Dataset over one pandas DataFrame or a list of them (concatenated in order).

    Each frame of a list becomes one block (as in Ray Data), unless ``npartitions``
    (or Ray's name for it, ``override_num_blocks``) asks for a number of near-equal
    blocks instead; never more blocks than rows (Ray adds empty ones).
    """
    npartitions = _blocks_wanted("from_pandas", npartitions, override_num_blocks)
    frames = [dfs] if isinstance(dfs, pd.DataFrame) else list(dfs)
    if not frames or not all(isinstance(f, pd.DataFrame) for f in frames):
        raise PlanError("from_pandas: pass a pandas.DataFrame or a non-empty list of them")
    if len(frames) == 1 or npartitions is not None:
        df = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
        frame = _frame(df, npartitions, "from_pandas")
        return _dataset(frame, "FromPandas", len(df), materialized=True)
    df = pd.concat(frames, ignore_index=True)  # one set of dtypes for every block
    frame = _frame_per_piece(df, [len(f) for f in frames])
    return _dataset(frame, "FromPandas", len(df), materialized=True)


def from_arrow(
    tables: pa.Table | Sequence[pa.Table],
    *,
    npartitions: int | None = None,
    override_num_blocks: int | None = None,
) -> Dataset:
    """A Dataset over one pyarrow Table or a list of them.

    ``fixed_shape_tensor`` columns become tensor columns (each row an N-D array), not
    the flat 1-D rows that ``Table.to_pandas`` would give. Blocks as in ``from_pandas``.
    """
    npartitions = _blocks_wanted("from_arrow", npartitions, override_num_blocks)
    items = [tables] if isinstance(tables, pa.Table) else list(tables)
    if not items or not all(isinstance(t, pa.Table) for t in items):
        raise PlanError("from_arrow: pass a pyarrow.Table or a non-empty list of them")
    ds = from_pandas([arrow_to_pandas(t) for t in items], npartitions=npartitions)
    source = ds._plan.source
    assert isinstance(source, DaskSource)
    # the same source under its own name, the row count (and blocks) known as from_pandas's
    return Dataset(LogicalPlan(dataclasses.replace(source, name="FromArrow")))


def from_numpy(
    arrays: np.ndarray | Sequence[np.ndarray], *, npartitions: int | None = None
) -> Dataset:
    """A Dataset with one column ``data``; rows of an N-D array are (N-1)-D arrays."""
    items = [arrays] if isinstance(arrays, np.ndarray) else list(arrays)
    if not items or not all(isinstance(a, np.ndarray) and a.ndim >= 1 for a in items):
        raise PlanError("from_numpy: pass a numpy array (ndim >= 1) or a non-empty list of them")
    array = items[0] if len(items) == 1 else np.concatenate(items)
    df = batch_to_block({"data": array})
    frame = _frame(df, npartitions, "from_numpy")
    return _dataset(frame, "FromNumpy", len(df), materialized=True)


def from_items(
    items: Iterable[Any],
    *,
    npartitions: int | None = None,
    override_num_blocks: int | None = None,
) -> Dataset:
    """A Dataset over Python objects: dicts become rows; other values a column ``item``.

    ``npartitions`` (or Ray's ``override_num_blocks``) sets the number of blocks (at
    most one a row).
    """
    npartitions = _blocks_wanted("from_items", npartitions, override_num_blocks)
    values = list(items)
    if values and all(isinstance(v, Mapping) for v in values):
        df = pd.DataFrame.from_records(values)
    elif any(isinstance(v, Mapping) for v in values):
        raise PlanError("from_items: mix of dicts and other values; give all dicts or none")
    else:
        column = np.empty(len(values), dtype=object)
        column[:] = values
        df = batch_to_block({"item": column})
        if len(values):
            with contextlib.suppress(Exception):  # keep objects as they are
                df = df.infer_objects()
    frame = _frame(df, npartitions, "from_items")
    return _dataset(frame, "FromItems", len(df), materialized=True)


def from_dask(frame: dd.DataFrame) -> Dataset:
    """A Dataset over an existing dask DataFrame (its partitions become blocks)."""
    if not isinstance(frame, dd.DataFrame):
        raise PlanError(f"from_dask: expected a dask DataFrame, got {type(frame).__name__}")
    return _dataset(frame, "FromDask", materialized=True)


def _range_block(bounds: tuple[int, int]) -> pd.DataFrame:
    return pd.DataFrame({"id": np.arange(bounds[0], bounds[1], dtype="int64")})


def range(n: int, *, override_num_blocks: int | None = None) -> Dataset:
    """A Dataset of one int64 column ``id`` holding ``0 .. n-1``, generated on workers."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise PlanError(f"range({n!r}): use an integer >= 0")
    blocks = _check_override_num_blocks(override_num_blocks, "range") or max(
        1, min(200, math.ceil(n / TARGET_BLOCK_ROWS))
    )
    edges = np.linspace(0, n, blocks + 1).astype(int).tolist()
    bounds = list(itertools.pairwise(edges))
    meta = pd.DataFrame({"id": np.array([], dtype="int64")})
    frame = dd.from_map(_range_block, bounds, meta=meta, enforce_metadata=False)
    return _dataset(frame, f"Range[{n}]", n, block_rows=[b - a for a, b in bounds])


def _range_tensor_block(bounds: tuple[int, int], shape: tuple[int, ...]) -> pd.DataFrame:
    ids = np.arange(bounds[0], bounds[1], dtype="int64")
    data = np.broadcast_to(ids.reshape((-1,) + (1,) * len(shape)), (len(ids), *shape))
    return batch_to_block({"data": np.ascontiguousarray(data)})


def range_tensor(
    n: int, *, shape: tuple[int, ...] = (1,), override_num_blocks: int | None = None
) -> Dataset:
    """A Dataset of one column ``data``: row i is an array of ``shape`` filled with i.

    As Ray Data's, for synthetic tensor data in tests and benchmarks; generated on the
    workers, an int64 tensor column (N-D rows stack into one array in numpy batches).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise PlanError(f"range_tensor({n!r}): use an integer >= 0")
    if (
        not isinstance(shape, tuple)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
    ):
        raise PlanError(
            f"range_tensor(shape={shape!r}): give a tuple of positive integers, e.g. (2, 2)"
        )
    row_bytes = 8 * math.prod(shape)
    default = max(1, min(200, math.ceil(n * row_bytes / TARGET_BLOCK_BYTES), n or 1))
    blocks = _check_override_num_blocks(override_num_blocks, "range_tensor") or default
    edges = np.linspace(0, n, blocks + 1).astype(int).tolist()
    bounds = list(itertools.pairwise(edges))
    meta = _range_tensor_block((0, 0), shape)
    with keep_object_columns():
        frame = dd.from_map(
            functools.partial(_range_tensor_block, shape=shape),
            bounds,
            meta=meta,
            enforce_metadata=False,
        )
    return _dataset(
        frame,
        f"RangeTensor[{n}, shape={shape}]",
        n,
        block_rows=[b - a for a, b in bounds],
        options={"shape": shape},
    )


def from_torch(dataset: Any) -> Dataset:
    """A Dataset over a ``torch.utils.data.Dataset`` (map-style or iterable): column ``item``.

    As Ray Data's: the items are read here, in order (an iterable dataset to its end),
    each becoming one row of ``item`` (a tuple such as ``(image, label)`` stays a tuple;
    tensors become numpy arrays).
    """
    try:
        import torch.utils.data as tud
    except ImportError:  # pragma: no cover - torch is an optional extra
        raise PlanError("from_torch needs torch: pip install 'daskinfer[torch]'") from None
    if not isinstance(dataset, (tud.Dataset, tud.IterableDataset)):
        raise PlanError(
            f"from_torch({type(dataset).__name__}): give a torch.utils.data.Dataset or "
            "IterableDataset"
        )
    if isinstance(dataset, tud.IterableDataset):
        items = list(dataset)
    else:
        items = [dataset[i] for i in builtins.range(len(dataset))]  # type: ignore[arg-type]
    column = np.empty(len(items), dtype=object)
    column[:] = [_torch_to_numpy(item) for item in items]
    df = batch_to_block({"item": column})
    frame = _frame(df, None, "from_torch")
    return _dataset(frame, "FromTorch", len(df), materialized=True)


def _torch_to_numpy(value: Any) -> Any:
    """Tensors (also inside tuples, lists and dicts) as numpy arrays; the rest unchanged."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        return value.detach().cpu().numpy()
    if isinstance(value, tuple):
        return tuple(_torch_to_numpy(v) for v in value)
    if isinstance(value, list):
        return [_torch_to_numpy(v) for v in value]
    if isinstance(value, dict):
        return {k: _torch_to_numpy(v) for k, v in value.items()}
    return value


# rows a Hugging Face IterableDataset is read in, as Ray's HuggingFaceDatasource reads it
_HF_STREAM_BATCH_ROWS = 4096


@takes_ray_args("from_huggingface", READER_ARGS)
def from_huggingface(dataset: Any, *, override_num_blocks: int | None = None) -> Dataset:
    """A Dataset over a Hugging Face ``datasets.Dataset`` or ``datasets.IterableDataset``.

    As Ray Data's: the columns are the dataset's Arrow data as stored, not decoded
    (an ``Image`` or ``Audio`` feature is a dict of ``bytes`` and ``path``, a
    ``ClassLabel`` its integer), lists are 1-D arrays, structs dicts, and
    ``Array2D``..``Array5D`` features tensor columns (N-D rows that stack in numpy
    batches). The rows of a ``select``, ``shuffle`` or ``filter`` come in that order.
    An ``IterableDataset`` is read here, on the client, to its end (Ray reads it in
    one read task); a large Hub dataset reads faster as Parquet with ``read_parquet``.
    ``override_num_blocks`` sets the number of blocks (at most one a row).
    """
    _check_override_num_blocks(override_num_blocks, "from_huggingface")
    try:
        import datasets
    except ImportError:  # without the package, no value can be one of its datasets
        raise PlanError(
            f"from_huggingface({type(dataset).__name__}): give a datasets.Dataset or "
            "datasets.IterableDataset (the datasets package is not installed: "
            "pip install datasets)"
        ) from None
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        splits = list(dataset.keys())
        raise PlanError(
            f"from_huggingface: got a {type(dataset).__name__} of the splits {splits}; "
            f"give one split, e.g. from_huggingface(dataset[{splits[0]!r}])"
            if splits
            else f"from_huggingface: got an empty {type(dataset).__name__}; give one split"
        )
    if isinstance(dataset, datasets.Dataset):
        table = _hf_table(dataset)
    elif isinstance(dataset, datasets.IterableDataset):
        table = _hf_stream_table(dataset)
    else:
        raise PlanError(
            f"from_huggingface({type(dataset).__name__}): give a datasets.Dataset or "
            "datasets.IterableDataset (a DatasetDict's split, e.g. dataset['train']); "
            "for a torch dataset use from_torch, for an Arrow table from_arrow"
        )
    df = _hf_arrow_to_pandas(table)
    frame = _frame(df, override_num_blocks, "from_huggingface")
    return _dataset(frame, "FromHuggingFace", len(df), materialized=True)


def _hf_table(dataset: Any) -> pa.Table:
    """The Arrow table of a map-style dataset, its rows in the dataset's order.

    A ``select``, ``shuffle`` or ``filter`` keeps the data and adds an indices mapping
    (``_indices``, one row number a row). ``with_format("arrow")[:]``, which Ray uses,
    maps them through a Python loop (about 10 s for two million rows); ``take`` gathers
    the same rows in Arrow.
    """
    table: pa.Table = dataset.data.table
    indices = getattr(dataset, "_indices", None)
    if indices is not None:
        table = table.take(indices.column(0))
    return table


def _hf_stream_table(dataset: Any) -> pa.Table:
    """An IterableDataset read to its end in Arrow batches, concatenated in order."""
    batches = []
    for batch in dataset.with_format("arrow").iter(batch_size=_HF_STREAM_BATCH_ROWS):
        # the Arrow format gives tables; some datasets answer with dicts of columns
        # whatever the format, as Ray's reader allows for
        batches.append(batch if isinstance(batch, pa.Table) else pa.table(batch))
    if not batches:
        features = dataset.features
        return features.arrow_schema.empty_table() if features is not None else pa.table({})
    # a batch of a dataset without declared features may type a column null, where a
    # later batch has values: "default" promotion takes the later type
    return pa.concat_tables(batches, promote_options="default")


def _hf_arrow_to_pandas(table: pa.Table) -> pd.DataFrame:
    """``arrow_to_pandas``, with ``datasets``' ``Array2D``..``Array5D`` columns as tensors.

    Those columns hold an Arrow extension type of the ``datasets`` package, which
    ``Table.to_pandas`` turns into a pandas extension column of that package: blocks
    that a worker without ``datasets`` could not unpickle, and rows a numpy batch does
    not stack. Here they become tensor columns (or, where the first dimension varies
    from row to row, a column of per-row arrays), as Ray's numpy batches give them.
    """
    arrays = [
        i
        for i, field in enumerate(table.schema)
        if isinstance(field.type, pa.ExtensionType)
        and field.type.extension_name.startswith("datasets.")
        and hasattr(field.type, "ndims")
    ]
    if not arrays:
        return arrow_to_pandas(table)
    names = table.column_names
    out = arrow_to_pandas(table.drop_columns([names[i] for i in arrays]))
    for i in arrays:
        column = table.column(i)
        parts = [chunk.to_numpy(zero_copy_only=False) for chunk in column.chunks if len(chunk)]
        values: Any
        if not parts:
            inner = column.type.storage_type
            while pa.types.is_list(inner):
                inner = inner.value_type
            shape = tuple(d or 0 for d in column.type.shape)
            values = np.empty((0, *shape), dtype=inner.to_pandas_dtype())
        elif all(p.dtype != object for p in parts) and len({p.shape[1:] for p in parts}) == 1:
            values = np.concatenate(parts)
        else:  # rows of different shapes: one array a row
            values = [row for part in parts for row in part]
        out.insert(i, names[i], batch_to_block({names[i]: values})[names[i]].array)
    return out
