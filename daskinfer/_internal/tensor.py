"""A block column of N-D values (embeddings, images, logits) held as one array.

A predictor that returns a ``(rows, 384)`` array of embeddings used to become an object
column of 1024 per-row arrays per block. Measured on the development VM (2 cores), for
1024 x 384 float32: 3.1 ms to serialize into 1,028 frames, 2.3 ms to deserialize, 0.9 ms
to stack back for the numpy format, against microseconds and one frame for the array
itself; and that work runs in the event loop of the worker that holds the accelerator.

``TensorArray`` is a pandas extension array over one ``(rows, *cell_shape)`` numpy array:
it slices, takes and concatenates as that array, pickles as its one buffer, converts to
Arrow as ``fixed_shape_tensor`` (N-D cells) or a list array (1-D cells, as pyarrow made
of the object columns before), and each row reads back as a numpy array, as the object
column's did. It is the same idea as Ray Data's ``TensorArray``.
"""

from __future__ import annotations

import builtins
import numbers
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from pandas.api.extensions import ExtensionArray, ExtensionDtype, register_extension_dtype
from pandas.api.indexers import check_array_indexer

_NAME = re.compile(r"^tensor\[(?P<dtype>[^,\]]+),\s*\((?P<shape>[0-9, ]*)\)\]$")


@register_extension_dtype
class TensorDtype(ExtensionDtype):
    """Rows that are numpy arrays of one ``cell_shape`` and one ``subtype``."""

    _metadata = ("cell_shape", "subtype")
    type = np.ndarray
    kind = "O"

    def __init__(self, cell_shape: tuple[int, ...] = (), subtype: Any = np.float64) -> None:
        self.cell_shape = tuple(int(d) for d in cell_shape)
        self.subtype = np.dtype(subtype)

    @property
    def name(self) -> str:
        shape = ", ".join(str(d) for d in self.cell_shape)
        return f"tensor[{self.subtype},({shape})]"

    @property
    def na_value(self) -> Any:
        return None

    @classmethod
    def construct_array_type(cls) -> builtins.type[TensorArray]:
        return TensorArray

    @classmethod
    def construct_from_string(cls, string: str) -> TensorDtype:
        if not isinstance(string, str):
            raise TypeError(f"'construct_from_string' expects a string, got {type(string)}")
        match = _NAME.match(string)
        if match is None:
            raise TypeError(f"Cannot construct a 'TensorDtype' from '{string}'")
        shape = tuple(int(d) for d in match["shape"].replace(" ", "").split(",") if d)
        return cls(shape, match["dtype"])

    def __repr__(self) -> str:
        return self.name


class TensorArray(ExtensionArray):
    """A column whose rows are arrays of one shape, stored as one ``(rows, *shape)`` array."""

    def __init__(self, data: np.ndarray) -> None:
        data = np.asarray(data)
        if data.ndim < 2:
            raise ValueError(
                f"a TensorArray needs an array of 2 or more dimensions (rows, *cell_shape); "
                f"got shape {data.shape}"
            )
        if data.dtype == object:
            raise ValueError("a TensorArray holds fixed-width values, not Python objects")
        self._data = data
        self._dtype = TensorDtype(data.shape[1:], data.dtype)

    # --- what pandas needs --------------------------------------------------------
    @classmethod
    def _from_sequence(cls, scalars: Any, *, dtype: Any = None, copy: bool = False) -> TensorArray:
        if isinstance(scalars, TensorArray):
            return scalars.copy() if copy else scalars
        cells = [np.asarray(v) for v in scalars]
        subtype = dtype.subtype if isinstance(dtype, TensorDtype) else None
        if not cells:
            shape = dtype.cell_shape if isinstance(dtype, TensorDtype) else (0,)
            return cls(np.empty((0, *shape), dtype=subtype or np.float64))
        return cls(np.stack(cells).astype(subtype, copy=False) if subtype else np.stack(cells))

    @classmethod
    def _from_factorized(cls, values: Any, original: TensorArray) -> TensorArray:
        raise TypeError("a column of arrays (TensorArray) cannot be grouped or factorized")

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, numbers.Integral):
            return self._data[item]
        if isinstance(item, tuple) and len(item) == 1:
            item = item[0]
        if not isinstance(item, slice):
            item = check_array_indexer(self, item)
        return TensorArray(self._data[item])

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(value, TensorArray):
            value = value._data
        if not isinstance(key, (numbers.Integral, slice)):
            key = check_array_indexer(self, key)
        self._data[key] = value

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Any:
        return iter(self._data)

    def __eq__(self, other: object) -> Any:  # type: ignore[override]
        other_data = other._data if isinstance(other, TensorArray) else np.asarray(other)
        equal = self._data == other_data
        return equal.reshape(len(self), -1).all(axis=1)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        # what pandas' to_numpy() and np.asarray(series) see: one array per row, as the
        # object columns of earlier versions held them
        if dtype is not None and np.dtype(dtype) != object:
            return np.asarray(self._data, dtype=dtype)
        cells = np.empty(len(self._data), dtype=object)
        for i in range(len(self._data)):
            cells[i] = self._data[i]
        return cells

    def __arrow_array__(self, type: Any = None) -> pa.Array:  # pyarrow calls it so
        return tensor_to_arrow(self._data)

    @property
    def dtype(self) -> TensorDtype:
        return self._dtype

    @property
    def nbytes(self) -> int:
        return int(self._data.nbytes)

    @property
    def values(self) -> np.ndarray:
        """The rows as one ``(rows, *cell_shape)`` array (no copy)."""
        return self._data

    def isna(self) -> np.ndarray:
        return np.zeros(len(self._data), dtype=bool)

    def take(
        self, indices: Any, *, allow_fill: bool = False, fill_value: Any = None
    ) -> TensorArray:
        indices = np.asarray(indices, dtype=np.intp)
        if allow_fill:
            missing = indices == -1
            if (indices < -1).any():
                raise ValueError(f"invalid take indices {indices[indices < -1][:4]}")
            if missing.any():
                if self._data.dtype.kind not in "fc":
                    raise ValueError(
                        f"a column of {self._data.dtype} arrays has no missing value to "
                        "fill rows that are not there with"
                    )
                out = np.full((len(indices), *self._data.shape[1:]), np.nan, self._data.dtype)
                present = ~missing
                out[present] = self._data[indices[present]]
                return TensorArray(out)
        return TensorArray(self._data[indices])

    def copy(self) -> TensorArray:
        return TensorArray(self._data.copy())

    @classmethod
    def _concat_same_type(cls, to_concat: Sequence[TensorArray]) -> TensorArray:
        return cls(np.concatenate([a._data for a in to_concat]))

    def _values_for_factorize(self) -> Any:
        raise TypeError("a column of arrays (TensorArray) cannot be grouped or factorized")

    def _formatter(self, boxed: bool = False) -> Any:
        return lambda cell: np.array2string(cell, threshold=6, edgeitems=2)


def tensor_to_arrow(data: np.ndarray) -> pa.Array:
    """Rows of ``data`` as Arrow: a list array for 1-D rows, ``fixed_shape_tensor`` for N-D."""
    data = np.ascontiguousarray(data)
    if data.ndim == 2 and data.size < 2**31:  # list offsets are int32
        flat = pa.array(data.reshape(-1))
        offsets = pa.array(np.arange(0, data.size + 1, data.shape[1], dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, flat)
    return fixed_shape_tensor(data)


def fixed_shape_tensor(data: np.ndarray) -> pa.Array:
    """Rows of ``data`` as Arrow's ``fixed_shape_tensor``, with no ``permutation``.

    ``FixedShapeTensorArray.from_numpy_ndarray`` writes an identity permutation into the
    type, which pyarrow itself then refuses to build an empty table of (dask makes one
    for a Parquet file's metadata), and it refuses arrays of no rows; the type without
    it means the same (row-major cells).
    """
    data = np.ascontiguousarray(data)
    cell = [int(d) for d in data.shape[1:]]
    storage = pa.FixedSizeListArray.from_arrays(pa.array(data.reshape(-1)), int(np.prod(cell)))
    tensor_type = pa.fixed_shape_tensor(pa.from_numpy_dtype(data.dtype), cell)
    return pa.ExtensionArray.from_storage(tensor_type, storage)


def _register_with_dask() -> None:
    # dask computes a non-empty stand-in of every column for its metadata; without this a
    # dask DataFrame over blocks with such a column (to_dask) fails on the dtype
    from dask.dataframe.extensions import make_array_nonempty

    @make_array_nonempty.register(TensorDtype)
    def _nonempty(dtype: TensorDtype) -> TensorArray:
        return TensorArray(np.zeros((2, *dtype.cell_shape), dtype=dtype.subtype))


_register_with_dask()
