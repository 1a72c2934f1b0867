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
    parse_predicate,
    render,
)
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
    with pytest.raises(TypeError, match="arithmetic"):
        col("x") + 1
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
