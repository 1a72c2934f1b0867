"""Predicates for ``Dataset.filter(expr=...)``, spelled as Ray Data's ``ray.data.expressions``.

>>> from daskinfer.expressions import col
>>> (col("score") >= 0.5) & col("label").is_in(["cat", "dog"])
Expr((score >= 0.5) and (label in ['cat', 'dog']))

This is the predicate part of Ray's API: ``col``, ``lit``, comparisons (``== != < <= >
>=``), ``&``, ``|``, ``~``, unary minus, ``is_null()``, ``is_not_null()``, ``is_in()`` and
``not_in()``. It builds the same tree as the string form (``"score >= 0.5 and label in
['cat', 'dog']"``) and is evaluated the same way (see ``Dataset.filter``). Arithmetic
(``col("a") + 1``), ``alias`` and the ``.str`` / ``.dt`` / ``.list`` namespaces are not
provided: compute such a value in a ``map_batches`` or ``add_column`` stage first, then
filter on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

import pyarrow as pa

from daskinfer._internal.expressions import (
    Check,
    Column,
    Compare,
    Literal,
    Logical,
    Negate,
    Node,
    Not,
    ValueList,
    _is_condition,
    render,
)
from daskinfer.exceptions import PlanError

__all__ = ["Expr", "col", "lit"]

_SCALARS = (bool, int, float, str, bytes, type(None))


class Expr:
    """A column, a constant, or a condition built from them with Python's operators.

    Join conditions with ``&``, ``|`` and ``~`` (Python's ``and``/``or``/``not`` cannot be
    overloaded, and raise here), and wrap each comparison in parentheses: ``&`` binds
    tighter than ``>``.
    """

    __slots__ = ("_node",)

    def __init__(self, node: Node) -> None:
        self._node = node

    def __repr__(self) -> str:
        return f"Expr({render(self._node)})"

    def text(self) -> str:
        """The expression in the string form ``filter(expr=...)`` also reads."""
        return render(self._node)

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
        if isinstance(node, Literal) and isinstance(node.value, (int, float)):
            return Expr(Literal(-node.value))
        if not isinstance(node, (Column, Negate)):
            raise TypeError(f"-{self.text()}: only numbers and columns can be negated")
        return Expr(Negate(node))

    def __bool__(self) -> NoReturn:
        raise TypeError(
            f"{self!r} has no truth value: join conditions with & and |, negate with ~ "
            "(Python's and/or/not cannot be overloaded)"
        )

    # --- not provided ------------------------------------------------------------------
    def _not_provided(self, *_: Any) -> NoReturn:
        raise TypeError(
            "arithmetic on expressions is not provided by daskinfer.expressions (only "
            "predicates are); compute the value in a map_batches or add_column stage, "
            "then filter on it"
        )

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _not_provided
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = _not_provided
    __mod__ = __rmod__ = __pow__ = __rpow__ = _not_provided


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
