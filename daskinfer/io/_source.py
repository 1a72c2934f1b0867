"""What every reader shares: the Dataset over a dask frame, and how many blocks it has.

Every source is a dask DataFrame, so partitioning, schemas and remote filesystems come
from dask's own readers; ``_dataset`` wraps one in a Dataset with what a resumable
write needs to find the same blocks again.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

import dask
import dask.dataframe as dd

from daskinfer._internal.batching import block_nbytes
from daskinfer._internal.plan import DaskSource, LogicalPlan
from daskinfer.dataset import Dataset
from daskinfer.exceptions import PlanError

TARGET_BLOCK_BYTES = 32 * 2**20
TARGET_BLOCK_ROWS = 64 * 1024


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
