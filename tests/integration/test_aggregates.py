"""Ray Data's whole-dataset aggregates on a real cluster, checked against numpy and pandas.

``sum``, ``min``, ``max``, ``mean``, ``std`` and ``unique``: each block is reduced on its
worker and the partial results combined here, so the checks use many blocks, blocks
after a filter (some empty), nulls, and values where a naive one-pass variance loses
precision.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import daskinfer as di


@pytest.fixture
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    n = 5000
    return pd.DataFrame(
        {
            "i": rng.integers(-1000, 1000, n),
            "x": rng.normal(3.0, 2.0, n),
            # a large offset: a one-pass sum of squares loses the variance's digits
            "big": 1e9 + rng.normal(0.0, 1.0, n),
            "label": rng.choice(["cat", "dog", "eel"], n),
        }
    )


def test_aggregates_match_numpy_over_many_blocks(client, frame):
    ds = di.from_pandas(frame, override_num_blocks=13)
    assert ds.sum("i") == int(frame["i"].sum())
    assert isinstance(ds.sum("i"), int)  # a Python value, as Ray gives
    assert ds.min("i") == frame["i"].min() and ds.max("i") == frame["i"].max()
    assert ds.mean("x") == pytest.approx(frame["x"].mean(), rel=1e-12)
    for ddof in (0, 1):
        want = np.std(frame["x"].to_numpy(), ddof=ddof)
        assert ds.std("x", ddof=ddof) == pytest.approx(want, rel=1e-10)
    # per-block means and squared deviations combine without the offset's cancellation
    assert ds.std("big") == pytest.approx(np.std(frame["big"].to_numpy(), ddof=1), rel=1e-6)
    assert ds.min("label") == "cat" and ds.max("label") == "eel"


def test_several_columns_give_a_mapping_as_ray_does(client, frame):
    ds = di.from_pandas(frame[["i", "x"]], override_num_blocks=4)
    got = ds.sum(["i", "x"])
    assert list(got) == ["sum(i)", "sum(x)"]
    assert got["sum(i)"] == frame["i"].sum()
    assert got["sum(x)"] == pytest.approx(frame["x"].sum())
    assert ds.mean() == {
        "mean(i)": pytest.approx(frame["i"].mean()),
        "mean(x)": pytest.approx(frame["x"].mean()),
    }
    assert ds.max(["x"]) == pytest.approx(frame["x"].max())  # one column: its value


def test_aggregates_after_a_pipeline_with_empty_blocks(client, frame):
    ds = (
        di.from_pandas(frame, override_num_blocks=10)
        .map_batches(lambda b: {"i": b["i"] * 2, "x": b["x"]}, batch_size=128)
        .filter(expr="i > 1000")  # leaves some blocks empty
    )
    kept = frame["i"][frame["i"] * 2 > 1000] * 2
    assert ds.sum("i") == int(kept.sum())
    assert ds.min("i") == int(kept.min())
    assert ds.std("i") == pytest.approx(kept.std(ddof=1), rel=1e-10)


def test_nulls_and_empty_datasets(client):
    ds = di.from_pandas(
        pd.DataFrame({"x": [1.0, None, 3.0, np.nan], "y": [None, None, None, None]}),
        override_num_blocks=2,
    )
    assert ds.sum("x") == 4.0 and ds.mean("x") == 2.0 and ds.min("x") == 1.0
    assert ds.sum("x", ignore_nulls=False) is None  # a null in the column
    assert ds.std("x") == pytest.approx(np.std([1.0, 3.0], ddof=1))
    assert ds.max("y") is None  # nulls only
    empty = di.range(10).filter(expr="id > 100")
    assert empty.sum("id") is None and empty.mean("id") is None and empty.max("id") is None
    assert di.from_items([{"v": 5}]).std("v") == 0.0  # one value: no spread, as Ray


def test_unique(client, frame):
    ds = di.from_pandas(frame, override_num_blocks=7)
    want = list(pd.unique(frame["label"]))
    assert ds.unique("label") == want  # in order of first appearance
    with_nulls = di.from_items([{"k": "a"}, {"k": None}, {"k": "b"}, {"k": "a"}])
    assert with_nulls.unique("k") == ["a", None, "b"]
    assert with_nulls.unique("k", ignore_nulls=True) == ["a", "b"]
    assert di.range(10).filter(expr="id > 100").unique("id") == []


def test_bad_aggregate_arguments_fail_before_any_work(frame):
    ds = di.from_pandas(frame)
    with pytest.raises(di.PlanError, match=r"sum: no column 'nope'.*'label'"):
        ds.sum("nope")
    with pytest.raises(di.PlanError, match=r"mean\('label'\): the column holds .*not numbers"):
        ds.mean("label")
    with pytest.raises(di.PlanError, match=r"std\(ddof=-1\)"):
        ds.std("x", ddof=-1)
    with pytest.raises(di.PlanError, match=r"max\(on=3\)"):
        ds.max(3)
    with pytest.raises(di.PlanError, match=r"ignore_nulls='no'"):
        ds.min("x", ignore_nulls="no")
    with pytest.raises(di.PlanError, match=r"unique\(column=\['a'\]\)"):
        ds.unique(["a"])


def test_text_found_on_the_workers_fails_naming_the_column(client):
    ds = di.from_items([{"s": "a"}]).map(lambda r: r)  # types no longer known to the plan
    with pytest.raises(di.UserCodeError, match=r"sum\('s'\): the column holds .*not numbers"):
        ds.sum("s")


def test_aggregate_several_in_one_pass_as_ray_does(client, frame):
    from daskinfer.aggregate import Count, Max, Mean, Min, Std, Sum

    with_nulls = frame.assign(y=frame["x"].where(frame["i"] % 10 != 0))
    ds = di.from_pandas(with_nulls, override_num_blocks=9)
    got = ds.aggregate(
        Count(),
        Count("y", ignore_nulls=True),
        Sum("i"),
        Mean("y"),
        Std("x", ddof=0),
        Min("label"),
        Max("y", alias_name="top"),
    )
    kept = with_nulls["y"].dropna()
    assert got == {
        "count()": len(frame),
        "count(y)": len(kept),
        "sum(i)": int(frame["i"].sum()),
        "mean(y)": pytest.approx(kept.mean()),
        "std(x)": pytest.approx(np.std(frame["x"].to_numpy())),
        "min(label)": "cat",
        "top": pytest.approx(kept.max()),
    }
    assert ds.aggregate(Sum("y", ignore_nulls=False)) == {"sum(y)": None}
    empty = di.range(10).filter(expr="id > 100").aggregate(Count(), Sum("id"))
    assert empty == {"count()": 0, "sum(id)": None}


def test_bad_aggregates_fail_before_any_work(frame):
    from daskinfer.aggregate import Count, Mean, Std, Sum

    ds = di.from_pandas(frame)
    with pytest.raises(di.PlanError, match=r"aggregate\(\): give one or more"):
        ds.aggregate()
    with pytest.raises(di.PlanError, match=r"aggregate\('sum'\).*daskinfer\.aggregate"):
        ds.aggregate("sum")
    with pytest.raises(di.PlanError, match=r"two aggregates named 'count\(\)'.*alias_name"):
        ds.aggregate(Count(), Count())
    with pytest.raises(di.PlanError, match=r"Sum\(\): give the column"):
        Sum()
    with pytest.raises(di.PlanError, match=r"Std\(ddof=-2\)"):
        Std("x", ddof=-2)
    with pytest.raises(di.PlanError, match=r"mean\('label'\): the column holds"):
        ds.aggregate(Mean("label"))
    with pytest.raises(di.PlanError, match=r"aggregate: no column 'nope'"):
        ds.aggregate(Count("nope"))
