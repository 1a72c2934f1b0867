"""filter(expr=...): Ray Data's string predicates, parsed and checked at the call.

Evaluation here runs on pandas blocks in this process (no cluster); the integration tests
(tests/integration/test_porting_rows.py) run the same predicates through a pipeline.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import daskinfer as di
from daskinfer._internal.expressions import (
    Check,
    Column,
    Compare,
    Literal,
    Logical,
    Negate,
    Not,
    PredicateError,
    ValueList,
    columns_of,
    evaluate,
    evaluate_values,
    parse_predicate,
    render,
)
from daskinfer._internal.transforms import WithColumnsTransform
from daskinfer.datatype import DataType
from daskinfer.expressions import col, lit


def _block() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "i": [1, 2, 3, 4],
            "x": [1.0, np.nan, 3.0, 5.0],
            "s": ["a", None, "c", "d"],
            "b": pd.Series([True, False, None, True], dtype=object),
            "ts": pd.to_datetime(["2024-01-01", None, "2024-03-01", "2024-05-01"]),
            "nothing": pd.Series([None] * 4, dtype=object),
            "cat": pd.Categorical(["a", "b", None, "a"]),
        }
    )


def _kept(expr: str) -> list[int]:
    block = _block()
    return block["i"][evaluate(parse_predicate(expr), block)].tolist()


# --- the grammar -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "tree"),
    [
        ("x > 1", Compare(">", Column("x"), Literal(1))),
        ("1 <= x", Compare("<=", Literal(1), Column("x"))),
        ("s == 'a'", Compare("==", Column("s"), Literal("a"))),
        ("x != -2.5", Compare("!=", Column("x"), Literal(-2.5))),
        ("s in ['a', 'b']", Compare("in", Column("s"), ValueList(("a", "b")))),
        ("s not in ('a',)", Compare("not in", Column("s"), ValueList(("a",)))),
        ("is_in(i, [1, -2])", Compare("in", Column("i"), ValueList((1, -2)))),
        (
            "x > 1 and s == 'a' and b",
            Logical(
                "and",
                (
                    Compare(">", Column("x"), Literal(1)),
                    Compare("==", Column("s"), Literal("a")),
                    Column("b"),
                ),
            ),
        ),
        (
            "not (x > 1 or b)",
            Not(Logical("or", (Compare(">", Column("x"), Literal(1)), Column("b")))),
        ),
        ("is_null(x)", Check("is_null", Column("x"))),
        ("is_not_null(x)", Check("is_valid", Column("x"))),
        ("is_valid(x)", Check("is_valid", Column("x"))),
        ("is_nan(x)", Check("is_nan", Column("x"))),
        ("user.age >= 18", Compare(">=", Column("user.age"), Literal(18))),
        ("-i < -2", Compare("<", Negate(Column("i")), Literal(-2))),
        ("s == None", Compare("==", Column("s"), Literal(None))),
        ("b", Column("b")),
        ("  x > 1\n", Compare(">", Column("x"), Literal(1))),
    ],
)
def test_ray_grammar_parses_to_the_tree(text, tree):
    parsed = parse_predicate(text)
    assert parsed == tree
    assert parse_predicate(render(parsed)) == tree  # render reads back the same


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("x >", "not valid Python syntax"),
        ("", "empty"),
        ("1 < x < 5", "join them with and"),
        ("x + 1 > 2", "not part of Ray Data's string expressions"),
        ("x is None", "is_null"),
        ("~b", "use `not`"),
        ("foo(x) > 1", "unsupported function foo()"),
        ("random() > 0.5", "random() is not supported"),
        ("is_null(x, True)", "exactly 1"),
        ("x in y", "takes a list of constants"),
        ("x in [y]", "constants only"),
        ("x in [1, 'a']", "mixes types"),
        ("[1, 2]", "a list is not a condition"),
        ("x == [1]", "a list can only follow"),
        ("3", "a value, not a condition"),
        ("-x", "a value, not a condition"),
        ("not 3", "`not` needs a condition"),
        ("x > 1 and 2", "joins conditions"),
        ("-(x > 1)", "only numbers and columns"),
        ("x == 1j", "not a number"),
        ("x[0] > 1", "Subscript"),
    ],
)
def test_what_the_grammar_refuses_is_a_plan_error_naming_the_expression(text, says):
    with pytest.raises(di.PlanError, match="filter") as info:
        parse_predicate(text)
    assert says in str(info.value)
    assert repr(text) in str(info.value)


def test_columns_of_lists_each_column_once_in_order():
    assert columns_of(parse_predicate("b and (x > 1 or is_null(s)) and x < 9")) == ["b", "x", "s"]


# --- evaluation: Arrow's rules over a pandas block ---------------------------------------
@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("x > 1", [3, 4]),  # NaN is missing: unknown, dropped
        ("not (x > 1)", [1]),  # not unknown stays unknown
        ("x > 1 or i == 2", [2, 3, 4]),  # Kleene: unknown or True is True
        ("x > 100 and i == 2", []),
        ("is_null(x)", [2]),
        ("is_nan(x)", [2]),  # pandas holds a float's missing value as NaN
        ("is_valid(s)", [1, 3, 4]),
        ("s in ['a', 'c']", [1, 3]),
        ("s not in ['a']", [2, 3, 4]),  # a missing value is not in the list: kept, as in Ray
        ("s in ['a', None]", [1, 2]),
        ("s > 'b'", [3, 4]),
        ("s == None", []),  # a comparison with null is unknown
        ("b", [1, 4]),  # a boolean column with a missing value
        ("not b", [2]),
        ("i in [1, 2.0]", [1, 2]),
        ("-i < -2", [3, 4]),
        ("ts >= '2024-03-01'", [3, 4]),  # a string read as a time, as pandas does
        ("is_null(ts)", [2]),
        ("cat == 'a'", [1, 4]),
        ("cat in ['b']", [2]),
        ("nothing in ['a']", []),  # a column of None only
        ("is_null(nothing)", [1, 2, 3, 4]),
        ("is_nan(s)", []),
        ("x in []", []),
        ("not (x in [])", [1, 2, 3, 4]),
        ("True", [1, 2, 3, 4]),
        ("3 in [1, 3]", [1, 2, 3, 4]),
    ],
)
def test_evaluation_keeps_the_rows_where_the_predicate_is_true(text, kept):
    assert _kept(text) == kept


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("i > 's'", "cannot compare a column of type int64 with a constant of type string"),
        ("x", "gives double values, not booleans"),
        ("missing == 1", "column 'missing' is not in the block"),
        ("i in ['a']", "cannot look up"),
        ("x > 1 and i", "`and` takes conditions"),
    ],
)
def test_evaluation_errors_say_what_is_wrong(text, says):
    with pytest.raises(PredicateError, match=says):
        evaluate(parse_predicate(text), _block())


# --- the expression objects (daskinfer.expressions) --------------------------------------
def test_col_builds_the_same_tree_as_the_string():
    built = ((col("x") > 1) & col("s").is_in(["a", "c"])) | ~col("b") | col("x").is_null()
    assert built.predicate() == parse_predicate(
        "(x > 1 and s in ['a', 'c']) or not b or is_null(x)"
    )
    assert (col("s").not_in(lit(["a"]))).predicate() == parse_predicate("s not in ['a']")
    assert (-col("i") < -2).predicate() == parse_predicate("-i < -2")
    assert col("s").is_not_null().text() == "is_valid(s)"
    assert (col("i") == 2).text() == "i == 2"


def test_col_refuses_what_it_does_not_provide():
    with pytest.raises(TypeError, match="no truth value"):
        bool(col("x") > 1)
    with pytest.raises(TypeError, match=r"use \.power"):
        col("x") ** 2
    with pytest.raises(TypeError, match="joins conditions"):
        lit(3) & (col("y") > 1)
    with pytest.raises(di.PlanError, match="not a condition"):
        (-col("x")).predicate()
    with pytest.raises(di.PlanError, match="mixes types"):
        col("x").is_in([1, "a"])


# --- the call checks before any work ----------------------------------------------------
def _ds() -> di.Dataset:
    return di.from_pandas(pd.DataFrame({"i": [1, 2], "s": ["a", "b"]}))


def test_filter_checks_columns_syntax_and_arguments_at_the_call():
    ds = _ds()
    with pytest.raises(di.PlanError, match=r"no column 'nope'.*columns \['i', 's'\]"):
        ds.filter(expr="i > 1 and nope == 2")
    with pytest.raises(di.PlanError, match="no column 'nope'"):
        ds.select_columns(["i"]).filter(expr="i > 1").filter(expr=col("nope") > 1)
    with pytest.raises(di.PlanError, match="not valid Python syntax"):
        ds.filter(expr="i >")
    with pytest.raises(di.PlanError, match="exactly one of fn"):
        ds.filter(lambda r: True, expr="i > 1")
    with pytest.raises(di.PlanError, match="exactly one of fn"):
        ds.filter()
    with pytest.raises(di.PlanError, match="an expression takes none"):
        ds.filter(expr="i > 1", fn_kwargs={"a": 1})
    with pytest.raises(di.PlanError, match="runs as tasks"):
        ds.filter(expr="i > 1", compute=di.ActorPoolStrategy(size=1))
    with pytest.raises(di.PlanError, match="expr takes a string"):
        ds.filter(expr=3)
    # where the columns are not known (after a map), they are checked on the blocks
    ds.map(lambda r: r).filter(expr="nope > 1")
    plan = ds.filter(expr="i > 1").filter(None, "s == 'a'")
    assert plan.columns() == ["i", "s"]
    assert "Filter(i > 1)" in repr(plan) and "Filter(s == 'a')" in repr(plan)


class Predicate:
    def __init__(self):
        raise AssertionError("the constructor must never run at the call")

    def __call__(self, row):
        return True


def test_row_verbs_take_a_class_with_a_pool_and_refuse_one_without():
    ds = _ds()
    for verb in (ds.map, ds.filter, ds.flat_map):
        with pytest.raises(di.PlanError, match=r"pool.*concurrency=2"):
            verb(Predicate)
        with pytest.raises(di.PlanError, match="callable classes only"):
            verb(lambda r: r, fn_constructor_args=(1,))
        with pytest.raises(di.PlanError, match="needs a callable class"):
            verb(lambda r: r, compute=di.ActorPoolStrategy(size=1))
        stage = verb(Predicate, concurrency=(1, 3), fn_constructor_kwargs={"k": 1})._plan.ops[-1]
        assert stage.is_actor and (stage.pool_min, stage.pool_max) == (1, 3)
        assert stage.ctor_kwargs == {"k": 1}
        tasks = verb(lambda r: r, compute=di.TaskPoolStrategy(size=2), resources={"X": 1})
        assert tasks._plan.ops[-1].concurrency == 2
        assert tasks._plan.ops[-1].resources == {"X": 1.0}


def test_repartition_shuffle_is_checked_and_planned():
    with pytest.raises(di.PlanError, match="use True or False"):
        _ds().repartition(2, shuffle="yes")
    with pytest.raises(TypeError):
        _ds().repartition(2, keys=["i"])  # not provided: refused, not ignored
    assert "Repartition[3, shuffle]" in _ds().repartition(3, shuffle=True).explain()
    assert "Repartition[3]" in _ds().repartition(3).explain()


# --- arithmetic and with_column: Ray's operators on Arrow data -------------------------
def _numbers() -> pd.DataFrame:
    """Ints (one column with a missing value, kept as int by pandas' Int64), floats with
    NaN, zeros in both, negatives, and text."""
    return pd.DataFrame(
        {
            "a": [7, -7, 9, 0, -3],
            "b": [2, 2, 4, 5, -2],
            "n": pd.array([1, None, 3, 4, 5], dtype="Int64"),
            "f": [7.5, -7.5, np.nan, 0.0, 1.0],
            "g": [2.0, 2.0, 1.0, 0.0, 0.0],
            "s": ["x", None, "z", "w", "v"],
        }
    )


def _values(expr) -> list:
    (value,) = evaluate_values([expr.node], _numbers())
    return value.to_pylist()


def _pandas_list(series: pd.Series) -> list:
    """pandas' values with its missing ones as None, to compare with Arrow's."""
    return [None if pd.isna(v) else v for v in series.astype(object)]


@pytest.mark.parametrize(
    ("expr", "in_pandas"),
    [
        (col("a") + col("b"), lambda d: d.a + d.b),
        (col("a") - 1, lambda d: d.a - 1),
        (10 - col("a"), lambda d: 10 - d.a),
        (col("a") * col("b"), lambda d: d.a * d.b),
        (2 * col("a"), lambda d: 2 * d.a),
        (col("a") * 1.5, lambda d: d.a * 1.5),
        (col("f") + col("a"), lambda d: d.f + d.a),  # a missing value stays missing
        (col("f") / col("g"), lambda d: d.f / d.g),  # floats: x/0 is inf, 0/0 NaN
        (col("f") // col("g"), lambda d: d.f // d.g),
        (col("f") % col("g"), lambda d: d.f % d.g),
        (col("f") / 2, lambda d: d.f / 2),
        (1 / col("g"), lambda d: 1 / d.g),
        (col("n") * 2 + col("a"), lambda d: d.n * 2 + d.a),
        (-(col("a") + 1), lambda d: -(d.a + 1)),
    ],
)
def test_arithmetic_agrees_with_pandas_where_ray_does(expr, in_pandas):
    got = _values(expr)
    want = _pandas_list(in_pandas(_numbers()))
    # NaN (a float's 0/0) is a value in Arrow, missing in pandas' list
    got = [None if isinstance(v, float) and np.isnan(v) else v for v in got]
    assert got == pytest.approx(want, nan_ok=True), expr


def test_integer_division_is_rays_on_arrow_data_not_pythons():
    # Ray 2.60 on Arrow blocks (range, from_items, Parquet): int / int divides integers,
    # truncating; // and % are floats over that division
    assert _values(col("a") / col("b")) == [3, -3, 2, 0, 1]
    assert _values(col("a") // col("b")) == [3.0, -3.0, 2.0, 0.0, 1.0]
    assert _values(col("a") % col("b")) == [1.0, -1.0, 1.0, 0.0, -1.0]
    assert _values(col("a") / 2.0) == [3.5, -3.5, 4.5, 0.0, -1.5]  # a float: true division
    assert _values(col("n") / 2) == [0, None, 1, 2, 2]  # nullable ints stay ints
    assert _values(col("a").cast(DataType.float64()) / col("b")) == [3.5, -3.5, 2.25, 0.0, 1.5]
    with pytest.raises(PredicateError, match="integer division by zero"):
        _values(col("b") / (col("a") - col("a")))
    with pytest.raises(PredicateError, match="integer division by zero"):
        _values(col("a") % 0)


def test_strings_join_with_plus_and_refuse_other_arithmetic():
    assert _values(col("s") + "!") == ["x!", None, "z!", "w!", "v!"]
    assert _values("<" + col("s") + ">") == ["<x>", None, "<z>", "<w>", "<v>"]
    with pytest.raises(PredicateError, match="joins two strings"):
        _values(col("s") + col("a"))
    with pytest.raises(TypeError, match="is text"):
        col("a") - "x"


def test_functions_cast_and_comparisons_of_values():
    assert _values(col("f").round()) == [8.0, -8.0, None, 0.0, 1.0]  # halves to even
    assert _values(col("a").abs()) == [7, 7, 9, 0, 3]
    assert _values(col("b").power(2)) == [4, 4, 16, 25, 4]
    assert _values(col("a").sign()) == [1, -1, 1, 0, -1]
    assert _values(col("g").exp().ln()) == pytest.approx([2.0, 2.0, 1.0, 0.0, 0.0])
    assert _values(col("a").cast(DataType.string())) == ["7", "-7", "9", "0", "-3"]
    with pytest.raises(PredicateError, match="safe=False"):
        _values(col("f").cast(DataType.int64()))  # 7.5 would lose its half
    assert _values(col("g").cast(DataType.int64(), safe=False)) == [2, 2, 1, 0, 0]
    block = _numbers()
    kept = evaluate((col("a") + 1 > col("b") * 2).predicate(), block)
    assert kept.tolist() == (block.a + 1 > block.b * 2).tolist()
    kept = evaluate(((col("f") / col("g")) >= 1).predicate(), block)  # inf >= 1; NaN: no
    assert kept.tolist() == [True, False, False, False, True]


def test_value_expressions_build_and_render():
    assert (col("a") + 1).text() == "a + 1"
    assert ((col("a") + 1) * col("b")).text() == "(a + 1) * b"
    assert (col("a") - (col("b") - 1)).text() == "a - (b - 1)"
    assert (col("a") * 2 + 1 > col("b")).text() == "a * 2 + 1 > b"
    assert (2**3 // col("a")).text() == "8 // a"
    assert (col("x").power(col("y"))).text() == "power(x, y)"
    assert col("x").cast(DataType.float64()).text() == "cast(x, double)"
    aliased = (col("p") * col("q")).alias("total")
    assert aliased.name == "total" and col("p").name == "p" and (col("p") + 1).name is None
    assert repr(aliased) == "Expr(p * q, alias='total')"
    assert (col("a") + np.int64(3)).node == (col("a") + 3).node  # numpy's numbers too
    with pytest.raises(TypeError, match="is a condition"):
        (col("a") > 1) + 1
    with pytest.raises(TypeError, match=r"use \.power"):
        col("a") ** 2
    with pytest.raises(TypeError, match="takes numbers"):
        lit("x").round()
    with pytest.raises(di.PlanError, match=r"DataType\.float64"):
        col("a").cast("float64")
    with pytest.raises(di.PlanError, match="non-empty string"):
        col("a").alias("")
    with pytest.raises(di.PlanError, match="is a value, not a condition"):
        (col("a") + 1).predicate()
    with pytest.raises(TypeError, match="joins conditions"):
        (col("a") + 1) & (col("b") > 1)
    with pytest.raises(TypeError, match="only numbers"):
        -lit(True)


def test_string_predicates_still_refuse_arithmetic_as_ray_does():
    with pytest.raises(di.PlanError, match=r"arithmetic.*col\('x'\) \+ 1 > 2"):
        parse_predicate("x * 2 > 1")


def _with(block: pd.DataFrame, **exprs) -> pd.DataFrame:
    columns = tuple((name, e.node) for name, e in exprs.items())
    return WithColumnsTransform("WithColumns", "with_columns(...)", columns).apply(block)


def test_with_columns_keeps_the_other_columns_and_their_types():
    from daskinfer.extensions import TensorArray

    block = pd.DataFrame(
        {
            "a": np.array([1, 2, 3], dtype=np.int32),
            "cat": pd.Categorical(["u", "v", "u"]),
            "emb": TensorArray(np.arange(12, dtype=np.float32).reshape(3, 2, 2)),
            "ts": pd.to_datetime(["2024-01-01", "2024-01-02", None]).tz_localize("UTC"),
        }
    )
    out = _with(block, a=col("a") * 2, b=col("a") + 0.5, emb2=col("emb"), one=lit(1))
    assert list(out.columns) == ["a", "cat", "emb", "ts", "b", "emb2", "one"]
    assert out["a"].tolist() == [2, 4, 6]  # replaced in its place, from the input a
    assert out["b"].tolist() == [1.5, 2.5, 3.5]  # from the input a, not the new one
    for name in ("cat", "emb", "ts"):
        assert out[name].dtype == block[name].dtype, name
    assert out["emb2"].dtype == block["emb"].dtype  # a bare column is copied as it is
    np.testing.assert_array_equal(out["emb2"].array.values, block["emb"].array.values)
    assert out["one"].tolist() == [1, 1, 1] and out["one"].dtype == np.int64
    assert list(block.columns) == ["a", "cat", "emb", "ts"]  # the input is not edited
    assert block["a"].tolist() == [1, 2, 3]


def test_with_columns_gives_pandas_types_for_missing_values():
    block = pd.DataFrame({"a": [1.0, np.nan], "s": ["x", None]})
    out = _with(
        block, d=col("a") * 2, big=col("a") > 0, t=col("s") + "!", none=lit(None), k=col("s")
    )
    assert _pandas_list(out["d"]) == [2.0, None]
    assert out["big"].tolist() == [True, None]  # unknown stays unknown (object column)
    assert _pandas_list(out["t"]) == ["x!", None]
    assert out["none"].tolist() == [None, None]
    assert _pandas_list(out["k"]) == ["x", None]
    empty = _with(block.iloc[:0], d=col("a") * 2)
    assert list(empty.columns) == ["a", "s", "d"] and len(empty) == 0
    no_columns = pd.DataFrame()
    assert _with(no_columns, d=col("a") * 2) is no_columns


def test_with_columns_errors_on_a_block_name_the_call():
    with pytest.raises(di.UserCodeError, match=r"with_columns\(\.\.\.\): 'a \* s': cannot apply"):
        _with(pd.DataFrame({"a": [1], "s": ["x"]}), d=col("a") * col("s"))
    with pytest.raises(di.UserCodeError, match="column 'nope' is not in the block"):
        _with(pd.DataFrame({"a": [1]}), d=col("nope"))


def test_with_column_checks_its_arguments_at_the_call():
    ds = _ds()
    with pytest.raises(di.PlanError, match=r"with_column\('y', 'i \+ 1'\).*col\('x'\) \* 2"):
        ds.with_column("y", "i + 1")
    with pytest.raises(di.PlanError, match=r"lit\(value\)"):
        ds.with_column("y", 3)
    with pytest.raises(di.PlanError, match="add_column"):
        ds.with_column("y", lambda b: b["i"])
    with pytest.raises(di.PlanError, match="non-empty string"):
        ds.with_column(3, col("i"))
    with pytest.raises(di.PlanError, match=r"with_column\('y', nope \+ 1\): no column 'nope'"):
        ds.with_column("y", col("nope") + 1)
    with pytest.raises(di.PlanError, match=r"no column 'z'.*\['i', 's', 'y'\]"):
        ds.with_column("y", col("i") * 2).with_columns({"q": col("z")})
    with pytest.raises(di.PlanError, match="pass a dict"):
        ds.with_columns([("y", col("i"))])
    with pytest.raises(di.PlanError, match="not a column's value"):
        ds.with_column("y", lit([1, 2]))
    with pytest.raises(di.PlanError, match="runs as tasks"):
        ds.with_column("y", col("i"), compute=di.ActorPoolStrategy(size=1))
    with pytest.raises(di.PlanError, match="concurrency"):
        ds.with_column("y", col("i"), concurrency=0)
    with pytest.raises(di.PlanError, match="memory=1"):
        ds.with_column("y", col("i"), memory=1)  # not provided: refused, not ignored
    assert ds.with_columns({}) is ds and ds.with_columns() is ds
    # where the columns are not known (after a map), they are checked on the blocks
    ds.map(lambda r: r).with_column("y", col("nope"))
    planned = ds.with_columns({"i": col("i") * 2, "y": col("i")}, {"z": lit(0), "y": lit(1)})
    assert planned.columns() == ["i", "s", "y", "z"]
    stage = planned._plan.ops[-1]
    assert stage.name == "WithColumns(i, y, z)"
    assert [n for n, _ in stage.transform.columns] == ["i", "y", "z"]
    assert stage.transform.columns[1][1] == Literal(1)  # a name given twice: the last
    capped = ds.with_column("y", col("i"), concurrency=2, num_cpus=1, resources={"X": 1})
    assert capped._plan.ops[-1].concurrency == 2
    assert capped._plan.ops[-1].resources == {"X": 1.0, "CPU": 1.0}
