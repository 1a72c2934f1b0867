"""Data types for ``Expr.cast``, spelled as Ray Data's ``ray.data.datatype.DataType``.

>>> from daskinfer.datatype import DataType
>>> DataType.float64()
DataType(double)

Only Arrow-backed types, which are the ones Ray's ``cast`` takes: the factories
``int8``..``int64``, ``uint8``..``uint64``, ``float32``, ``float64``, ``string``, ``bool``,
``binary``, and ``DataType.from_arrow(pa_type)`` for any other.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from daskinfer.exceptions import PlanError

__all__ = ["DataType"]


class DataType:
    """An Arrow type (``to_arrow_dtype()``), built by the factories as in Ray."""

    __slots__ = ("_arrow",)

    def __init__(self, arrow_type: pa.DataType) -> None:
        if not isinstance(arrow_type, pa.DataType):
            raise PlanError(
                f"DataType({arrow_type!r}): give a pyarrow type (pa.int64()), or use a "
                "factory such as DataType.int64()"
            )
        self._arrow = arrow_type

    def __repr__(self) -> str:
        return f"DataType({self._arrow})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DataType) and self._arrow == other._arrow

    def __hash__(self) -> int:
        return hash(self._arrow)

    def __reduce__(self) -> tuple[Any, ...]:
        return (DataType, (self._arrow,))

    def to_arrow_dtype(self) -> pa.DataType:
        """The Arrow type."""
        return self._arrow

    @classmethod
    def from_arrow(cls, arrow_type: pa.DataType) -> DataType:
        """The DataType of an Arrow type."""
        return cls(arrow_type)

    @classmethod
    def int8(cls) -> DataType:
        """An 8-bit signed integer."""
        return cls(pa.int8())

    @classmethod
    def int16(cls) -> DataType:
        """A 16-bit signed integer."""
        return cls(pa.int16())

    @classmethod
    def int32(cls) -> DataType:
        """A 32-bit signed integer."""
        return cls(pa.int32())

    @classmethod
    def int64(cls) -> DataType:
        """A 64-bit signed integer."""
        return cls(pa.int64())

    @classmethod
    def uint8(cls) -> DataType:
        """An 8-bit unsigned integer."""
        return cls(pa.uint8())

    @classmethod
    def uint16(cls) -> DataType:
        """A 16-bit unsigned integer."""
        return cls(pa.uint16())

    @classmethod
    def uint32(cls) -> DataType:
        """A 32-bit unsigned integer."""
        return cls(pa.uint32())

    @classmethod
    def uint64(cls) -> DataType:
        """A 64-bit unsigned integer."""
        return cls(pa.uint64())

    @classmethod
    def float32(cls) -> DataType:
        """A 32-bit floating point number."""
        return cls(pa.float32())

    @classmethod
    def float64(cls) -> DataType:
        """A 64-bit floating point number."""
        return cls(pa.float64())

    @classmethod
    def string(cls) -> DataType:
        """A variable-length string."""
        return cls(pa.string())

    @classmethod
    def bool(cls) -> DataType:
        """A boolean."""
        return cls(pa.bool_())

    @classmethod
    def binary(cls) -> DataType:
        """Variable-length bytes."""
        return cls(pa.binary())
