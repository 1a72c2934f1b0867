"""Cutting materialized blocks by row position: Ray Data's ``split*`` verbs and ``zip``.

A materialized Dataset's blocks are futures with known row counts, so a cut at any row
is plain arithmetic here plus, for a block the cut falls inside, one slicing task on
the worker that holds it; whole blocks are reused as they are. The functions that run
on workers are plain and picklable and hold no client.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from daskinfer._internal.batching import concat_blocks
from daskinfer.exceptions import PlanError

#: (block number, first row, end row) of one piece of an output range
Piece = tuple[int, int, int]


def pieces_of(rows: Sequence[int], start: int, stop: int) -> list[Piece]:
    """The parts of blocks of ``rows`` rows each that hold rows ``start`` to ``stop``."""
    pieces = []
    offset = 0
    for number, count in enumerate(rows):
        lo, hi = max(start, offset), min(stop, offset + count)
        if lo < hi:
            pieces.append((number, lo - offset, hi - offset))
        offset += count
        if offset >= stop:
            break
    return pieces


def slice_rows(block: pd.DataFrame, start: int, stop: int) -> pd.DataFrame:
    """Rows ``start`` to ``stop`` of a block (runs on the worker holding it)."""
    return block.iloc[start:stop].reset_index(drop=True)


def zip_columns(
    left: pd.DataFrame, layout: Sequence[Sequence[tuple[int, int]]], *pieces: pd.DataFrame
) -> pd.DataFrame:
    """``left``'s columns, then those of each other dataset's rows at the same positions.

    ``layout[k]``: for the k-th other dataset, (start, stop) within each of its pieces,
    which come in ``pieces`` one dataset after another. A column whose name is taken
    gets the suffix ``_k`` (k = 1 for the first other dataset), as in Ray Data.
    """
    out = left.reset_index(drop=True)
    position = 0
    for k, slices in enumerate(layout, start=1):
        mine = pieces[position : position + len(slices)]
        position += len(slices)
        right = concat_blocks(
            [
                block.iloc[a:b].reset_index(drop=True)
                for block, (a, b) in zip(mine, slices, strict=True)
            ]
        )
        renamed: dict[str, str] = {}
        for name in right.columns:
            new = name
            while new in out.columns or new in renamed.values():
                new = f"{new}_{k}"
            renamed[name] = new
        right = right.rename(columns=renamed).reset_index(drop=True)
        out = pd.concat([out, right], axis=1)
    return out


def check_indices(indices: Any, call: str) -> list[int]:
    """``split_at_indices``' positions: non-negative integers in order."""
    if not isinstance(indices, list | tuple) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in indices
    ):
        raise PlanError(f"{call}(indices={indices!r}): give a list of row positions")
    if any(i < 0 for i in indices) or list(indices) != sorted(indices):
        raise PlanError(
            f"{call}(indices={list(indices)!r}): positions must be >= 0 and in increasing order"
        )
    return list(indices)
