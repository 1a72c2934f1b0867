"""Filters pushed into Parquet reads: ``read_parquet(...).filter(expr=...)`` reads less.

As Ray Data's optimizer does, a ``filter(expr=...)`` right after ``read_parquet`` is
also handed to the reader, as dask's ``filters=`` (disjunctive normal form: an OR of
ANDs of ``(column, op, value)``). dask then skips Hive partitions (``year=2023/``) and
row groups whose statistics rule the condition out, and drops the rows it does not meet
as it reads. The filter stage still runs after the read, on what is left, so the part of
a condition the reader cannot take (arithmetic, functions, ``not``, a comparison of two
columns) costs nothing in correctness: the reader is only ever given a condition that
every kept row meets (a conjunct of an AND, never a part of an OR).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pandas as pd

from daskinfer._internal.expressions import Column, Compare, Literal, Logical, Node, ValueList

# more OR branches than this and the reader gets no filter: it is only a saving
MAX_CONJUNCTIONS = 32
_FLIPPED = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}

Conjunction = tuple[tuple[str, str, Any], ...]


def to_dnf(node: Node, dtypes: pd.Series) -> list[Conjunction] | None:
    """``node`` as dask's DNF filters, weakened where needed; ``None``: no filter.

    ``dtypes`` are the source's column types: a comparison goes to the reader only where
    its constant has the column's kind (a number for a number column, text for text), so
    that pyarrow never meets a comparison it would refuse (a date against text).
    """
    if isinstance(node, Logical) and node.op == "and":
        parts = [to_dnf(child, dtypes) for child in node.operands]
        kept = [p for p in parts if p is not None]  # dropping a conjunct only weakens it
        if not kept:
            return None
        result: list[Conjunction] = [()]
        for part in kept:
            result = [a + b for a, b in itertools.product(result, part)]
            if len(result) > MAX_CONJUNCTIONS:
                return None
        return result
    if isinstance(node, Logical) and node.op == "or":
        branches: list[Conjunction] = []
        for child in node.operands:
            branch = to_dnf(child, dtypes)
            if branch is None:  # one branch the reader cannot check: it cannot filter at all
                return None
            branches.extend(branch)
        return branches if len(branches) <= MAX_CONJUNCTIONS else None
    atom = _atom(node, dtypes)
    return None if atom is None else [(atom,)]


def _atom(node: Node, dtypes: pd.Series) -> tuple[str, str, Any] | None:
    if not isinstance(node, Compare):
        return None
    left, right, op = node.left, node.right, node.op
    if isinstance(left, Literal) and isinstance(right, Column) and op in _FLIPPED:
        left, right, op = right, left, _FLIPPED[op]
    if not isinstance(left, Column) or left.name not in dtypes.index:
        return None
    dtype = dtypes[left.name]
    if op in ("in", "not in") and isinstance(right, ValueList):
        values = list(right.values)
        if values and all(_fits(v, dtype) for v in values):
            return (left.name, op, values)
        return None
    if op in _FLIPPED and isinstance(right, Literal) and _fits(right.value, dtype):
        return (left.name, op, right.value)
    return None


def _fits(value: Any, dtype: Any) -> bool:
    """Whether pyarrow compares ``value`` with a column of ``dtype`` as Python would."""
    if value is None or isinstance(value, bool):
        return False  # null compares to nothing; booleans are left to the filter stage
    if isinstance(value, (int, float)):
        return pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)
    if isinstance(value, str):
        return pd.api.types.is_string_dtype(dtype) and not pd.api.types.is_object_dtype(dtype)
    return False


def push_into_parquet(source: Any, predicate: Node) -> Any | None:
    """The ``ReadParquet`` source read again with ``predicate``'s filters; None if none apply."""
    from daskinfer.io.files import PATH_COLUMN, parquet_frame

    options = dict(source.options)
    include_paths = bool(options.get("include_paths"))
    dtypes = source.frame.dtypes
    if include_paths:  # not in the files: a condition on it stays with the filter stage
        dtypes = dtypes.drop(PATH_COLUMN)
    filters = to_dnf(predicate, dtypes)
    if filters is None:
        return None
    previous = options.get("filters")
    if previous is not None:  # a second filter: both hold
        # stored as dask takes them (lists of the same tuples)
        combined = [tuple(a) + b for a, b in itertools.product(previous, filters)]
        if len(combined) > MAX_CONJUNCTIONS:
            return None
        filters = combined
    dnf = [list(conjunction) for conjunction in filters]
    frame = parquet_frame(
        list(source.files),
        columns=options.get("columns"),
        storage_options=source.storage_options,
        override_num_blocks=options.get("override_num_blocks"),
        filters=dnf,
        row_filter=options.get("filter"),
        include_paths=include_paths,
    )
    options["filters"] = dnf
    return dataclasses.replace(source, frame=frame, rows=None, block_rows=None, options=options)
