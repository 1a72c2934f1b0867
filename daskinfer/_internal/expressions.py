"""Expressions of ``filter(expr=...)`` and ``with_column``: built on the client, run on workers.

Ray Data 2.60 takes a predicate as a Python-syntax string (``"x > 1 and s in ['a',
'b']"``, parsed by its ``ExpressionEvaluator.parse_native_expression``) or as an
expression object (``ray.data.expressions``; here ``daskinfer.expressions``). Both become
the small tree below: plain frozen dataclasses, so a stage's predicate pickles to the
workers as data and is checked (columns, syntax, unsupported constructs) before any work.
Values (``col("a") + 1``, ``col("x").round()``, ``cast``) exist only as expression objects:
Ray's string grammar has no arithmetic.

On a block the tree is evaluated with ``pyarrow.compute`` over the Arrow form of the
columns it names (only those), with Arrow's rules, which Ray applies to Arrow blocks
(Parquet and most readers): a missing value makes a comparison null (unknown), ``and`` /
``or`` are Kleene (``null and False`` is False), ``not null`` stays null, and a row whose
result is null is dropped. A block here is a pandas DataFrame, whose only notion of a
missing value is pandas' (``None``, ``NaN``, ``NaT``, ``pd.NA``): all of them are null in
the Arrow form, so ``is_null(x)`` holds for them and ``is_nan(x)`` holds for a float
column's missing values (pandas cannot tell a NaN from a null there).

Arithmetic is Ray's on Arrow blocks (``_ARROW_EXPR_OPS_MAP`` of Ray 2.60), where an
Arrow kernel's result type is the answer: ``int / int`` divides integers (truncating,
``-7 / 2 == -3``), ``//`` is ``floor(a / b)`` and ``%`` is ``a - floor(a / b) * b``, both
as floats over that division (``-7 // 2 == -3.0``, ``-7 % 2 == -1.0``), an integer
division by zero fails, a float one gives inf or NaN, a missing value gives a missing
value, and ``+`` of strings joins them. (Ray on pandas blocks, as from ``from_pandas``,
uses pandas' operators instead.) An integer column with missing values is a float column
in a pandas block, so it divides as floats here.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from daskinfer.exceptions import PlanError

# --------------------------------------------------------------------------- the tree


@dataclasses.dataclass(frozen=True)
class Column:
    """A column's values (``x``; ``a.b`` names the column ``"a.b"``, as in Ray)."""

    name: str


@dataclasses.dataclass(frozen=True)
class Literal:
    """One constant: a number, a string, bytes, True/False or None (null)."""

    value: Any


@dataclasses.dataclass(frozen=True)
class ValueList:
    """A list of constants, the right side of ``in`` / ``not in``."""

    values: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Compare:
    """``left <op> right``: ``== != < <= > >=``, or ``in`` / ``not in`` a ``ValueList``."""

    op: str
    left: Node
    right: Node


@dataclasses.dataclass(frozen=True)
class Logical:
    """``and`` / ``or`` of two or more conditions (Kleene logic)."""

    op: str
    operands: tuple[Node, ...]


@dataclasses.dataclass(frozen=True)
class Not:
    """``not condition`` (null stays null)."""

    operand: Node


@dataclasses.dataclass(frozen=True)
class Negate:
    """``-value`` of a column (a negative constant is folded into its ``Literal``)."""

    operand: Node


@dataclasses.dataclass(frozen=True)
class Arithmetic:
    """``left <op> right`` for ``+ - * / // %`` (Ray's meaning on Arrow data, see above)."""

    op: str
    left: Node
    right: Node


@dataclasses.dataclass(frozen=True)
class Function:
    """A numeric function of Ray's ``Expr`` (``round()``, ``abs()``, ``power(e)`` ...).

    ``fn`` is a key of ``FUNCTIONS``: a name, so that the node stays plain data.
    """

    fn: str
    operands: tuple[Node, ...]


@dataclasses.dataclass(frozen=True)
class Cast:
    """``value.cast(type)``: Arrow's cast; ``safe`` refuses lossy conversions, as in Ray."""

    operand: Node
    to: pa.DataType
    safe: bool = True


@dataclasses.dataclass(frozen=True)
class Check:
    """``is_null(v)``, ``is_valid(v)`` (Ray's ``is_not_null``) or ``is_nan(v)``."""

    fn: str
    operand: Node


Node = (
    Column
    | Literal
    | ValueList
    | Compare
    | Logical
    | Not
    | Negate
    | Arithmetic
    | Function
    | Cast
    | Check
)

COMPARISONS = ("==", "!=", "<", "<=", ">", ">=")
# Ray 2.60's Expr methods that are one pyarrow.compute function each (the same functions
# Ray calls): method name -> function name
FUNCTIONS = {
    "ceil": "ceil",
    "floor": "floor",
    "round": "round",
    "trunc": "trunc",
    "ln": "ln",
    "log10": "log10",
    "log2": "log2",
    "exp": "exp",
    "sin": "sin",
    "cos": "cos",
    "tan": "tan",
    "asin": "asin",
    "acos": "acos",
    "atan": "atan",
    "negate": "negate_checked",
    "sign": "sign",
    "abs": "abs_checked",
    "power": "power",
}
CHECKS = ("is_null", "is_valid", "is_nan")
_SCALAR_TYPES = (bool, int, float, str, bytes, type(None))


def _is_condition(node: Node) -> bool:
    """Whether ``node`` can be a filter's condition (or an operand of and/or/not).

    A column may hold booleans (checked on the block); other values cannot.
    """
    if isinstance(node, Literal):
        return node.value is None or isinstance(node.value, bool)
    if isinstance(node, Cast):
        return bool(pa.types.is_boolean(node.to))
    return not isinstance(node, (ValueList, Negate, Arithmetic, Function))


def _is_value(node: Node) -> bool:
    """Whether ``node`` can be an operand of arithmetic or a numeric function.

    A column may hold numbers (checked on the block), and None is a missing number;
    conditions and lists cannot.
    """
    if isinstance(node, Literal):
        return not isinstance(node.value, bool)
    if isinstance(node, Column):
        return True
    return not isinstance(node, ValueList) and not _is_condition(node)


def render(node: Node) -> str:
    """The node as Python-syntax text (what the parser reads back to the same tree)."""
    if isinstance(node, Column):
        return node.name
    if isinstance(node, Literal):
        return repr(node.value)
    if isinstance(node, ValueList):
        return repr(list(node.values))
    if isinstance(node, Compare):
        return f"{_operand_text(node.left)} {node.op} {_operand_text(node.right)}"
    if isinstance(node, Logical):
        return f" {node.op} ".join(_operand_text(o) for o in node.operands)
    if isinstance(node, Not):
        return f"not {_operand_text(node.operand)}"
    if isinstance(node, Negate):
        operand = render(node.operand)
        return f"-({operand})" if isinstance(node.operand, Arithmetic) else f"-{operand}"
    if isinstance(node, Arithmetic):
        left, right = _term_text(node.left, node.op, False), _term_text(node.right, node.op, True)
        return f"{left} {node.op} {right}"
    if isinstance(node, Function):
        return f"{node.fn}({', '.join(render(o) for o in node.operands)})"
    if isinstance(node, Cast):
        return f"cast({render(node.operand)}, {node.to}{'' if node.safe else ', safe=False'})"
    return f"{node.fn}({render(node.operand)})"


def _operand_text(node: Node) -> str:
    text = render(node)
    return f"({text})" if isinstance(node, (Compare, Logical, Not)) else text


def _term_text(node: Node, op: str, right: bool) -> str:
    """An operand of ``op``, in parentheses where Python's precedence needs them."""
    text = _operand_text(node)
    if isinstance(node, Arithmetic):
        rank, outer = _RANK[node.op], _RANK[op]
        if rank < outer or (rank == outer and right):
            return f"({text})"
    return text


_RANK = {"+": 1, "-": 1, "*": 2, "/": 2, "//": 2, "%": 2}


def columns_of(node: Node) -> list[str]:
    """The columns ``node`` reads, in order of first appearance."""
    return list(dict.fromkeys(n.name for n in _walk(node) if isinstance(n, Column)))


def _walk(node: Node) -> Iterator[Node]:
    yield node
    if isinstance(node, Compare):
        yield from _walk(node.left)
        yield from _walk(node.right)
    elif isinstance(node, Logical):
        for operand in node.operands:
            yield from _walk(operand)
    elif isinstance(node, Arithmetic):
        yield from _walk(node.left)
        yield from _walk(node.right)
    elif isinstance(node, Function):
        for operand in node.operands:
            yield from _walk(operand)
    elif isinstance(node, (Not, Negate, Check, Cast)):
        yield from _walk(node.operand)


# --------------------------------------------------------------------------- parsing

_EXAMPLE = "\"x > 1 and s in ['a', 'b']\""


class _Refused(Exception):
    """A construct the grammar does not take; the parser turns it into a PlanError."""


def parse_predicate(text: str, call: str = "filter") -> Node:
    """Parse Ray Data's string predicate grammar into a tree, or raise ``PlanError``.

    The grammar is Ray 2.60's (``_ConvertToNativeExpressionVisitor``): column names
    (dotted names are one column, ``a.b``), constants, lists of constants, one
    comparison per pair (``== != < <= > >= in``, ``not in``), ``and`` / ``or`` /
    ``not``, unary minus, and the functions ``is_null``, ``is_valid`` (or
    ``is_not_null``), ``is_nan`` and ``is_in(x, [...])``. Beyond Ray, lists may hold
    negative numbers and be written as tuples, and ``x in (1, 2)`` works too.
    """
    where = f"{call}(expr={text!r})"
    if not text.strip():
        raise PlanError(f"{where}: the expression is empty; write a condition such as {_EXAMPLE}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise PlanError(
            f"{where} is not valid Python syntax ({exc.msg}); write a condition such as "
            f"{_EXAMPLE} (strings in quotes, == for equality)"
        ) from None
    try:
        node = _Parser().visit(tree.body)
    except _Refused as exc:
        raise PlanError(f"{where}: {exc}") from None
    if isinstance(node, ValueList):
        raise PlanError(f"{where}: a list is not a condition; use it with in: x in [1, 2]")
    if not _is_condition(node):
        raise PlanError(
            f"{where}: {render(node)!r} is a value, not a condition; compare it, e.g. "
            f"{render(node)} > 0"
        )
    return node


class _Parser:
    """Python AST -> tree, refusing (``_Refused``) what Ray's grammar does not have."""

    def visit(self, node: ast.AST) -> Node:
        method: Callable[[Any], Node] | None = getattr(self, f"visit_{type(node).__name__}", None)
        if method is None:
            raise _Refused(
                f"{ast.unparse(node)!r} ({type(node).__name__}) is not part of Ray Data's "
                "string expressions; use comparisons, and/or/not, lists with `in`, and "
                "is_null/is_valid/is_nan/is_in"
            )
        return method(node)

    def visit_Name(self, node: ast.Name) -> Node:
        return Column(node.id)

    def visit_BinOp(self, node: ast.BinOp) -> Node:
        raise _Refused(
            f"{ast.unparse(node)!r} (arithmetic) is not part of Ray Data's string "
            "expressions (Ray's parser refuses it too); build the condition with "
            "daskinfer.expressions.col instead: col('x') + 1 > 2"
        )

    def visit_Attribute(self, node: ast.Attribute) -> Node:
        base = self.visit(node.value)
        if not isinstance(base, Column):
            raise _Refused(f"{ast.unparse(node)!r}: only column names may be dotted (a.b)")
        return Column(f"{base.name}.{node.attr}")

    def visit_Constant(self, node: ast.Constant) -> Node:
        if not isinstance(node.value, _SCALAR_TYPES):
            raise _Refused(f"the constant {node.value!r} is not a number, string, bool or None")
        return Literal(node.value)

    def visit_List(self, node: ast.List | ast.Tuple) -> Node:
        values = []
        for element in node.elts:
            item = self.visit(element)
            if not isinstance(item, Literal):
                raise _Refused(
                    f"the list {ast.unparse(node)} holds {ast.unparse(element)!r}; lists hold "
                    "constants only (as in Ray)"
                )
            values.append(item.value)
        try:
            pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            raise _Refused(
                f"the list {ast.unparse(node)} mixes types Arrow cannot hold in one list; "
                "give values of one type (numbers, or strings)"
            ) from None
        return ValueList(tuple(values))

    visit_Tuple = visit_List

    def visit_UnaryOp(self, node: ast.UnaryOp) -> Node:
        operand = self.visit(node.operand)
        if isinstance(node.op, ast.Not):
            if not _is_condition(operand):
                raise _Refused(f"`not` needs a condition; {ast.unparse(node.operand)!r} is a value")
            return Not(operand)
        if isinstance(node.op, ast.USub):
            if isinstance(operand, Literal):
                if isinstance(operand.value, (int, float)) and not isinstance(operand.value, bool):
                    return Literal(-operand.value)
                raise _Refused(f"{ast.unparse(node)!r}: only numbers can be negated")
            if isinstance(operand, ValueList) or (
                _is_condition(operand) and not isinstance(operand, Column)
            ):
                raise _Refused(f"{ast.unparse(node)!r}: only numbers and columns can be negated")
            return Negate(operand)
        hint = "; use `not` for a negation" if isinstance(node.op, ast.Invert) else ""
        raise _Refused(f"the operator in {ast.unparse(node)!r} is not supported{hint}")

    def visit_BoolOp(self, node: ast.BoolOp) -> Node:
        op = "and" if isinstance(node.op, ast.And) else "or"
        operands = tuple(self.visit(v) for v in node.values)
        for source, operand in zip(node.values, operands, strict=True):
            if not _is_condition(operand):
                raise _Refused(f"`{op}` joins conditions; {ast.unparse(source)!r} is a value")
        return Logical(op, operands)

    _OPS: dict[type, str] = {  # noqa: RUF012  # read-only table
        ast.Eq: "==",
        ast.NotEq: "!=",
        ast.Lt: "<",
        ast.LtE: "<=",
        ast.Gt: ">",
        ast.GtE: ">=",
        ast.In: "in",
        ast.NotIn: "not in",
    }

    def visit_Compare(self, node: ast.Compare) -> Node:
        text = ast.unparse(node)
        if len(node.ops) != 1:
            raise _Refused(
                f"{text!r} chains comparisons, which Ray's grammar does not take; "
                "join them with and: 'a < x and x < b'"
            )
        op = self._OPS.get(type(node.ops[0]))
        if op is None:
            hint = " (for None, use is_null(x) or is_valid(x))" if "is" in text else ""
            raise _Refused(f"the comparison in {text!r} is not supported{hint}")
        return self._compare(op, node.left, node.comparators[0], text)

    def _compare(self, op: str, left_ast: ast.AST, right_ast: ast.AST, text: str) -> Node:
        left, right = self.visit(left_ast), self.visit(right_ast)
        if op in ("in", "not in"):
            if not isinstance(right, ValueList):
                raise _Refused(f"{text!r}: `{op}` takes a list of constants, e.g. x in [1, 2]")
            if isinstance(left, ValueList):
                raise _Refused(f"{text!r}: the left side of `{op}` must be a value, not a list")
        elif isinstance(left, ValueList) or isinstance(right, ValueList):
            raise _Refused(f"{text!r}: a list can only follow `in` or `not in`")
        return Compare(op, left, right)

    def visit_Call(self, node: ast.Call) -> Node:
        name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
        if name in ("random", "uuid"):
            raise _Refused(
                f"{name}() is not supported in string expressions (as in Ray); filter on "
                "such a column computed by a map_batches stage instead"
            )
        name = "is_valid" if name == "is_not_null" else name
        wanted = 2 if name == "is_in" else 1
        if name not in (*CHECKS, "is_in"):
            raise _Refused(
                f"unsupported function {name}(); the functions are is_null, is_valid "
                "(or is_not_null), is_nan and is_in"
            )
        if node.keywords or len(node.args) != wanted:
            raise _Refused(f"{name}() takes exactly {wanted} positional argument(s)")
        if name == "is_in":
            return self._compare("in", node.args[0], node.args[1], ast.unparse(node))
        operand = self.visit(node.args[0])
        if isinstance(operand, ValueList):
            raise _Refused(f"{name}() takes a column or a value, not a list")
        return Check(name, operand)


# --------------------------------------------------------------------------- evaluation


class PredicateError(TypeError):
    """An expression cannot be evaluated on a block (a missing column, mismatched types)."""


def evaluate(node: Node, block: pd.DataFrame) -> np.ndarray:
    """A boolean row mask of ``block``: True where ``node`` holds (null counts as False)."""
    result = _Evaluator(block).eval(node)
    if isinstance(result, pa.Scalar):
        if not (pa.types.is_boolean(result.type) or pa.types.is_null(result.type)):
            raise PredicateError(f"{render(node)!r} gives a {result.type} value, not a condition")
        return np.full(len(block), result.as_py() is True)
    if not pa.types.is_boolean(result.type):
        raise PredicateError(
            f"{render(node)!r} gives {result.type} values, not booleans; compare it, e.g. "
            f"{render(node)} > 0"
        )
    mask = pc.fill_null(result, False).to_numpy(zero_copy_only=False)
    return np.asarray(mask, dtype=bool)


Value: TypeAlias = Any  # a pyarrow Array, ChunkedArray or Scalar (pyarrow is untyped)


def evaluate_values(nodes: Sequence[Node], block: pd.DataFrame) -> list[Value]:
    """The values of ``nodes`` on ``block``: Arrow arrays, or a scalar for a constant.

    All are computed from the block as given (a column is converted to Arrow once,
    however many expressions read it).
    """
    evaluator = _Evaluator(block)
    return [evaluator.eval(node) for node in nodes]


_COMPARE: dict[str, Callable[..., Any]] = {
    "==": pc.equal,
    "!=": pc.not_equal,
    "<": pc.less,
    "<=": pc.less_equal,
    ">": pc.greater,
    ">=": pc.greater_equal,
}
_ARROW_ERRORS = (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError)


class _Evaluator:
    def __init__(self, block: pd.DataFrame) -> None:
        self.block = block
        self.columns: dict[str, pa.Array | pa.ChunkedArray] = {}  # converted once each

    def column(self, name: str) -> pa.Array | pa.ChunkedArray:
        if name not in self.columns:
            self.columns[name] = self._convert(name)
        return self.columns[name]

    def _convert(self, name: str) -> pa.Array | pa.ChunkedArray:
        if name not in self.block.columns:
            raise PredicateError(
                f"column {name!r} is not in the block; its columns are {list(self.block.columns)}"
            )
        series = self.block[name]
        try:
            # from_pandas: NaN / None / NaT become null, as pandas counts them missing
            return pa.Array.from_pandas(series)
        except (*_ARROW_ERRORS, TypeError, ValueError) as exc:
            raise PredicateError(
                f"column {name!r} ({series.dtype}) cannot be used in a condition: {exc}"
            ) from None

    def eval(self, node: Node) -> Value:
        if isinstance(node, Column):
            return self.column(node.name)
        if isinstance(node, Literal):
            return pa.scalar(node.value)
        if isinstance(node, Compare):
            return self._compare(node)
        if isinstance(node, Logical):
            combine = pc.and_kleene if node.op == "and" else pc.or_kleene
            return functools.reduce(combine, [self._condition(o, node.op) for o in node.operands])
        if isinstance(node, Not):
            return pc.invert(self._condition(node.operand, "not"))
        if isinstance(node, Negate):
            value = self.eval(node.operand)
            try:
                return pc.negate(value)
            except _ARROW_ERRORS:
                raise PredicateError(
                    f"{render(node)!r}: {_type(value)} values cannot be negated"
                ) from None
        if isinstance(node, Arithmetic):
            return self._arithmetic(node)
        if isinstance(node, Function):
            return self._function(node)
        if isinstance(node, Cast):
            return self._cast(node)
        if isinstance(node, Check):
            return self._check(node)
        raise PredicateError(f"{render(node)!r} is not a value")  # a ValueList alone

    def _arithmetic(self, node: Arithmetic) -> Value:
        left, right = _decoded(self.eval(node.left)), _decoded(self.eval(node.right))
        try:
            if node.op == "+" and (_is_text(left) or _is_text(right)):
                return _concatenate(left, right, node)
            return _ARITHMETIC[node.op](left, right)
        except pa.ArrowInvalid as exc:
            if "divide by zero" not in str(exc):
                raise PredicateError(f"{render(node)!r}: {exc}") from None
            raise PredicateError(
                f"{render(node)!r}: integer division by zero, which fails as in Ray; for "
                "inf/NaN, divide floats: col('a').cast(DataType.float64()) / col('b')"
            ) from None
        except _ARROW_ERRORS:
            raise PredicateError(
                f"{render(node)!r}: cannot apply {node.op} to {_type(left)} and {_type(right)}"
            ) from None

    def _function(self, node: Function) -> Value:
        values = [_decoded(self.eval(o)) for o in node.operands]
        try:
            return getattr(pc, FUNCTIONS[node.fn])(*values)
        except _ARROW_ERRORS as exc:
            kinds = " and ".join(_type(v) for v in values)
            raise PredicateError(f"{render(node)!r}: {node.fn}() of {kinds}: {exc}") from None

    def _cast(self, node: Cast) -> Value:
        value = self.eval(node.operand)
        try:
            return pc.cast(value, node.to, safe=node.safe)
        except _ARROW_ERRORS as exc:
            hint = "; cast(..., safe=False) allows lossy conversions" if node.safe else ""
            raise PredicateError(f"{render(node)!r}: {exc}{hint}") from None

    def _condition(self, node: Node, op: str) -> Value:
        value = self.eval(node)
        if pa.types.is_null(value.type):
            return value.cast(pa.bool_())
        if not pa.types.is_boolean(value.type):
            raise PredicateError(
                f"`{op}` takes conditions; {render(node)!r} gives {value.type} values"
            )
        return value

    def _compare(self, node: Compare) -> Value:
        left = self.eval(node.left)
        if isinstance(node.right, ValueList):
            found = self._is_in(left, node.right.values, node)
            return pc.invert(found) if node.op == "not in" else found
        right = self.eval(node.right)
        left, right = _as_time(left, right), _as_time(right, left)
        try:
            return _COMPARE[node.op](left, right)
        except _ARROW_ERRORS:
            raise PredicateError(
                f"{render(node)!r}: cannot compare {_type(left)} with {_type(right)}"
            ) from None

    def _is_in(self, left: Value, values: tuple[Any, ...], node: Compare) -> Value:
        if not values:
            return pa.scalar(False)
        if pa.types.is_dictionary(left.type):
            left = left.cast(left.type.value_type)
        value_set = pa.array(values)
        if pa.types.is_null(left.type):
            # a column of nulls only (all None): nulls of the list's type
            left = left.cast(value_set.type)
        elif value_set.type != left.type:
            try:
                value_set = value_set.cast(left.type)
            except _ARROW_ERRORS:
                pass  # Arrow may still match them (ints against floats); else refused below
        scalar = isinstance(left, pa.Scalar)
        try:
            found = pc.is_in(pa.array([left.as_py()], left.type) if scalar else left, value_set)
        except _ARROW_ERRORS:
            raise PredicateError(
                f"{render(node)!r}: cannot look up {_type(left)} values in a list of "
                f"{value_set.type}"
            ) from None
        return found[0] if scalar else found

    def _check(self, node: Check) -> Value:
        value = self.eval(node.operand)
        if node.fn == "is_null":
            return pc.is_null(value)
        if node.fn == "is_valid":
            return pc.is_valid(value)
        # is_nan: NaN is missing in pandas, so a float column's NaN arrives here as null;
        # for other types nothing is NaN (Ray: ``x != x``, null or False there)
        if not pa.types.is_floating(value.type):
            return pa.scalar(False)
        return pc.or_kleene(pc.is_null(value), pc.fill_null(pc.is_nan(value), False))


def _floor_divide(left: Value, right: Value) -> Value:
    return pc.floor(pc.divide(left, right))


def _modulo(left: Value, right: Value) -> Value:
    return pc.subtract(left, pc.multiply(_floor_divide(left, right), right))


# Ray 2.60's operators on Arrow blocks (``_ARROW_EXPR_OPS_MAP``), so that each result,
# and its type, is Ray's
_ARITHMETIC: dict[str, Callable[..., Any]] = {
    "+": pc.add,
    "-": pc.subtract,
    "*": pc.multiply,
    "/": pc.divide,
    "//": _floor_divide,
    "%": _modulo,
}


def _decoded(value: Value) -> Value:
    """A dictionary-encoded value (a pandas Categorical) as its plain values."""
    if pa.types.is_dictionary(value.type):
        return value.cast(value.type.value_type)
    return value


def _is_text(value: Value) -> bool:
    return bool(pa.types.is_string(value.type) or pa.types.is_large_string(value.type))


def _concatenate(left: Value, right: Value, node: Arithmetic) -> Value:
    """``+`` of strings joins them, as Ray's ``_pa_add_or_concat`` (a missing one: missing)."""
    if not (_is_text(left) and _is_text(right)):
        raise PredicateError(
            f"{render(node)!r}: + joins two strings, not {_type(left)} and {_type(right)}; "
            "cast the other first: .cast(DataType.string())"
        )
    # one string type for both (pandas' strings are large_string; a constant is string)
    text = pa.large_string()
    return pc.binary_join_element_wise(left.cast(text), right.cast(text), pa.scalar("", text))


def _type(value: Value) -> str:
    kind = "a constant" if isinstance(value, pa.Scalar) else "a column"
    return f"{kind} of type {value.type}"


def _as_time(value: Value, other: Value) -> Value:
    """A string constant compared with a timestamp or date column, as that type.

    Arrow alone refuses ``timestamp > string``; pandas (and Ray on pandas blocks) reads
    the string as a time, which is what ``"ts >= '2024-01-01'"`` means.
    """
    if not (isinstance(value, pa.Scalar) and pa.types.is_string(value.type)):
        return value
    target = other.type
    if not (pa.types.is_timestamp(target) or pa.types.is_date(target)):
        return value
    try:
        when = pd.Timestamp(value.as_py())
        if pa.types.is_date(target):
            return pa.scalar(when.date(), type=target)
        if getattr(target, "tz", None) and when.tzinfo is None:
            when = when.tz_localize(target.tz)
        return pa.scalar(when, type=target)
    except (ValueError, TypeError, *_ARROW_ERRORS):
        return value  # not a time: the comparison refuses it with its own message
