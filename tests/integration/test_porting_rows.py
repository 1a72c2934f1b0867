"""Ray Data row verbs a port relies on, on a real two-worker Dask cluster:
``filter(expr=...)``, ``with_column``/``with_columns``, ``map``/``filter``/``flat_map``
with a callable class in an actor pool, and ``repartition(n, shuffle=True)``.
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pandas as pd
import pytest

import daskinfer as di
from daskinfer.expressions import col


# --- filter(expr=...) ------------------------------------------------------------------
def mixed_frame(n: int = 60) -> pd.DataFrame:
    """Numbers, text, booleans and times, each with missing values."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=n)
    x[rng.random(n) < 0.2] = np.nan
    text = rng.choice(np.array(["a", "b", "c", None], dtype=object), size=n)
    flag = rng.choice(np.array([True, False, None], dtype=object), size=n)
    days = rng.integers(0, 60, size=n).astype("timedelta64[D]")
    ts = pd.Series(np.datetime64("2024-01-01") + days).astype("datetime64[ns]")
    ts[rng.random(n) < 0.2] = pd.NaT
    return pd.DataFrame({"i": np.arange(n), "x": x, "s": text, "flag": flag, "ts": ts})


# each string predicate, and the same predicate in pandas, written out with Arrow's rules:
# a missing value makes a comparison unknown, and an unknown row is dropped
PREDICATES = [
    ("x > 0.2", lambda d: d.x > 0.2),
    ("not (x > 0.2)", lambda d: d.x.notna() & ~(d.x > 0.2)),
    ("x > 0.2 or s == 'b'", lambda d: (d.x > 0.2) | (d.s == "b")),
    ("x <= 0 and s != 'a'", lambda d: (d.x <= 0) & d.s.notna() & (d.s != "a")),
    ("s in ['a', 'c']", lambda d: d.s.isin(["a", "c"])),
    ("s not in ['a']", lambda d: ~d.s.isin(["a"])),
    ("is_null(x) or is_null(s)", lambda d: d.x.isna() | d.s.isna()),
    ("is_nan(x)", lambda d: d.x.isna()),
    ("is_valid(flag) and ts >= '2024-01-20'", lambda d: d.flag.notna() & (d.ts >= "2024-01-20")),
    ("flag", lambda d: d.flag.eq(True)),
    ("not flag", lambda d: d.flag.eq(False)),
    ("i in [3, 7, 11] or -i < -55", lambda d: d.i.isin([3, 7, 11]) | (-d.i < -55)),
]


def test_filter_expr_keeps_what_pandas_keeps_over_mixed_types_and_nulls(client):
    df = mixed_frame()
    ds = di.from_pandas(df, npartitions=4).materialize()  # read once, filtered 13 times
    for text, in_pandas in PREDICATES:
        got = ds.filter(expr=text).to_pandas()
        want = df[in_pandas(df).to_numpy(dtype=bool)]
        assert got["i"].tolist() == want["i"].tolist(), text
        assert 0 < len(got) < len(df), text  # each case keeps some rows and drops some
    assert list(got.columns) == list(df.columns)
    # the expression objects give the same rows as the string
    built = ((col("x") > 0.2) | (col("s") == "b")) & ~col("i").is_in([1, 2, 3])
    assert ds.filter(expr=built).to_pandas()["i"].tolist() == [
        i for i in ds.filter(expr="x > 0.2 or s == 'b'").to_pandas()["i"] if i not in (1, 2, 3)
    ]


def test_filter_expr_after_other_stages_and_on_empty_blocks(client):
    ds = di.range(100, override_num_blocks=5).map_batches(
        lambda b: {"id": b["id"], "y": b["id"] % 7}
    )
    # the columns come from a function: they are checked on the blocks, and the
    # filter fuses into the stage before it
    kept = ds.filter(expr="y == 0 and id >= 50")
    assert kept.take_all() == [{"id": i, "y": 0} for i in range(50, 100) if i % 7 == 0]
    assert "MapBatches(<lambda>)->Filter(y == 0 and id >= 50)" in kept.explain()
    none = di.range(10).filter(expr="id > 100")
    out = none.filter(expr="id < 5").to_pandas()
    assert len(out) == 0 and list(out.columns) == ["id"]


def test_filter_expr_errors_on_the_blocks_name_the_expression(client):
    ds = di.from_pandas(mixed_frame(), npartitions=2)
    with pytest.raises(di.UserCodeError, match=r"filter\(expr=\"i > 's'\"\).*cannot compare"):
        ds.filter(expr="i > 's'").take_all()
    with pytest.raises(di.UserCodeError, match="column 'nope' is not in the block"):
        ds.map(lambda r: r).filter(expr="nope > 1").take_all()


# --- callable classes in map / filter / flat_map ---------------------------------------
class Tagger:
    """Marks each instance it builds with a file, so the test counts constructions."""

    def __init__(self, marks, prefix, *, scale=1):
        self.token = uuid.uuid4().hex
        (marks / f"{self.token}.init").write_text(str(os.getpid()))
        self.prefix, self.scale, self.calls = prefix, scale, 0

    def __call__(self, row):
        self.calls += 1  # state kept across rows and blocks: one instance per actor
        return {
            "id": row["id"] * self.scale,
            "tag": self.prefix,
            "who": self.token,
            "n": self.calls,
        }


class KeepMultiples:
    def __init__(self, marks, divisor):
        (marks / f"{uuid.uuid4().hex}.init").write_text("")
        self.divisor = divisor

    def __call__(self, row, offset=0):
        return (row["id"] + offset) % self.divisor == 0


class Repeat:
    def __init__(self, marks):
        (marks / f"{uuid.uuid4().hex}.init").write_text("")

    def __call__(self, row):
        return [{"id": row["id"], "k": k} for k in range(row["id"] % 3)]


def test_map_with_a_class_runs_in_a_pool_of_actors(client, tmp_path):
    ds = di.range(200, override_num_blocks=10).map(
        Tagger,
        concurrency=2,
        fn_constructor_args=(tmp_path, "p"),
        fn_constructor_kwargs={"scale": 3},
    )
    assert "actor pool 2..2" in ds.explain()
    out = ds.to_pandas()
    assert out["id"].tolist() == [3 * i for i in range(200)]
    assert set(out["tag"]) == {"p"}
    built = {p.stem for p in tmp_path.glob("*.init")}
    # the constructor ran once per actor (not per row, nor per block) and every row went
    # to one of those instances, which counted all of them
    assert 1 <= len(built) <= 2
    assert set(out["who"]) <= built
    assert sum(out.groupby("who")["n"].max()) == 200


def test_filter_and_flat_map_with_a_class(client, tmp_path):
    ds = di.range(60, override_num_blocks=6)
    kept = ds.filter(
        KeepMultiples,
        compute=di.ActorPoolStrategy(size=1),
        fn_constructor_args=(tmp_path, 4),
        fn_kwargs={"offset": 1},
    ).take_all()
    assert [r["id"] for r in kept] == [i for i in range(60) if (i + 1) % 4 == 0]
    assert len(list(tmp_path.glob("*.init"))) == 1

    marks = tmp_path / "flat"
    marks.mkdir()
    rows = ds.flat_map(Repeat, concurrency=(1, 2), fn_constructor_args=(marks,)).take_all()
    assert rows == [{"id": i, "k": k} for i in range(60) for k in range(i % 3)]
    assert 1 <= len(list(marks.glob("*.init"))) <= 2


# --- repartition(n, shuffle=True) --------------------------------------------------------
def blocks_of(ds: di.Dataset) -> list[pd.DataFrame]:
    return list(ds.iter_batches(batch_size=None, batch_format="pandas"))


def test_shuffle_repartition_gives_rays_blocks(client):
    # as Ray 2.60: each input block is cut into n slices of ceil(rows / n) rows, and
    # output block i joins the i-th slices of all input blocks, in input order
    ds = di.range(30, override_num_blocks=3).repartition(4, shuffle=True)
    assert [b["id"].tolist() for b in blocks_of(ds)] == [
        [0, 1, 2, 10, 11, 12, 20, 21, 22],
        [3, 4, 5, 13, 14, 15, 23, 24, 25],
        [6, 7, 8, 16, 17, 18, 26, 27, 28],
        [9, 19, 29],
    ]
    # without shuffle: consecutive rows, near-equal blocks
    plain = di.range(30, override_num_blocks=3).repartition(4)
    assert [len(b) for b in blocks_of(plain)] == [8, 8, 7, 7]


def test_shuffle_repartition_keeps_every_row_once_and_mixes_the_blocks(client):
    n = 300
    df = pd.DataFrame(
        {
            "i": np.arange(n),
            "s": [f"row-{k}" for k in range(n)],
            "v": [np.full(3, k, dtype=np.float32) for k in range(n)],
        }
    )
    # after a stage that re-cuts the rows, so the exchange's input comes from its tasks
    ds = di.from_pandas(df, npartitions=5).map_batches(lambda b: b, batch_size=7)
    out = ds.repartition(3, shuffle=True).map(lambda r: r).to_pandas()
    assert sorted(out["i"]) == list(range(n))  # every row, exactly once
    assert out["i"].tolist() != list(range(n))  # in another order
    for row in out.itertuples():
        assert row.s == f"row-{row.i}" and np.array_equal(row.v, np.full(3, row.i))
    # input blocks of 60 rows (the 5 partitions, a row map fused into their reads):
    # output block k holds rows 20k..20k+19 of each of them
    blocks = blocks_of(
        di.from_pandas(df, npartitions=5).map(lambda r: r).repartition(3, shuffle=True)
    )
    for k, block in enumerate(blocks):
        assert block["i"].tolist() == [60 * p + 20 * k + j for p in range(5) for j in range(20)]
        assert block["s"].tolist() == [f"row-{i}" for i in block["i"]]


def test_shuffle_repartition_unordered_empty_and_failing_downstream(client, context):
    context.preserve_order = False
    got = di.range(100, override_num_blocks=7).repartition(5, shuffle=True).to_pandas()
    assert sorted(got["id"]) == list(range(100))
    context.preserve_order = True

    for shuffle in (True, False):  # an empty result keeps its columns
        empty = di.range(10).filter(expr="id > 100").repartition(3, shuffle=shuffle)
        out = empty.to_pandas()
        assert len(out) == 0 and list(out.columns) == ["id"]

    def fail_on_first(row):
        if row["id"] == 0:
            raise ValueError("downstream broke")
        return row

    # more output blocks than the exchange sends at once: those not yet sent are
    # dropped with their slices (the fixture checks that nothing is left on the cluster)
    failing = di.range(200, override_num_blocks=4).repartition(16, shuffle=True).map(fail_on_first)
    with pytest.raises(di.UserCodeError, match="downstream broke"):
        failing.take_all()


# --- with_column / with_columns -----------------------------------------------------------
def test_with_column_chained_with_map_batches_and_filter_gives_pandas_values(client):
    df = mixed_frame()
    ds = (
        di.from_pandas(df, npartitions=3)
        .with_column("x2", col("x") * 2 + col("i"))
        .map_batches(lambda b: {**b, "k": b["i"] % 5}, batch_format="pandas", batch_size=None)
        .filter(expr=(col("x2") - col("i") > 0) | (col("k") == 0))
        .with_columns({"i": col("i") * 10, "tag": col("s") + "!", "half": col("k") / 2})
    )
    got = ds.to_pandas()
    want = df.assign(x2=df.x * 2 + df.i, k=df.i % 5)
    want = want[((want.x2 - want.i > 0) | (want.k == 0)).to_numpy(dtype=bool)]
    assert 0 < len(got) < len(df)
    # i replaced in its place, from the input; new columns after, in order
    assert list(got.columns) == [*df.columns, "x2", "k", "tag", "half"]
    assert got["i"].tolist() == (want.i * 10).tolist()
    np.testing.assert_allclose(got["x2"], want.x2)  # NaN where x is missing
    assert [t if isinstance(t, str) else None for t in got["tag"]] == [
        f"{s}!" if isinstance(s, str) else None for s in want.s
    ]
    assert got["half"].tolist() == (want.k // 2).tolist()  # Ray: int / int divides ints
    assert got["ts"].dtype == df["ts"].dtype and got["flag"].dtype == object
    # the whole-block stages fuse with their neighbours, as add_column does
    plan = ds.explain()
    assert "WithColumn(x2)->MapBatches(<lambda>)->Filter(" in plan, plan
    assert "->WithColumns(i, tag, half)" in plan, plan


def test_with_column_keeps_tensor_columns_and_fails_on_the_blocks_like_ray(client):
    def embed(batch):  # an N-D numpy column: a tensor column of the block
        ids = batch["id"]
        return {"id": ids, "emb": np.ones((len(ids), 2, 3), np.float32) * ids[:, None, None]}

    ds = (
        di.range(12, override_num_blocks=3)
        .map_batches(embed)
        .with_columns(
            {"id": col("id") - 1, "norm": (col("id") * 1.0).power(2).round(), "copy": col("emb")}
        )
    )
    out = ds.to_pandas()
    assert list(out.columns) == ["id", "emb", "norm", "copy"]
    assert out["id"].tolist() == list(range(-1, 11))
    assert out["norm"].tolist() == [float(i * i) for i in range(12)]
    assert out["emb"].dtype == out["copy"].dtype and "tensor" in str(out["emb"].dtype)
    for row in ds.take(3):
        assert row["emb"].shape == (2, 3) and np.array_equal(row["copy"], row["emb"])
    # an integer division by zero fails the job, as in Ray, naming the call
    broken = di.range(10, override_num_blocks=2).with_column("r", 100 // (col("id") - 7))
    with pytest.raises(di.UserCodeError, match=r"with_column\('r', 100 // \(id - 7\)\).*by zero"):
        broken.take_all()
    # a float division by zero is inf (and an unknown in the filter drops nothing here)
    inf = di.range(3).with_column("r", 1.0 / col("id")).filter(expr=col("r") > 0.6)
    assert inf.take_all() == [{"id": 0, "r": np.inf}, {"id": 1, "r": 1.0}]


def test_with_column_errors_at_the_call_before_any_work(client):
    ds = (
        di.from_pandas(mixed_frame(), npartitions=2).filter(expr="i > 3").select_columns(["i", "x"])
    )
    with pytest.raises(di.PlanError, match=r"no column 's'; the dataset has columns \['i', 'x'\]"):
        ds.with_column("y", col("s") + "!")
    with pytest.raises(di.PlanError, match="must be an expression"):
        ds.with_columns({"y": "x * 2"})
    with pytest.raises(di.PlanError, match="no column 'y'"):
        ds.with_columns({"y": col("x") * 2, "z": col("y") + 1})  # y does not exist yet
    assert ds.with_column("y", col("x") * 2).with_column("z", col("y") + 1).columns() == [
        "i",
        "x",
        "y",
        "z",
    ]


def test_select_columns_makes_columns_known_again(client):
    from daskinfer.expressions import col

    # after map_batches the plan cannot know the columns; select_columns names them
    ds = di.range(10).map_batches(lambda b: {"id": b["id"], "y": b["id"] * 2})
    assert ds._known_columns() is None
    picked = ds.select_columns(["id", "y"])
    assert picked.columns() == ["id", "y"]
    with pytest.raises(di.PlanError, match="no column 'nope'"):
        picked.with_column("z", col("nope") + 1)  # refused at the call, nothing run
    assert picked.with_column("z", col("y") + 1).take(1) == [{"id": 0, "y": 0, "z": 1}]
