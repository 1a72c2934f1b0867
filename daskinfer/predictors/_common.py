"""Pieces every ready predictor shares: batch columns, argument checks, device, threads.

Nothing here imports torch, transformers or tensorflow at module level: the predictors'
modules are imported by ``import daskinfer.predictors`` on the client, where the heavy
libraries may not even be installed. They are imported in ``__init__`` on the worker.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from daskinfer.exceptions import PlanError

Batch = dict[str, np.ndarray]


def batch_columns(batch: Any) -> Batch:
    """The batch as ``dict[str, numpy.ndarray]``, whatever ``batch_format`` delivered.

    The predictors work on numpy columns (``batch_format="numpy"``, map_batches' default);
    a ``pandas.DataFrame`` or ``pyarrow.Table`` is converted here so that the other
    formats work too.
    """
    if isinstance(batch, Mapping):
        return {str(k): np.asarray(v) for k, v in batch.items()}
    if hasattr(batch, "to_pydict") and hasattr(batch, "column_names"):  # pyarrow.Table
        return {
            name: np.asarray(batch.column(name).to_numpy(zero_copy_only=False))
            for name in batch.column_names
        }
    if hasattr(batch, "columns") and hasattr(batch, "to_numpy"):  # pandas.DataFrame
        from daskinfer._internal.batching import column_to_numpy

        # an N-D column comes as its one array, not an array per row
        return {str(c): column_to_numpy(batch[c]) for c in batch.columns}
    raise TypeError(
        f"a predictor got a batch of type {type(batch).__name__}; expected a "
        "dict of numpy arrays, a pandas.DataFrame or a pyarrow.Table"
    )


def require_columns(owner: str, batch: Batch, names: Sequence[str]) -> None:
    """Raise ``KeyError`` naming the missing column(s) and the columns the batch has."""
    missing = [n for n in names if n not in batch]
    if missing:
        raise KeyError(
            f"{owner}: input column(s) {missing} are not in the batch, which has columns "
            f"{sorted(batch)}; pass the right name(s) in fn_constructor_kwargs"
        )


def as_names(owner: str, arg: str, value: str | Sequence[str]) -> tuple[str, ...]:
    """A column name or a sequence of them, as a non-empty tuple of strings."""
    names = (value,) if isinstance(value, str) else tuple(value)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise PlanError(
            f"{owner}({arg}={value!r}): give a column name or a non-empty list of names"
        )
    return names


def check_positive_int(owner: str, arg: str, value: Any, *, allow_none: bool = True) -> None:
    """Raise PlanError unless ``value`` is an int >= 1 (or None where allowed)."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PlanError(f"{owner}({arg}={value!r}): {arg} must be an integer >= 1")


def check_choice(owner: str, arg: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise PlanError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise PlanError(f"{owner}({arg}={value!r}): {arg} must be one of {list(choices)}")


def worker_nthreads() -> int | None:
    """The thread count of the Dask worker running this code, or None outside a worker."""
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return None


def worker_offers_gpu() -> bool | None:
    """Whether this Dask worker declares a ``GPU`` resource; None outside a worker."""
    try:
        from distributed import get_worker

        resources = get_worker().state.total_resources
    except (ImportError, ValueError, AttributeError):
        return None
    return float(resources.get("GPU", 0)) > 0


def pick_torch_device(requested: str | None) -> str:
    """The torch device for this actor: ``requested``, else CUDA when this actor holds one.

    An actor "holds" a GPU when CUDA is visible and, inside a Dask worker, the worker
    declares the ``GPU`` resource (``num_gpus=`` actors only go there). A CPU-only worker
    on a GPU machine therefore stays on CPU instead of crowding the GPU's owner.
    """
    import torch

    if requested is not None:
        return requested
    if not torch.cuda.is_available():
        return "cpu"
    return "cpu" if worker_offers_gpu() is False else "cuda"


def limit_torch_threads(device: str, num_threads: int | None) -> None:
    """On CPU, give torch this worker's thread count, so that actors sharing cores do not
    oversubscribe them (two actors with torch's default of all cores each run slower than
    one). ``num_threads`` overrides; outside a worker and without it, torch keeps its own.
    """
    if not str(device).startswith("cpu"):
        return
    import torch

    n = num_threads if num_threads is not None else worker_nthreads()
    if n is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)


TORCH_DTYPES = (None, "float32", "float16", "bfloat16")


def stack_column(values: np.ndarray) -> np.ndarray:
    """A column as one dense array: rows that hold arrays (object dtype) are stacked."""
    if values.dtype == object and len(values) and isinstance(values[0], (np.ndarray, list)):
        return np.stack([np.asarray(v) for v in values])
    return values


def with_outputs(
    batch: Batch, outputs: Mapping[str, np.ndarray], keep: bool | Sequence[str]
) -> Batch:
    """The output batch: the input's columns to keep (all, none, or these), then the new ones."""
    if isinstance(keep, bool):
        out: Batch = dict(batch) if keep else {}
    else:
        out = {name: batch[name] for name in keep if name in batch}
    out.update(outputs)
    return out


def check_keep(owner: str, keep: Any) -> bool | tuple[str, ...]:
    """``keep_input_columns``: a bool, or the names of the input columns to keep."""
    if isinstance(keep, bool):
        return keep
    return as_names(owner, "keep_input_columns", keep)
