"""Create Datasets: from in-memory data, from dask, and from files on any fsspec URL.

Every source is a dask DataFrame, so partitioning, schemas and remote filesystems come
from dask's own readers. Paths are expanded here first (globs, directories), so that a
path matching nothing fails at once with the path in the message.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import importlib.util
import itertools
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

import dask
import dask.dataframe as dd
from dask.dataframe.io.parquet.arrow import ArrowDatasetEngine
from dask.utils import natural_sort_key

from daskinfer._internal.batching import arrow_to_pandas, batch_to_block, block_nbytes
from daskinfer._internal.plan import DaskSource, LogicalPlan
from daskinfer.dataset import Dataset
from daskinfer.exceptions import PlanError

TARGET_BLOCK_BYTES = 32 * 2**20
TARGET_BLOCK_ROWS = 64 * 1024
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

logger = logging.getLogger("daskinfer")


def keep_object_columns() -> Any:
    """Stop dask from turning object columns into strings while a frame is built.

    With ``dataframe.convert-string`` on (dask's default), ``from_pandas``, ``from_map``
    and ``from_delayed`` cast every object column to a string dtype, which turns N-D
    values (images, embeddings stored as arrays) into their ``str()``. The setting is
    read when the collection is built, so it is enough to wrap the constructor.
    """
    return dask.config.set({"dataframe.convert-string": False})


def _dataset(
    frame: dd.DataFrame,
    name: str,
    rows: int | None = None,
    *,
    files: Sequence[str] = (),
    storage_options: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    block_rows: Sequence[int] | None = None,
    materialized: bool = False,
) -> Dataset:
    source = DaskSource(
        frame,
        name,
        rows,
        tuple(files),
        dict(storage_options or {}),
        dict(options or {}),
        block_rows=tuple(block_rows) if block_rows is not None else None,
        materialized=materialized,
    )
    return Dataset(LogicalPlan(source))


def _check_override_num_blocks(value: Any, call: str) -> int | None:
    """``override_num_blocks`` checked: None (the reader decides) or an integer >= 1."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise PlanError(
            f"{call}(override_num_blocks={value!r}): use an integer >= 1 (the number of "
            "blocks to read into), or None to let the reader decide"
        )
    return value


def _blocks_wanted(call: str, npartitions: Any, override_num_blocks: Any) -> int | None:
    """The blocks a from_* is asked for: ``npartitions`` or Ray's ``override_num_blocks``."""
    _check_override_num_blocks(override_num_blocks, call)
    if npartitions is not None and override_num_blocks is not None:
        raise PlanError(
            f"{call}(npartitions={npartitions!r}, override_num_blocks={override_num_blocks!r}): "
            "both set the number of blocks; give only one of them"
        )
    return npartitions if npartitions is not None else override_num_blocks


def _override_blocks(
    frame: dd.DataFrame, override_num_blocks: int | None, options: Mapping[str, Any]
) -> tuple[dd.DataFrame, dict[str, Any]]:
    """The frame cut into ``override_num_blocks`` partitions, and the options saying so.

    dask joins neighbouring partitions (fewer blocks) or splits each one (more) in
    order, inside the read tasks: no shuffle, and rows keep their order. The option is
    recorded so that a resumable write sees a source cut differently as another one.
    """
    if override_num_blocks is None:
        return frame, dict(options)
    frame = frame.repartition(npartitions=override_num_blocks)
    return frame, {**options, "override_num_blocks": override_num_blocks}


def _npartitions(df: pd.DataFrame, npartitions: int | None, call: str) -> int:
    if npartitions is not None:
        if not isinstance(npartitions, int) or isinstance(npartitions, bool) or npartitions < 1:
            raise PlanError(f"{call}(npartitions={npartitions!r}): use an integer >= 1")
        return max(1, min(npartitions, len(df) or 1))
    by_bytes = math.ceil(block_nbytes(df) / TARGET_BLOCK_BYTES)
    by_rows = math.ceil(len(df) / TARGET_BLOCK_ROWS)
    return max(1, min(by_bytes + by_rows, 200, len(df) or 1))


def _frame(df: pd.DataFrame, npartitions: int | None, call: str) -> dd.DataFrame:
    df = df.reset_index(drop=True)
    with keep_object_columns():
        return dd.from_pandas(df, npartitions=_npartitions(df, npartitions, call), sort=False)


def _piece(piece: pd.DataFrame) -> pd.DataFrame:
    return piece


def _frame_per_piece(df: pd.DataFrame, lengths: Sequence[int]) -> dd.DataFrame:
    """One partition per piece of ``df`` (consecutive rows, ``lengths`` long each)."""
    df = df.reset_index(drop=True)
    edges = np.cumsum([0, *lengths]).tolist()
    pieces = [df.iloc[a:b] for a, b in itertools.pairwise(edges) if b > a]
    if not pieces:
        return _frame(df, 1, "from_pandas")
    with keep_object_columns():
        return dd.from_map(_piece, pieces, meta=df.iloc[:0], enforce_metadata=False)


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
    frame = ds._plan.source.frame  # type: ignore[union-attr]
    return Dataset(LogicalPlan(DaskSource(frame, "FromArrow", materialized=True)))


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


# ---------------------------------------------------------------------- SQL
# rows of the query read on the client for the columns' types: enough that a column
# NULL in its first rows usually still shows its type, few enough to cost nothing
_SQL_SAMPLE_ROWS = 100
# shards of a read_sql given shard_keys and no override_num_blocks. Ray counts the rows
# on the client (a query over the whole result) and reads in up to 200 tasks of at
# least 50 rows; here the client runs no such query, and each shard is a query that
# the database evaluates over the whole result, so a few
SQL_DEFAULT_SHARDS = 16
_SQL_FUNCTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def _sql_rows(
    connection_factory: Callable[[], Any],
    query: str,
    sql_params: Any,
    limit: int | None = None,
) -> tuple[list[str], list[Any]]:
    """Run ``query`` on a new connection: the column names and the rows (``limit`` at most).

    The connection is closed before returning; nothing is written, so nothing is
    committed (closing ends the transaction a driver may have opened).
    """
    connection = connection_factory()
    for method in ("cursor", "close"):
        if not callable(getattr(connection, method, None)):
            raise TypeError(
                f"read_sql: connection_factory() returned {type(connection).__name__}, "
                f"which has no {method}() method; return a DB-API 2 connection (PEP 249), "
                "e.g. sqlite3.connect(path)"
            )
    try:
        cursor = connection.cursor()
        # without parameters, as Ray: a driver given some would read "%" as a placeholder
        if sql_params is None:
            cursor.execute(query)
        else:
            cursor.execute(query, sql_params)
        if cursor.description is None:
            raise TypeError(f"read_sql: {query!r} returns no rows; give a query (SELECT ...)")
        names = [column[0] for column in cursor.description]
        rows = cursor.fetchall() if limit is None else cursor.fetchmany(limit)
        return names, list(rows)
    finally:
        connection.close()


def _sql_block(names: Sequence[str], rows: Sequence[Any]) -> pd.DataFrame:
    """Rows of a query as pandas.read_sql makes them (decimals as floats)."""
    return pd.DataFrame.from_records(list(rows), columns=list(names), coerce_float=True)


def _read_sql_block(
    query: str, connection_factory: Callable[[], Any], sql_params: Any, empty: pd.DataFrame
) -> pd.DataFrame:
    """One read task of read_sql (on a worker): the rows of ``query``."""
    names, rows = _sql_rows(connection_factory, query, sql_params)
    if not rows:
        # a shard without rows has no values to type its columns by: give them the
        # types the other blocks have, so that an empty block turns no column to object
        return empty.copy()
    return _sql_block(names, rows)


def _sql_shard_queries(sql: str, shard_keys: Sequence[str], hash_fn: str, n: int) -> list[str]:
    """Ray's sharded queries: a row goes to shard ``MOD(ABS(hash(keys)), n)``.

    The query is wrapped as Ray wraps it (``SELECT * FROM (sql) AS T WHERE ...``; keys
    joined with ``CONCAT``). A row whose hash is NULL (a NULL key) is in no shard of
    Ray's and would be lost: here it goes to shard 0, so that every row is read once.
    """
    inner = sql.strip().rstrip(";").rstrip()  # a trailing ";" cannot sit in a subquery
    key = shard_keys[0] if len(shard_keys) == 1 else f"CONCAT({', '.join(shard_keys)})"
    shard = f"COALESCE(MOD(ABS({hash_fn}({key})), {n}), 0)"
    return [f"SELECT * FROM ({inner}) AS T WHERE {shard} = {i}" for i in builtins.range(n)]


def _sql_sample(sql: str, connection_factory: Callable[[], Any], sql_params: Any) -> pd.DataFrame:
    """The first rows of the query, read on the client for the columns and their types.

    Asked with a ``LIMIT`` around the query, so that a driver that fetches a whole
    result when it executes (psycopg2, PyMySQL) fetches only these rows; a database
    without ``LIMIT`` or subqueries runs the query itself, of which only these rows are
    fetched.
    """
    inner = sql.strip().rstrip(";").rstrip()
    limited = f"SELECT * FROM ({inner}) AS T LIMIT {_SQL_SAMPLE_ROWS}"
    try:
        names, rows = _sql_rows(connection_factory, limited, sql_params)
    except Exception:  # noqa: BLE001  # the query as given says what is wrong, if anything
        names, rows = _sql_rows(connection_factory, sql, sql_params, limit=_SQL_SAMPLE_ROWS)
    return _sql_block(names, rows)


def read_sql(
    sql: str,
    connection_factory: Callable[[], Any],
    *,
    sql_params: Any = None,
    shard_keys: Sequence[str] | None = None,
    shard_hash_fn: str = "MD5",
    override_num_blocks: int | None = None,
) -> Dataset:
    """Read the result of a SQL query through a DB-API 2 (PEP 249) connector, as Ray Data.

    ``connection_factory`` takes no arguments and returns a new connection (e.g.
    ``functools.partial(sqlite3.connect, path)``): it is pickled and called on the
    workers, where the reads run. The client runs the query only for its first rows,
    to learn the columns and their types (so that a bad query fails here), and closes
    that connection. Values and types are those of ``pandas.read_sql``.

    Without ``shard_keys`` one task reads the whole result, as in Ray. With them, the
    read is cut into shards as Ray cuts it: shard ``i`` of ``n`` is
    ``SELECT * FROM (sql) AS T WHERE MOD(ABS(shard_hash_fn(keys)), n) = i``, keys
    joined with ``CONCAT``, so the database must have ``MOD``, ``ABS``, ``CONCAT`` (for
    several keys) and the hash function (``MD5`` by default; ``hash``, ``SHA`` ...
    elsewhere; with sqlite3 register one in the factory with
    ``connection.create_function``). ``n`` is ``override_num_blocks``, or
    ``SQL_DEFAULT_SHARDS``; rows whose hash is NULL are read in shard 0 (Ray loses
    them). Whether the database evaluates the shards is asked here: where it cannot,
    ``override_num_blocks > 1`` is refused and, without it, one task reads all (as Ray).
    """
    if not isinstance(sql, str) or not sql.strip():
        raise PlanError(f"read_sql(sql={sql!r}): give the query as a non-empty string")
    if not callable(connection_factory):
        raise PlanError(
            f"read_sql(connection_factory={connection_factory!r}): give a function of no "
            "arguments that opens a new DB-API 2 connection, e.g. "
            "functools.partial(sqlite3.connect, path)"
        )
    _check_override_num_blocks(override_num_blocks, "read_sql")
    if shard_keys is not None and (
        isinstance(shard_keys, str)
        or not isinstance(shard_keys, Sequence)
        or not shard_keys
        or not all(isinstance(k, str) and k.strip() for k in shard_keys)
    ):
        raise PlanError(
            f"read_sql(shard_keys={shard_keys!r}): give a list of column names, e.g. "
            "shard_keys=['id'], or None to read in one task"
        )
    if not isinstance(shard_hash_fn, str) or not _SQL_FUNCTION_NAME.fullmatch(shard_hash_fn):
        raise PlanError(
            f"read_sql(shard_hash_fn={shard_hash_fn!r}): give the name of a SQL function "
            "of your database that hashes a value, e.g. 'MD5' (the default) or 'hash'"
        )
    if override_num_blocks is not None and override_num_blocks > 1 and shard_keys is None:
        raise PlanError(
            f"read_sql(override_num_blocks={override_num_blocks}): a query is read in "
            "several blocks only by shard keys; give shard_keys=[...] too, or drop "
            "override_num_blocks"
        )
    import cloudpickle

    try:  # the factory travels to the workers: an open connection in it cannot
        cloudpickle.dumps((connection_factory, sql_params))
    except Exception as exc:  # any failure to pickle is the same mistake
        raise PlanError(
            f"read_sql(connection_factory={connection_factory!r}): cannot be pickled "
            f"({type(exc).__name__}: {exc}), and it is sent to the workers, which call it; "
            "give a function that opens a new connection when called, not an open "
            "connection or something that holds one"
        ) from exc
    try:
        sample = _sql_sample(sql, connection_factory, sql_params)
    except Exception as exc:  # a bad query or connection, said at the call
        raise PlanError(
            f"read_sql({sql!r}): the query failed on the client, where its first rows are "
            f"read for the columns: {type(exc).__name__}: {exc}; check the query, "
            "sql_params and connection_factory"
        ) from exc
    shards = override_num_blocks or (SQL_DEFAULT_SHARDS if shard_keys else 1)
    queries = [sql]
    if shard_keys and shards > 1:
        queries = _sql_shard_queries(sql, shard_keys, shard_hash_fn, shards)
        try:  # as Ray asks the database whether it shards, on one row of shard 0
            _sql_rows(connection_factory, f"{queries[0]} LIMIT 1", sql_params)
        except Exception as exc:  # any failure means: cannot shard
            if override_num_blocks is not None:
                raise PlanError(
                    f"read_sql(shard_keys={list(shard_keys)!r}, shard_hash_fn="
                    f"{shard_hash_fn!r}, override_num_blocks={override_num_blocks}): the "
                    f"database cannot evaluate the shards ({type(exc).__name__}: {exc}); "
                    "give a shard_hash_fn it has, register one in the connection factory "
                    "(sqlite3: connection.create_function), or override_num_blocks=1"
                ) from exc
            # the error as text: a record holding the exception would keep its frames,
            # and the caller's, alive as long as the record lives
            logger.warning(
                "read_sql: the database cannot evaluate the shards of shard_keys=%r with "
                "shard_hash_fn=%r (%s); reading the query in one task, as Ray does",
                list(shard_keys),
                shard_hash_fn,
                f"{type(exc).__name__}: {exc}",
            )
            queries = [sql]
    empty = sample.iloc[:0]
    with keep_object_columns():  # bytes and other objects stay what they are
        frame = dd.from_map(
            functools.partial(
                _read_sql_block,
                connection_factory=connection_factory,
                sql_params=sql_params,
                empty=empty,
            ),
            queries,
            meta=empty,
            enforce_metadata=False,
        )
    options = {
        "sql": sql,
        "sql_params": sql_params,
        "shard_keys": list(shard_keys) if shard_keys else None,
        "shard_hash_fn": shard_hash_fn,
        "blocks": len(queries),
    }
    return _dataset(frame, "ReadSQL", options=options)


# ---------------------------------------------------------------------- files
def _is_hidden(name: str) -> bool:
    return name.startswith(("_", "."))


def _hidden_by_glob(pattern: str, match: str) -> bool:
    """Whether a glob match passes through a hidden name the pattern did not spell out.

    Names starting with ``_`` or ``.`` (``_SUCCESS``, ``.DS_Store``, a running write's
    ``_daskinfer_temporary``) are skipped, as in a directory listing, unless the pattern
    asks for them at that level (``data/.cache/*``, ``_*.parquet``).
    """
    pat = pattern.rstrip("/").split("/")
    got = match.rstrip("/").split("/")
    if "**" not in pat:
        return len(pat) == len(got) and any(
            _is_hidden(g) and not p.startswith(g[0]) for p, g in zip(pat, got, strict=True)
        )
    head = pat.index("**")
    if any(_is_hidden(g) and not p.startswith(g[0]) for p, g in zip(pat[:head], got, strict=False)):
        return True
    spelled = {p[0] for p in pat[head:] if _is_hidden(p)}
    return any(_is_hidden(g) and g[0] not in spelled for g in got[head:])


def expand_paths(
    paths: str | Sequence[str],
    call: str,
    *,
    extensions: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Expand files, globs and directories (recursively) into a list of URLs.

    The matches of each glob or directory are in natural order (``part-2`` before
    ``part-10``, as dask's readers order them); a list keeps the order it was given in.
    """
    import fsspec

    items = [paths] if isinstance(paths, str) else list(paths)
    if not items or not all(isinstance(p, str) and p for p in items):
        raise PlanError(
            f"{call}(paths={paths!r}): give a path, a glob, a directory or a list of them"
        )
    found: list[str] = []
    for item in items:
        fs, path = fsspec.core.url_to_fs(item, **dict(storage_options or {}))
        # a name with glob characters that exists as a file ("scan [1].png") is that file
        if any(ch in path for ch in "*?[") and not fs.isfile(path):
            matches = sorted(
                (p for p in fs.glob(path) if not fs.isdir(p) and not _hidden_by_glob(path, p)),
                key=natural_sort_key,
            )
        elif fs.isdir(path):
            matches = sorted(
                (
                    p
                    for p in fs.find(path)
                    if not any(_is_hidden(part) for part in p[len(path) :].split("/") if part)
                ),
                key=natural_sort_key,
            )
            if extensions:
                matches = [p for p in matches if p.lower().endswith(tuple(extensions))]
        elif fs.exists(path):
            matches = [path]
        else:
            raise PlanError(
                f"{call}: {item!r} does not exist; check the path (globs and directories are allowed)"
            )
        if not matches:
            wanted = f" with extension {', '.join(extensions)}" if extensions else ""
            raise PlanError(
                f"{call}: {item!r} matched no files{wanted}; check the path or the pattern"
            )
        found.extend(str(fs.unstrip_protocol(p)) for p in matches)
    return found


ROW_FILTER = "daskinfer_row_filter"  # read_parquet(filter=), carried in dask's arrow_to_pandas


class _ParquetEngine(ArrowDatasetEngine):
    """dask's pyarrow engine for Parquet, with N-D columns read as tensor columns.

    dask's own engine cannot read back what ``write_parquet`` makes of N-D rows (Arrow's
    ``fixed_shape_tensor``): it builds the meta from ``schema.empty_table()``, which
    pyarrow refuses for that type with a permutation (``write_parquet``'s carry the
    identity one), and ``Table.to_pandas`` gives each row as a flat 1-D array (an
    ``(h, w, 3)`` image as ``h*w*3`` numbers). Here such columns become ``TensorArray``
    columns of the written shape and dtype, in the meta as in every partition, as in a
    Dataset made by ``from_numpy``; dask converts the other columns as it does.

    An engine rather than a ``types_mapper`` in dask's ``arrow_to_pandas`` option: dask
    stores its wrapper of that mapper back into the option, which the partitions of one
    read share, so each partition read in a process wraps it once more (one stack frame
    more per partition with dask 2026.8: a RecursionError after about a thousand).
    """

    @classmethod
    def _create_dd_meta(cls, dataset_info: dict[str, Any]) -> pd.DataFrame:
        # dask makes the meta from ``schema.empty_table()``, which pyarrow refuses for a
        # fixed_shape_tensor type with a permutation ("not supported"), and the type
        # that write_parquet writes carries one (the identity): let dask see the storage
        # type (fixed-size lists) here only, then put in each tensor column as it reads
        schema = dataset_info["schema"]
        tensors = {f.name: f.type for f in schema if isinstance(f.type, pa.FixedShapeTensorType)}
        if not tensors:
            return super()._create_dd_meta(dataset_info)
        dataset_info["schema"] = pa.schema(
            [f.with_type(f.type.storage_type) if f.name in tensors else f for f in schema],
            metadata=schema.metadata,
        )
        try:
            meta = super()._create_dd_meta(dataset_info)
        finally:
            dataset_info["schema"] = schema  # the files are read with their own types
        empty = pa.table(
            {
                name: pa.ExtensionArray.from_storage(typ, pa.array([], typ.storage_type))
                for name, typ in tensors.items()
            }
        )
        for name, column in arrow_to_pandas(empty).items():
            if name in meta.columns:
                meta[name] = column.array
        return meta

    @classmethod
    def multi_support(cls) -> bool:
        # dask reads several pieces of a partition at once only with its own engine (a
        # subclass might read differently); this one reads as dask's does
        return True

    @classmethod
    def _arrow_table_to_pandas(
        cls, arrow_table: pa.Table, categories: Any, *args: Any, **kwargs: Any
    ) -> pd.DataFrame:
        # read_parquet(filter=): a pyarrow expression, applied to each table as read,
        # before the rows it drops cost a conversion (a copy of dask's options without
        # it, since dask hands the rest to Table.to_pandas)
        to_pandas = dict(kwargs.get("arrow_to_pandas") or {})
        row_filter = to_pandas.pop(ROW_FILTER, None)
        kwargs["arrow_to_pandas"] = to_pandas
        if row_filter is not None:
            arrow_table = arrow_table.filter(row_filter)
        schema = arrow_table.schema
        tensors = [f.name for f in schema if isinstance(f.type, pa.FixedShapeTensorType)]
        if not tensors:
            return super()._arrow_table_to_pandas(arrow_table, categories, *args, **kwargs)
        df = super()._arrow_table_to_pandas(
            arrow_table.drop_columns(tensors), categories, *args, **kwargs
        )
        as_tensors = arrow_to_pandas(arrow_table.select(tensors))
        for name in tensors:  # in the file's column order
            before = schema.names[: schema.get_field_index(name)]
            df.insert(sum(n in df.columns for n in before), name, as_tensors[name].array)
        return df


def _hive_partitioning(
    files: Sequence[str], storage_options: Mapping[str, Any] | None
) -> dict[str, Any]:
    """dask's ``dataset=`` options that give Hive directories (``year=2024/``) their types.

    dask discovers the partitioning file by file when it reads, and a file whose only
    directory for a column is the null one (``city=__HIVE_DEFAULT_PARTITION__``, as
    ``write_parquet(partition_cols=...)`` writes nulls) has no value to infer a type
    from: its read fails. The schema is discovered here once, over all the paths, and
    every read uses it (the columns then hold plain values, not dask's categoricals).
    """
    import fsspec
    import pyarrow.dataset as pa_ds
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    if not any("=" in part for url in files for part in url.split("/")[:-1]):
        return {}
    fs, first = fsspec.core.url_to_fs(files[0], **dict(storage_options or {}))
    paths = [
        first,
        *(fsspec.core.url_to_fs(url, **dict(storage_options or {}))[1] for url in files[1:]),
    ]
    discovered = pa_ds.dataset(
        paths, filesystem=PyFileSystem(FSSpecHandler(fs)), format="parquet", partitioning="hive"
    ).partitioning
    if discovered is None or not len(discovered.schema):
        return {}
    return {"partitioning": {"flavor": "hive", "schema": discovered.schema}}


def read_parquet(
    paths: str | Sequence[str],
    *,
    columns: Sequence[str] | None = None,
    filter: Any = None,  # Ray Data's name, though it shadows the builtin
    storage_options: Mapping[str, Any] | None = None,
    override_num_blocks: int | None = None,
) -> Dataset:
    """Read Parquet files (paths, globs, directories, any fsspec URL).

    Columns that ``write_parquet`` wrote from N-D rows (Arrow's ``fixed_shape_tensor``)
    read back as tensor columns, each row an array of the written shape; list columns
    (1-D rows, e.g. embeddings) as columns of 1-D arrays. Either stacks into one array
    in the numpy batch format.

    ``override_num_blocks=n`` (as Ray Data's readers take it) reads into exactly ``n``
    blocks: neighbouring files join into one block, or each file splits into several,
    in order (by default, a block per file).

    As in Ray Data: ``filter=`` takes a pyarrow expression (``pc.field("x") > 5``),
    applied to the rows as each file is read (a ``filter(expr=...)`` after the read is
    also handed to the reader, and skips whole partitions and row groups besides).
    """
    _check_override_num_blocks(override_num_blocks, "read_parquet")
    if filter is not None:
        import pyarrow.dataset as pa_ds

        if not isinstance(filter, pa_ds.Expression):
            raise PlanError(
                f"read_parquet(filter={filter!r}): give a pyarrow expression, e.g. "
                "pyarrow.compute.field('x') > 5 (for a string condition, use "
                "read_parquet(...).filter(expr='x > 5'))"
            )
    files = expand_paths(
        paths,
        "read_parquet",
        extensions=(".parquet", ".parq", ".pq"),
        storage_options=storage_options,
    )
    try:
        frame = parquet_frame(
            files,
            columns=columns,
            storage_options=storage_options,
            override_num_blocks=override_num_blocks,
            row_filter=filter,
        )
    except Exception as exc:
        raise PlanError(
            f"read_parquet: could not read the Parquet files under {paths!r}: {exc}"
        ) from exc
    options: dict[str, Any] = {"columns": columns}
    if override_num_blocks is not None:
        options["override_num_blocks"] = override_num_blocks
    if filter is not None:
        options["filter"] = filter
    return _dataset(
        frame,
        "ReadParquet",
        files=files,
        storage_options=storage_options,
        options=options,
    )


def parquet_frame(
    files: Sequence[str],
    *,
    columns: Sequence[str] | None,
    storage_options: Mapping[str, Any] | None,
    override_num_blocks: int | None,
    filters: list[list[tuple[str, str, Any]]] | None = None,
    row_filter: Any = None,
) -> dd.DataFrame:
    """The dask frame of ``read_parquet`` over expanded ``files`` (``filters``: dask's DNF)."""
    # dask's reader sorts the files it is given; read each naturally sorted run of the
    # list on its own, so that rows come in the order of the paths the user listed
    runs: list[list[str]] = []
    for url in files:
        if runs and natural_sort_key(runs[-1][-1]) <= natural_sort_key(url):
            runs[-1].append(url)
        else:
            runs.append([url])
    dataset_options = _hive_partitioning(files, storage_options)
    frames = [
        dd.read_parquet(
            run,
            columns=list(columns) if columns else None,
            storage_options=dict(storage_options or {}),
            engine=_ParquetEngine,
            dataset=dataset_options,
            filters=filters,
            **({"arrow_to_pandas": {ROW_FILTER: row_filter}} if row_filter is not None else {}),
        )
        for run in runs
    ]
    frame = frames[0] if len(frames) == 1 else dd.concat(frames)
    frame, _ = _override_blocks(frame, override_num_blocks, {})
    return frame


def _read_table_file(
    url: str, fmt: str, storage_options: Mapping[str, Any], pandas_kwargs: Mapping[str, Any]
) -> pd.DataFrame:
    """One CSV or JSON file as one block, with the types pandas infers for this file."""
    import fsspec

    with fsspec.open(url, "rb", compression="infer", **dict(storage_options)) as f:
        if fmt == "csv":
            return pd.read_csv(f, **pandas_kwargs)
        return pd.read_json(f, **pandas_kwargs)


def _table_files_frame(
    files: Sequence[str],
    fmt: str,
    storage_options: Mapping[str, Any] | None,
    pandas_kwargs: Mapping[str, Any],
) -> dd.DataFrame:
    """A block per file, each file's types its own, as Ray Data's readers do.

    dask's ``read_csv``/``read_json`` infer the types from the start of the first file
    and fail the job on a later file that disagrees (a column of whole numbers there,
    decimals here); a file read on its own never disagrees with itself, and blocks of
    different types concatenate as pandas does (int and float make float). The meta is
    the first file's, read here; a bad argument or file fails here, before any work.
    """
    options = dict(storage_options or {})
    read = functools.partial(
        _read_table_file, fmt=fmt, storage_options=options, pandas_kwargs=dict(pandas_kwargs)
    )
    try:
        meta = read(files[0]).iloc[:0]
    except Exception as exc:
        raise PlanError(
            f"read_{fmt}: could not read {files[0]!r} with {dict(pandas_kwargs)!r}: {exc}"
        ) from exc
    return dd.from_map(read, list(files), meta=meta, enforce_metadata=False)


def read_csv(
    paths: str | Sequence[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    override_num_blocks: int | None = None,
    **pandas_kwargs: Any,
) -> Dataset:
    """Read CSV files; extra keyword arguments go to ``pandas.read_csv``.

    Each file is read with its own types (a later file whose column holds decimals
    where the first held whole numbers is read as such; ``dtype=`` fixes them).
    ``override_num_blocks=n`` (as Ray Data's readers take it) reads into exactly ``n``
    blocks: neighbouring files join into one block, or each file splits into several,
    in order (by default, a block per file).
    """
    _check_override_num_blocks(override_num_blocks, "read_csv")
    files = expand_paths(
        paths, "read_csv", extensions=(".csv", ".csv.gz", ".tsv"), storage_options=storage_options
    )
    frame = _table_files_frame(files, "csv", storage_options, pandas_kwargs)
    frame, options = _override_blocks(frame, override_num_blocks, pandas_kwargs)
    return _dataset(frame, "ReadCSV", files=files, storage_options=storage_options, options=options)


def read_json(
    paths: str | Sequence[str],
    *,
    lines: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    override_num_blocks: int | None = None,
) -> Dataset:
    """Read JSON files: JSON lines by default, or one array of records per file.

    Each file is read with its own types, as in ``read_csv``. ``override_num_blocks=n``
    (as Ray Data's readers take it) reads into exactly ``n`` blocks: neighbouring files
    join into one block, or each file splits into several, in order (by default, a
    block per file).
    """
    _check_override_num_blocks(override_num_blocks, "read_json")
    files = expand_paths(
        paths,
        "read_json",
        extensions=(".json", ".jsonl", ".json.gz"),
        storage_options=storage_options,
    )
    frame = _table_files_frame(
        files, "json", storage_options, {"orient": "records", "lines": lines}
    )
    frame, options = _override_blocks(frame, override_num_blocks, {"lines": lines})
    return _dataset(
        frame, "ReadJSON", files=files, storage_options=storage_options, options=options
    )


def _read_text_file(
    url: str, encoding: str, drop_empty_lines: bool, storage_options: Mapping[str, Any]
) -> pd.DataFrame:
    import fsspec

    with fsspec.open(url, "rt", encoding=encoding, **dict(storage_options)) as f:
        lines = f.read().splitlines()
    if drop_empty_lines:
        lines = [line for line in lines if line.strip()]
    column = np.empty(len(lines), dtype=object)
    column[:] = lines
    return pd.DataFrame({"text": column})


def read_text(
    paths: str | Sequence[str],
    *,
    encoding: str = "utf-8",
    drop_empty_lines: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    override_num_blocks: int | None = None,
) -> Dataset:
    """Read text files: one row per line, in column ``text``.

    Lines that are empty or hold only whitespace are dropped, as Ray Data's
    ``read_text`` drops them by default; ``drop_empty_lines=False`` keeps them (e.g. to
    keep line numbers, or paragraph breaks).

    ``override_num_blocks=n`` (as Ray Data's readers take it) reads into exactly ``n``
    blocks: neighbouring files join into one block, or each file splits into several,
    in order (by default, a block per file).
    """
    _check_override_num_blocks(override_num_blocks, "read_text")
    files = expand_paths(paths, "read_text", storage_options=storage_options)
    meta = pd.DataFrame({"text": pd.Series([], dtype=object)})
    frame = dd.from_map(
        _read_text_file,
        files,
        encoding=encoding,
        drop_empty_lines=drop_empty_lines,
        storage_options=dict(storage_options or {}),
        meta=meta,
        enforce_metadata=False,
    )
    frame, options = _override_blocks(
        frame,
        override_num_blocks,
        {"encoding": encoding, "drop_empty_lines": drop_empty_lines},
    )
    return _dataset(
        frame, "ReadText", files=files, storage_options=storage_options, options=options
    )


# files fetched per request in read_images: fsspec's ``cat`` of a list runs its requests
# concurrently on object stores (s3, gcs, http), where one request per file in turn
# would leave the task waiting on round trips; a bound, so that a block of large TIFFs
# does not hold all its files' bytes at once
_IMAGE_FILES_PER_FETCH = 16


def _fetch_files(
    urls: Sequence[str], storage_options: Mapping[str, Any]
) -> Iterable[tuple[str, bytes]]:
    """Each URL with its file's bytes, in order."""
    import fsspec

    located = [(url, *fsspec.core.url_to_fs(url, **dict(storage_options))) for url in urls]
    start = 0
    while start < len(located):
        # a run of files on one filesystem (fsspec keeps one instance per protocol and
        # options), at most _IMAGE_FILES_PER_FETCH long
        fs = located[start][1]
        stop = start + 1
        while (
            stop < len(located) and stop - start < _IMAGE_FILES_PER_FETCH and located[stop][1] is fs
        ):
            stop += 1
        run = located[start:stop]
        # cat_ranges, not cat: it takes paths literally (cat globs a name with "[" in
        # it) and answers in order, an exception in place of a file it could not read
        contents = fs.cat_ranges([path for _, _, path in run], None, None, on_error="return")
        for (url, _, _), data in zip(run, contents, strict=True):
            if isinstance(data, BaseException):
                raise OSError(f"read_images: {url!r} could not be read: {data!r}") from data
            yield url, data
        start = stop


def _read_files(
    urls: Sequence[str],
    column: str,
    decode: Callable[[str, bytes], Any] | None,
    include_paths: bool,
    storage_options: Mapping[str, Any],
) -> pd.DataFrame:
    """One row per file: its bytes, or ``decode(url, bytes)``, in ``column``; the URL in ``path``."""
    values = np.empty(len(urls), dtype=object)
    for i, (url, data) in enumerate(_fetch_files(urls, storage_options)):
        values[i] = data if decode is None else decode(url, data)
    columns: dict[str, Any] = {column: values}
    if include_paths:
        paths = np.empty(len(urls), dtype=object)
        paths[:] = list(urls)
        columns["path"] = paths
    return pd.DataFrame(columns)


def _files_dataset(
    call: str,
    name: str,
    paths: str | Sequence[str],
    column: str,
    decode: Callable[[str, bytes], Any] | None,
    *,
    include_paths: bool,
    files_per_block: int | None,
    default_files_per_block: int,
    override_num_blocks: int | None,
    storage_options: Mapping[str, Any] | None,
    extensions: Sequence[str] | None = None,
    options: Mapping[str, Any] | None = None,
) -> Dataset:
    """A Dataset of one row per file (see _read_files).

    ``files_per_block`` files a block (``default_files_per_block`` if None), or the
    files cut into ``override_num_blocks`` runs of near-equal length, as Ray Data's
    file readers cut their paths into read tasks (so never more blocks than files).
    """
    if files_per_block is not None and (
        not isinstance(files_per_block, int)
        or isinstance(files_per_block, bool)
        or files_per_block < 1
    ):
        raise PlanError(f"{call}(files_per_block={files_per_block!r}): use a positive integer")
    _check_override_num_blocks(override_num_blocks, call)
    if files_per_block is not None and override_num_blocks is not None:
        raise PlanError(
            f"{call}(files_per_block={files_per_block}, override_num_blocks="
            f"{override_num_blocks}): both set how the files are cut into blocks; give only "
            "one of them"
        )
    files = expand_paths(paths, call, extensions=extensions, storage_options=storage_options)
    if override_num_blocks is not None:
        # a file is one row, so a block holds at least one file
        edges = np.linspace(0, len(files), min(override_num_blocks, len(files)) + 1)
        bounds = itertools.pairwise(edges.astype(int).tolist())
        groups = [files[a:b] for a, b in bounds]
    else:
        files_per_block = files_per_block or default_files_per_block
        groups = [
            files[i : i + files_per_block] for i in builtins.range(0, len(files), files_per_block)
        ]
    meta_cols: dict[str, Any] = {column: pd.Series([], dtype=object)}
    if include_paths:
        meta_cols["path"] = pd.Series([], dtype=object)
    with keep_object_columns():  # arrays and bytes stay what they are, not str
        frame = dd.from_map(
            _read_files,
            groups,
            column=column,
            decode=decode,
            include_paths=include_paths,
            storage_options=dict(storage_options or {}),
            meta=pd.DataFrame(meta_cols),
            enforce_metadata=False,
        )
    options = {
        **(options or {}),
        "include_paths": include_paths,
        "files_per_block": files_per_block,
    }
    if override_num_blocks is not None:
        options["override_num_blocks"] = override_num_blocks
    return _dataset(frame, name, files=files, storage_options=storage_options, options=options)


def read_binary_files(
    paths: str | Sequence[str],
    *,
    include_paths: bool = False,
    files_per_block: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    override_num_blocks: int | None = None,
) -> Dataset:
    """Read whole files, one row each, into column ``bytes`` (and ``path``), as Ray Data does.

    For formats no reader here decodes (audio, PDF, video), and for images that the
    predictor decodes itself, e.g. on the GPU when the CPUs cannot decode as fast as the
    model runs. Files are fetched 16 at a time, concurrently on object stores; a block
    holds ``files_per_block`` whole files (16 by default), so lower it for large files.
    Or, as in Ray Data, ``override_num_blocks=n`` cuts the files into ``n`` blocks of
    near-equal counts (a block a file where there are fewer than ``n``, as Ray).
    """
    return _files_dataset(
        "read_binary_files",
        "ReadBinaryFiles",
        paths,
        "bytes",
        None,
        include_paths=include_paths,
        files_per_block=files_per_block,
        default_files_per_block=16,
        override_num_blocks=override_num_blocks,
        storage_options=storage_options,
    )


def _decode_image(
    url: str, data: bytes, size: tuple[int, int] | None, mode: str | None
) -> np.ndarray:
    import io

    from PIL import Image

    try:
        image: Image.Image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:
        raise OSError(f"read_images: {url!r} is not a readable image: {exc}") from exc
    # as Ray Data's read_images does, so that a ported pipeline sees the same pixels:
    # resize first, bilinear (about a sixth less CPU than Pillow's default, bicubic),
    # then convert (rounding makes the order matter, e.g. for RGB -> L)
    if size is not None:
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    if mode is not None:
        image = image.convert(mode)
    return np.asarray(image)


def _read_images(
    urls: Sequence[str],
    size: tuple[int, int] | None,
    mode: str | None,
    include_paths: bool,
    storage_options: Mapping[str, Any],
) -> pd.DataFrame:
    """One block of ``read_images``, as its read task builds it (benchmarks time it alone)."""
    decode = functools.partial(_decode_image, size=size, mode=mode)
    return _read_files(urls, "image", decode, include_paths, storage_options)


def read_images(
    paths: str | Sequence[str],
    *,
    size: tuple[int, int] | None = None,
    mode: str | None = None,
    include_paths: bool = False,
    files_per_block: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    override_num_blocks: int | None = None,
) -> Dataset:
    """Read images (decoded with Pillow on the workers) into column ``image``.

    ``size=(height, width)`` resizes and then ``mode`` (``"RGB"``, ``"L"`` ...) converts,
    as Ray Data's ``read_images`` does (bilinear; Pillow resizes palette images nearest),
    so that a port sees the same pixels. Each value is an ``HxWxC`` (or ``HxW``) uint8
    array. A block holds ``files_per_block`` images (64 by default), or, as in Ray
    Data, ``override_num_blocks=n`` cuts the files into ``n`` blocks (a block an image
    where there are fewer, as Ray). The files of a block are fetched 16 at a time,
    concurrently on object stores. Needs the ``images`` extra
    (``pip install 'daskinfer[images]'``).
    """
    if importlib.util.find_spec("PIL") is None:
        raise PlanError("read_images needs Pillow: pip install 'daskinfer[images]'")
    if size is not None and (len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size)):
        raise PlanError(f"read_images(size={size!r}): use (height, width) with positive integers")
    size = (size[0], size[1]) if size else None
    return _files_dataset(
        "read_images",
        "ReadImages",
        paths,
        "image",
        functools.partial(_decode_image, size=size, mode=mode),
        include_paths=include_paths,
        files_per_block=files_per_block,
        default_files_per_block=64,
        override_num_blocks=override_num_blocks,
        storage_options=storage_options,
        extensions=IMAGE_EXTENSIONS,
        options={"size": size, "mode": mode},
    )


def _read_npy(url: str, storage_options: Mapping[str, Any], include_paths: bool) -> pd.DataFrame:
    import fsspec

    with fsspec.open(url, "rb", **dict(storage_options)) as f:
        array = np.load(f, allow_pickle=False)
    if array.ndim == 0:
        array = array.reshape(1)
    columns: dict[str, Any] = {"data": array}
    if include_paths:
        paths = np.empty(len(array), dtype=object)
        paths[:] = url
        columns["path"] = paths
    return batch_to_block(columns)


def read_numpy(
    paths: str | Sequence[str],
    *,
    include_paths: bool = False,
    override_num_blocks: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Dataset:
    """Read ``.npy`` files into column ``data``, as Ray Data does: a row per first-axis entry.

    Each file is one block (a file of N-D arrays gives a tensor column of the rest of
    its shape); ``override_num_blocks`` re-cuts them. Pickled object arrays are refused
    (``allow_pickle=False``), as Ray's default. ``write_numpy`` writes such files.
    """
    import fsspec

    _check_override_num_blocks(override_num_blocks, "read_numpy")
    files = expand_paths(paths, "read_numpy", extensions=(".npy",), storage_options=storage_options)
    options = dict(storage_options or {})
    # the meta (dtype and row shape) from the first file's header, without reading its data
    with fsspec.open(files[0], "rb", **options) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:  # no public reader of a 3.0 header alone: load the file
            f.seek(0)
            first = np.load(f, allow_pickle=False)
            shape, dtype = first.shape, first.dtype
    if dtype.hasobject:
        raise PlanError(
            f"read_numpy: {files[0]!r} holds Python objects, which need pickle to load; "
            "save plain numeric or string arrays"
        )
    meta_columns: dict[str, Any] = {"data": np.empty((0, *shape[1:]), dtype=dtype)}
    if include_paths:
        meta_columns["path"] = np.empty(0, dtype=object)
    with keep_object_columns():
        frame = dd.from_map(
            functools.partial(_read_npy, storage_options=options, include_paths=include_paths),
            files,
            meta=batch_to_block(meta_columns),
            enforce_metadata=False,
        )
    frame, read_options = _override_blocks(
        frame, override_num_blocks, {"include_paths": include_paths}
    )
    return _dataset(
        frame, "ReadNumpy", files=files, storage_options=storage_options, options=read_options
    )
