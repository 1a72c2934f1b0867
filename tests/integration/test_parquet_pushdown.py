"""``read_parquet(...).filter(expr=...)`` hands the condition to the reader as well.

The reader then skips Hive partitions, row groups and rows; the filter stage still runs,
so the result is the same as without the pushdown, which the tests compare against pandas.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import daskinfer as di
from daskinfer._internal.expressions import parse_predicate
from daskinfer.expressions import col
from daskinfer.io.pushdown import to_dnf

DTYPES = pd.Series(
    {
        "id": np.dtype("int64"),
        "v": np.dtype("float64"),
        "name": pd.StringDtype(),
        "t": np.dtype("datetime64[ns]"),
        "flag": np.dtype("bool"),
    }
)


@pytest.mark.parametrize(
    ("text", "dnf"),
    [
        ("id > 3", [(("id", ">", 3),)]),
        ("3 > id", [(("id", "<", 3),)]),
        ("id > 3 and name == 'a'", [(("id", ">", 3), ("name", "==", "a"))]),
        ("id > 3 or v <= 0.5", [(("id", ">", 3),), (("v", "<=", 0.5),)]),
        ("name in ['a', 'b']", [(("name", "in", ["a", "b"]),)]),
        # (a or b) and c distributes
        (
            "(id == 1 or id == 2) and v > 0",
            [(("id", "==", 1), ("v", ">", 0)), (("id", "==", 2), ("v", ">", 0))],
        ),
        # a conjunct the reader cannot take is dropped (the filter stage still applies it)
        ("id > 3 and is_null(name)", [(("id", ">", 3),)]),
        ("id > 3 and t > '2024-01-01'", [(("id", ">", 3),)]),
        # an OR branch it cannot take means no filter at all
        ("id > 3 or is_null(name)", None),
        ("not id > 3", None),
        ("flag == True", None),
        ("id == name", None),
    ],
)
def test_conditions_become_dask_filters(text, dnf):
    assert to_dnf(parse_predicate(text), DTYPES) == dnf


@pytest.fixture
def partitioned(client, tmp_path):
    n = 4000
    df = pd.DataFrame(
        {
            "id": np.arange(n),
            "year": np.repeat([2021, 2022, 2023, 2024], n // 4),
            "v": np.random.default_rng(0).random(n),
            "t": pd.date_range("2024-01-01", periods=n, freq="h"),
        }
    )
    out = str(tmp_path / "data")
    di.from_pandas(df).write_parquet(
        out, partition_cols=["year"], min_rows_per_file=250, row_group_size=50
    )
    return out, df


def test_partitions_and_files_are_skipped_and_results_match(partitioned):
    out, df = partitioned
    everything = di.read_parquet(out)
    ds = everything.filter(expr="year == 2023 and id < 2900")
    # the reader was given the condition: only 2023's files are read (a quarter of them)
    assert "('year', '==', 2023)" in ds.explain()
    read_blocks = ds._plan.source.frame.npartitions
    assert 4 * read_blocks <= everything._plan.source.frame.npartitions
    got = ds.to_pandas()
    assert got["id"].tolist() == df[(df.year == 2023) & (df.id < 2900)]["id"].tolist()


def test_what_the_reader_cannot_check_still_filters(partitioned):
    out, df = partitioned
    cases = [
        # arithmetic in an OR: nothing pushed
        ((col("id") % 7 == 0) | (col("v") > 0.9), (df.id % 7 == 0) | (df.v > 0.9)),
        # a time compared with text: pushed only in part
        ("t >= '2024-03-01' and year > 2021", (df.t >= "2024-03-01") & (df.year > 2021)),
    ]
    for expr, mask in cases:
        got = di.read_parquet(out).filter(expr=expr).to_pandas()
        assert sorted(got["id"].tolist()) == df[mask]["id"].tolist()


def test_chained_filters_are_all_pushed(partitioned):
    out, df = partitioned
    ds = di.read_parquet(out).filter(expr="v > 0.5").filter(expr="year in [2021, 2024]")
    assert "('year', 'in', [2021, 2024])" in ds.explain() and "('v', '>', 0.5)" in ds.explain()
    mask = (df.v > 0.5) & df.year.isin([2021, 2024])
    assert sorted(ds.to_pandas()["id"].tolist()) == df[mask]["id"].tolist()
    # after another verb, a filter is not pushed past it
    mapped = di.read_parquet(out).map_batches(lambda b: b).filter(expr="year == 2022")
    assert "pushed" not in mapped.explain()
    assert mapped.count() == 1000


def test_read_parquet_filter_takes_a_pyarrow_expression(partitioned):
    import pyarrow.compute as pc

    out, df = partitioned
    ds = di.read_parquet(out, filter=(pc.field("v") > 0.9) & (pc.field("year") >= 2023))
    expected = df[(df.v > 0.9) & (df.year >= 2023)]["id"].tolist()
    assert sorted(ds.to_pandas()["id"].tolist()) == expected
    # with a filter(expr=) after it, both hold, and the second is pushed as well
    both = ds.filter(expr="id < 3500")
    assert "('id', '<', 3500)" in both.explain()
    assert sorted(both.to_pandas()["id"].tolist()) == [i for i in expected if i < 3500]
    with pytest.raises(di.PlanError, match="pyarrow expression"):
        di.read_parquet(out, filter="v > 0.9")
