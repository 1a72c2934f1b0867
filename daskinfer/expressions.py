"""Expressions for ``Dataset.filter(expr=...)`` and ``Dataset.with_column``, spelled as
Ray Data's ``ray.data.expressions``.

>>> from daskinfer.expressions import col
>>> (col("score") >= 0.5) & col("label").is_in(["cat", "dog"])
Expr((score >= 0.5) and (label in ['cat', 'dog']))
>>> (col("price") * col("quantity") + 1).alias("total")
Expr(price * quantity + 1, alias='total')

This is Ray 2.60's expression API without its UDFs: ``col``, ``lit``, comparisons (``==
!= < <= > >=``), ``&``, ``|``, ``~``, ``is_null()``, ``is_not_null()``, ``is_in()``,
``not_in()``; arithmetic (``+ - * / // %``, with Python numbers on either side; ``+`` of
strings joins them); ``alias()``, ``cast()`` (to a ``daskinfer.datatype.DataType``) and
the numeric methods ``ceil floor round trunc ln log10 log2 exp sin cos tan asin acos atan
negate sign abs power``. Beyond Ray, unary minus (``-col("x")``). A condition builds the
same tree as the string form (``"score >= 0.5 and label in ['cat', 'dog']"``) and is
evaluated the same way (see ``Dataset.filter``). Arithmetic follows Ray on Arrow data:
``int / int`` divides integers (see ``daskinfer._internal.expressions``). Not provided:
the ``.str`` / ``.dt`` / ``.list`` / ``.struct`` / ``.map`` / ``.arr`` namespaces, UDFs
(``udf``, ``pyarrow_udf``), ``star``, ``unnest``, ``download``, ``random``, ``uuid`` and
``monotonically_increasing_id``: compute such a value in a ``map_batches`` or
``add_column`` stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np
import pyarrow as pa

from daskinfer._internal.expressions import (
    FUNCTIONS,
    Arithmetic,
    Cast,
    Check,
    Column,
    Compare,
    Function,
    Literal,
    Logical,
    Negate,
    Node,
    Not,
    ValueList,
    _is_condition,
    _is_value,
    render,
)
from daskinfer.datatype import DataType
from daskinfer.exceptions import PlanError

__all__ = ["Expr", "col", "lit"]

_SCALARS = (bool, int, float, str, bytes, type(None))


class Expr:
    """A column, a constant, or a value or condition built from them with Python's operators.

    Join conditions with ``&``, ``|`` and ``~`` (Python's ``and``/``or``/``not`` cannot be
    overloaded, and raise here), and wrap each comparison in parentheses: ``&`` binds
    tighter than ``>``.
    """

    __slots__ = ("_alias", "_node")

    def __init__(self, node: Node, alias: str | None = None) -> None:
        self._node = node
        self._alias = alias

    def __repr__(self) -> str:
        alias = "" if self._alias is None else f", alias={self._alias!r}"
        return f"Expr({render(self._node)}{alias})"

    def text(self) -> str:
        """The expression as Python-like text (a condition: the string form ``filter`` reads)."""
        return render(self._node)

    @property
    def name(self) -> str | None:
        """The name given by ``alias()``, or a bare column's name; else None (as in Ray)."""
        if self._alias is not None:
            return self._alias
        return self._node.name if isinstance(self._node, Column) else None

    def alias(self, name: str) -> Expr:
        """The same expression, named ``name`` (``with_columns``' keys name columns here)."""
        if not isinstance(name, str) or not name:
            raise PlanError(f"alias({name!r}): give the name, a non-empty string")
        return Expr(self._node, name)

    @property
    def node(self) -> Node:
        """The tree (what ``with_column`` evaluates)."""
        return self._node

    def predicate(self) -> Node:
        """The parsed tree, checked to be a condition (what ``filter`` evaluates)."""
        if not _is_condition(self._node):
            raise PlanError(
                f"filter(expr={self!r}): {self.text()!r} is a value, not a condition; "
                "compare it, e.g. col('x') > 0"
            )
        return self._node

    # --- comparisons ---------------------------------------------------------------
    def _compare(self, op: str, other: Any) -> Expr:
        return Expr(Compare(op, self._node, _operand(other, f"{op}")))

    def __eq__(self, other: object) -> Expr:  # type: ignore[override]
        return self._compare("==", other)

    def __ne__(self, other: object) -> Expr:  # type: ignore[override]
        return self._compare("!=", other)

    def __lt__(self, other: Any) -> Expr:
        return self._compare("<", other)

    def __le__(self, other: Any) -> Expr:
        return self._compare("<=", other)

    def __gt__(self, other: Any) -> Expr:
        return self._compare(">", other)

    def __ge__(self, other: Any) -> Expr:
        return self._compare(">=", other)

    __hash__ = None  # type: ignore[assignment]  # == builds an expression

    def is_in(self, values: Sequence[Any] | Expr) -> Expr:
        """Whether the value is one of ``values`` (a list of constants, or ``lit([...])``)."""
        return Expr(Compare("in", self._node, _value_list(values, "is_in")))

    def not_in(self, values: Sequence[Any] | Expr) -> Expr:
        """Whether the value is none of ``values`` (a missing value is kept unless listed)."""
        return Expr(Compare("not in", self._node, _value_list(values, "not_in")))

    def is_null(self) -> Expr:
        """Whether the value is missing (None, NaN, NaT)."""
        return Expr(Check("is_null", self._node))

    def is_not_null(self) -> Expr:
        """Whether the value is present."""
        return Expr(Check("is_valid", self._node))

    # --- logic -----------------------------------------------------------------------
    def _logical(self, op: str, other: Any, symbol: str) -> Expr:
        operands: list[Node] = []
        for node in (self._node, _operand(other, symbol)):
            if not _is_condition(node):
                raise TypeError(f"{symbol} joins conditions; {render(node)!r} is a value")
            # a & b & c is one "and" of three, as the string "a and b and c" parses
            same = isinstance(node, Logical) and node.op == op
            operands.extend(node.operands if isinstance(node, Logical) and same else (node,))
        return Expr(Logical(op, tuple(operands)))

    def __and__(self, other: Any) -> Expr:
        return self._logical("and", other, "&")

    def __rand__(self, other: Any) -> Expr:
        return Expr(_operand(other, "&"))._logical("and", self, "&")

    def __or__(self, other: Any) -> Expr:
        return self._logical("or", other, "|")

    def __ror__(self, other: Any) -> Expr:
        return Expr(_operand(other, "|"))._logical("or", self, "|")

    def __invert__(self) -> Expr:
        if not _is_condition(self._node):
            raise TypeError(f"~ negates a condition; {self.text()!r} is a value (use -x)")
        return Expr(Not(self._node))

    def __neg__(self) -> Expr:
        node = self._node
        if (
            isinstance(node, Literal)
            and isinstance(node.value, (int, float))
            and not isinstance(node.value, bool)
        ):
            return Expr(Literal(-node.value))
        if isinstance(node, Literal) or not _is_value(node):
            raise TypeError(f"-{self.text()}: only numbers, columns and values can be negated")
        return Expr(Negate(node))

    def __bool__(self) -> NoReturn:
        raise TypeError(
            f"{self!r} has no truth value: join conditions with & and |, negate with ~ "
            "(Python's and/or/not cannot be overloaded)"
        )

    # --- arithmetic ------------------------------------------------------------------
    def _arithmetic(self, op: str, other: Any, reflected: bool = False) -> Expr:
        other_node = _operand(other, op)
        left, right = (other_node, self._node) if reflected else (self._node, other_node)
        for node in (left, right):
            if not _is_value(node):
                raise TypeError(
                    f"{op} takes numbers (or strings, for +); {render(node)!r} is a "
                    "condition: compute with values, then compare"
                )
            if op != "+" and isinstance(node, Literal) and isinstance(node.value, (str, bytes)):
                raise TypeError(f"{op} takes numbers; {render(node)!r} is text")
        return Expr(Arithmetic(op, left, right))

    def __add__(self, other: Any) -> Expr:
        return self._arithmetic("+", other)

    def __radd__(self, other: Any) -> Expr:
        return self._arithmetic("+", other, reflected=True)

    def __sub__(self, other: Any) -> Expr:
        return self._arithmetic("-", other)

    def __rsub__(self, other: Any) -> Expr:
        return self._arithmetic("-", other, reflected=True)

    def __mul__(self, other: Any) -> Expr:
        return self._arithmetic("*", other)

    def __rmul__(self, other: Any) -> Expr:
        return self._arithmetic("*", other, reflected=True)

    def __truediv__(self, other: Any) -> Expr:
        return self._arithmetic("/", other)

    def __rtruediv__(self, other: Any) -> Expr:
        return self._arithmetic("/", other, reflected=True)

    def __floordiv__(self, other: Any) -> Expr:
        return self._arithmetic("//", other)

    def __rfloordiv__(self, other: Any) -> Expr:
        return self._arithmetic("//", other, reflected=True)

    def __mod__(self, other: Any) -> Expr:
        return self._arithmetic("%", other)

    def __rmod__(self, other: Any) -> Expr:
        return self._arithmetic("%", other, reflected=True)

    def __pow__(self, other: Any) -> NoReturn:
        raise TypeError(f"{self.text()} ** ...: Ray's expressions have no **; use .power(n)")

    __rpow__ = __pow__

    # --- Ray's numeric methods (one pyarrow.compute function each) --------------------
    def _function(self, fn: str, *args: Any) -> Expr:
        operands = (self._node, *(_operand(a, f"{fn}()") for a in args))
        for node in operands:
            if not _is_value(node) or (isinstance(node, Literal) and isinstance(node.value, str)):
                raise TypeError(f"{fn}() takes numbers; {render(node)!r} is not one")
        assert fn in FUNCTIONS
        return Expr(Function(fn, operands))

    def ceil(self) -> Expr:
        """Round up to a whole number."""
        return self._function("ceil")

    def floor(self) -> Expr:
        """Round down to a whole number."""
        return self._function("floor")

    def round(self) -> Expr:
        """Round to the nearest whole number (halves to even, Arrow's default, as in Ray)."""
        return self._function("round")

    def trunc(self) -> Expr:
        """Round toward zero."""
        return self._function("trunc")

    def ln(self) -> Expr:
        """The natural logarithm."""
        return self._function("ln")

    def log10(self) -> Expr:
        """The base-10 logarithm."""
        return self._function("log10")

    def log2(self) -> Expr:
        """The base-2 logarithm."""
        return self._function("log2")

    def exp(self) -> Expr:
        """e to the power of the value."""
        return self._function("exp")

    def sin(self) -> Expr:
        """The sine (radians)."""
        return self._function("sin")

    def cos(self) -> Expr:
        """The cosine (radians)."""
        return self._function("cos")

    def tan(self) -> Expr:
        """The tangent (radians)."""
        return self._function("tan")

    def asin(self) -> Expr:
        """The arcsine, in radians."""
        return self._function("asin")

    def acos(self) -> Expr:
        """The arccosine, in radians."""
        return self._function("acos")

    def atan(self) -> Expr:
        """The arctangent, in radians."""
        return self._function("atan")

    def negate(self) -> Expr:
        """The value times -1 (an integer overflow fails, as in Ray)."""
        return self._function("negate")

    def sign(self) -> Expr:
        """-1, 0 or 1."""
        return self._function("sign")

    def abs(self) -> Expr:
        """The absolute value (an integer overflow fails, as in Ray)."""
        return self._function("abs")

    def power(self, exponent: Any) -> Expr:
        """The value to the power ``exponent`` (a number or an expression)."""
        return self._function("power", exponent)

    def cast(self, target_type: DataType | pa.DataType, *, safe: bool = True) -> Expr:
        """The value converted to ``target_type`` (``DataType.float64()``, ...).

        ``safe=True`` (the default, as in Ray) fails on an overflow or a lossy
        conversion; ``safe=False`` allows them. A ``pyarrow.DataType`` is taken too.
        """
        if isinstance(target_type, DataType):
            target_type = target_type.to_arrow_dtype()
        if not isinstance(target_type, pa.DataType):
            raise PlanError(
                f"cast({target_type!r}): give a daskinfer.datatype.DataType, e.g. "
                "DataType.float64() (or a pyarrow type, pa.float64())"
            )
        if not isinstance(safe, bool):
            raise PlanError(f"cast(..., safe={safe!r}): use True or False")
        if isinstance(self._node, ValueList):
            raise TypeError(f"cast: {self.text()} is a list; cast a column or a value")
        return Expr(Cast(self._node, target_type, safe))


def col(name: str) -> Expr:
    """The column ``name``."""
    if not isinstance(name, str) or not name:
        raise PlanError(f"col({name!r}): give the column's name, a non-empty string")
    return Expr(Column(name))


def lit(value: Any) -> Expr:
    """A constant: a number, string, bytes, bool or None; or a list, for ``is_in``."""
    if isinstance(value, (list, tuple)):
        return Expr(_value_list(value, "lit"))
    if not isinstance(value, _SCALARS):
        raise PlanError(
            f"lit({value!r}): a constant is a number, string, bytes, bool or None "
            f"(not {type(value).__name__})"
        )
    return Expr(Literal(value))


def _operand(value: Any, op: str) -> Node:
    if isinstance(value, np.generic):
        value = value.item()  # np.float32(2.0), np.int64(3): the Python number
    if isinstance(value, Expr):
        node = value._node
    elif isinstance(value, _SCALARS):
        node = Literal(value)
    else:
        raise TypeError(
            f"cannot use {value!r} ({type(value).__name__}) with {op}: give a column (col), "
            "a constant, or a list to is_in"
        )
    if isinstance(node, ValueList):
        raise TypeError(f"a list cannot be used with {op}; use .is_in([...])")
    return node


def _value_list(values: Any, call: str) -> ValueList:
    if isinstance(values, Expr) and isinstance(values._node, ValueList):
        return values._node
    if not isinstance(values, (list, tuple)):
        raise PlanError(f"{call}({values!r}): give a list of constants, e.g. ['a', 'b']")
    items = [
        v._node.value if isinstance(v, Expr) and isinstance(v._node, Literal) else v for v in values
    ]
    if not all(isinstance(v, _SCALARS) for v in items):
        raise PlanError(f"{call}({values!r}): a list holds constants only")
    try:
        pa.array(items)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        raise PlanError(
            f"{call}({values!r}): the list mixes types Arrow cannot hold in one list; give "
            "values of one type"
        ) from None
    return ValueList(tuple(items))
