"""Every Dataset verb on real data, checked against pandas/numpy, on a real cluster.

Each test uses the session ``client`` fixture (two worker processes, one thread each),
so batches really move between processes. Expected values are computed independently
with pandas or numpy, never with daskinfer.
"""

from __future__ import annotations

import gc
import random
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import dask.dataframe as dd

import daskinfer as di

N = 1000
FORMATS = ["numpy", "pandas", "pyarrow"]


def make_frame(n: int = N) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "i": np.arange(n, dtype="int64"),
            "x": rng.normal(size=n),
            "s": [f"row-{k}" for k in range(n)],
        }
    )


def assert_frame_values(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Same columns (in order), same values and row order; text compared as Python str."""
    assert list(got.columns) == list(want.columns)
    assert len(got) == len(want)
    for name in want.columns:
        g, w = got[name].to_numpy(), want[name].to_numpy()
        if w.dtype == object or g.dtype == object or w.dtype.kind in "OUS" or g.dtype.kind in "OUS":
            assert [str(v) for v in g] == [str(v) for v in w], name
        else:
            np.testing.assert_array_equal(g, w, err_msg=name)


@pytest.fixture(params=["default", "one-batch-per-task"])
def task_size(request):
    """Run a test with the default task size, and with one batch per task.

    By default a CPU task takes a bundle of many batches (``target_task_bytes``), so a
    small dataset runs in a few tasks; with a tiny target every batch is its own task,
    and tasks finish out of order on the two workers.
    """
    ctx = di.DataContext.get_current()
    old = ctx.target_task_bytes
    if request.param != "default":
        ctx.target_task_bytes = 1
    try:
        yield request.param
    finally:
        ctx.target_task_bytes = old


def blocks_of(ds: di.Dataset) -> list[pd.DataFrame]:
    """The dataset's output blocks, in order (whole blocks)."""
    return list(ds.iter_batches(batch_size=None, batch_format="pandas"))


# ---------------------------------------------------------------------- batch functions
# Top-level functions: workers unpickle them by reference.


def double_x(batch):
    """Works on every batch format: returns the same format it was given."""
    if isinstance(batch, pd.DataFrame):
        out = batch.copy()
        out["x"] = out["x"] * 2
        return out
    if isinstance(batch, pa.Table):
        import pyarrow.compute as pc

        return batch.set_column(batch.schema.get_field_index("x"), "x", pc.multiply(batch["x"], 2))
    return {**batch, "x": batch["x"] * 2}


def _as_pandas(batch) -> pd.DataFrame:
    if isinstance(batch, pd.DataFrame):
        return batch
    if isinstance(batch, pa.Table):
        return batch.to_pandas()
    assert isinstance(batch, dict), type(batch)
    return pd.DataFrame(batch)


def convert_to(batch, out_format: str, in_format: str):
    """Check the input format, compute i*10 and upper(s), return ``out_format``."""
    expected_type = {"numpy": dict, "pandas": pd.DataFrame, "pyarrow": pa.Table}[in_format]
    if not isinstance(batch, expected_type):
        raise TypeError(f"expected {expected_type.__name__}, got {type(batch).__name__}")
    df = _as_pandas(batch)
    i10 = df["i"].to_numpy() * 10
    upper = np.array([str(v).upper() for v in df["s"]], dtype=object)
    if out_format == "numpy":
        return {"i10": i10, "S": upper}
    out = pd.DataFrame({"i10": i10, "S": upper})
    if out_format == "pandas":
        return out
    return pa.Table.from_pandas(out, preserve_index=False)


def record_len(batch):
    """Return the batch's own length as a column, with the first id of the batch."""
    n = len(batch["i"])
    return {"i": batch["i"], "batch_len": np.full(n, n, dtype="int64")}


def keep_even(batch: pd.DataFrame) -> pd.DataFrame:
    return batch[batch["i"] % 2 == 0]


def explode3(batch: pd.DataFrame) -> pd.DataFrame:
    out = batch.loc[batch.index.repeat(3)].reset_index(drop=True)
    out["k"] = np.tile(np.arange(3), len(batch))
    return out


def sleepy_identity(batch):
    time.sleep(random.random() * 0.03)
    return batch


def drop_everything(batch: pd.DataFrame) -> pd.DataFrame:
    return batch.iloc[:0]


# ---------------------------------------------------------------------- creation


def test_from_items_dicts(client):
    items = [{"a": k, "b": f"v{k}", "c": k / 4} for k in range(120)]
    ds = di.from_items(items)
    want = pd.DataFrame.from_records(items)
    assert ds.count() == 120
    assert_frame_values(ds.to_pandas(), want)
    assert ds.take(3) == items[:3]
    assert ds.columns() == ["a", "b", "c"]


@pytest.mark.parametrize(
    "values",
    [list(range(57)), [f"s{k}" for k in range(33)], [0.5 * k for k in range(10)]],
    ids=["int", "str", "float"],
)
def test_from_items_plain_values(client, values):
    ds = di.from_items(values, npartitions=3)
    rows = ds.take_all()
    assert rows == [{"item": v} for v in values]
    assert ds.columns() == ["item"]
    got = ds.to_pandas()["item"].tolist()
    assert got == values


def test_from_numpy_1d(client):
    arr = np.arange(300, dtype="float32") * 1.5
    ds = di.from_numpy(arr, npartitions=4)
    assert ds.columns() == ["data"]
    batch = ds.take_batch(300)
    assert batch["data"].dtype == np.float32
    np.testing.assert_array_equal(batch["data"], arr)
    assert [r["data"] for r in ds.take(5)] == arr[:5].tolist()


def test_from_numpy_nd(client):
    arr = np.arange(50 * 3 * 4, dtype="int32").reshape(50, 3, 4)
    ds = di.from_numpy(arr, npartitions=4)
    rows = ds.take_all()
    assert len(rows) == 50
    for k, row in enumerate(rows):
        assert isinstance(row["data"], np.ndarray)
        assert row["data"].shape == (3, 4)
        np.testing.assert_array_equal(row["data"], arr[k])
    batch = ds.take_batch(50)
    assert batch["data"].shape == (50, 3, 4)
    assert batch["data"].dtype == np.int32
    np.testing.assert_array_equal(batch["data"], arr)
    # exact batches across the 4 blocks keep the N-D shape too
    batches = list(ds.iter_batches(batch_size=16))
    assert [b["data"].shape for b in batches] == [(16, 3, 4)] * 3 + [(2, 3, 4)]
    np.testing.assert_array_equal(np.concatenate([b["data"] for b in batches]), arr)


def test_from_numpy_nd_through_map_batches(client):
    arr = np.arange(40 * 2 * 2, dtype="float64").reshape(40, 2, 2)

    def add_one(batch):
        assert batch["data"].shape[1:] == (2, 2)
        return {"data": batch["data"] + 1}

    out = di.from_numpy(arr, npartitions=3).map_batches(add_one, batch_size=7).take_batch(40)
    np.testing.assert_array_equal(out["data"], arr + 1)


@pytest.mark.parametrize("batch_format", FORMATS)
def test_nd_values_in_every_format(client, batch_format):
    arr = np.arange(30 * 2 * 3, dtype="float32").reshape(30, 2, 3)
    ds = di.from_numpy(arr, npartitions=3)
    mapped = ds.map_batches(lambda b: b, batch_format=batch_format, batch_size=7)
    np.testing.assert_array_equal(mapped.take_batch(30)["data"], arr)
    for batch in ds.iter_batches(batch_size=30, batch_format=batch_format):
        if batch_format == "pyarrow":
            assert isinstance(batch.schema.field("data").type, pa.FixedShapeTensorType)
            np.testing.assert_array_equal(batch["data"].combine_chunks().to_numpy_ndarray(), arr)
        else:
            got = batch["data"]
            got = np.stack(got) if batch_format == "pandas" else got
            np.testing.assert_array_equal(got, arr)


def test_nd_values_to_arrow(client):
    arr = np.arange(10 * 2 * 2, dtype="int64").reshape(10, 2, 2)
    table = di.from_numpy(arr, npartitions=2).to_arrow()
    assert table.num_rows == 10
    np.testing.assert_array_equal(table["data"].combine_chunks().to_numpy_ndarray(), arr)


def test_from_pandas_one_frame(client):
    df = make_frame()
    ds = di.from_pandas(df)
    assert_frame_values(ds.to_pandas(), df)
    assert ds.count() == N


def test_from_pandas_list_of_frames(client):
    df = make_frame(300)
    parts = [df.iloc[:100], df.iloc[100:130], df.iloc[130:]]
    ds = di.from_pandas(parts)
    blocks = blocks_of(ds)
    assert [len(b) for b in blocks] == [100, 30, 170]
    assert_frame_values(ds.to_pandas(), df)


def test_from_pandas_npartitions(client):
    df = make_frame()
    ds = di.from_pandas(df, npartitions=7)
    blocks = blocks_of(ds)
    assert len(blocks) == 7
    assert sum(len(b) for b in blocks) == N
    assert_frame_values(pd.concat(blocks, ignore_index=True), df)


def test_from_pandas_keeps_index_out(client):
    df = make_frame(50)
    df.index = np.arange(1000, 1050)
    out = di.from_pandas(df, npartitions=2).to_pandas()
    assert isinstance(out.index, pd.RangeIndex)
    assert_frame_values(out, df.reset_index(drop=True))


def test_from_arrow(client):
    df = make_frame(200)
    table = pa.Table.from_pandas(df, preserve_index=False)
    ds = di.from_arrow(table)
    assert_frame_values(ds.to_pandas(), df)
    got = ds.to_arrow()
    assert got.column_names == table.column_names
    assert got["i"].to_pylist() == table["i"].to_pylist()
    assert got["s"].to_pylist() == table["s"].to_pylist()
    # a list of tables, one block each
    ds2 = di.from_arrow([table.slice(0, 50), table.slice(50)])
    assert [len(b) for b in blocks_of(ds2)] == [50, 150]
    assert_frame_values(ds2.to_pandas(), df)


def test_from_dask(client):
    df = make_frame(400)
    frame = dd.from_pandas(df, npartitions=5, sort=False)
    ds = di.from_dask(frame)
    blocks = blocks_of(ds)
    assert len(blocks) == 5
    assert_frame_values(ds.to_pandas(), df)


def test_from_dask_with_graph(client):
    """A dask frame with its own computation (not just from_pandas) runs correctly."""
    df = make_frame(400)
    frame = dd.from_pandas(df, npartitions=4, sort=False)
    frame = frame.assign(y=frame["x"] * 3 + frame["i"])
    out = di.from_dask(frame).to_pandas()
    want = df.assign(y=df["x"] * 3 + df["i"])
    assert_frame_values(out, want)


def test_from_dask_of_a_persisted_frame(client):
    """``df.persist()``, the usual way to keep a dask frame in memory: its graph maps
    keys to futures, which the reads receive as dependencies (it failed with "missing
    keys" before 2026-12-07)."""
    df = make_frame(400)
    frame = dd.from_pandas(df, npartitions=4, sort=False)
    persisted = client.persist(frame.assign(y=frame["i"] * 2))
    ds = di.from_dask(persisted)
    assert_frame_values(ds.to_pandas(), df.assign(y=df["i"] * 2))
    doubled = ds.map_batches(lambda b: {"y": b["y"] * 2}, batch_size=64).to_pandas()
    assert doubled["y"].tolist() == (df["i"] * 4).tolist()
    # a frame computed from the persisted one reads the futures through its own tasks
    evens = di.from_dask(persisted[persisted["i"] % 2 == 0]).to_pandas()
    assert evens["i"].tolist() == df["i"][df["i"] % 2 == 0].tolist()
    del persisted


def test_range(client):
    ds = di.range(1234)
    assert ds.count() == 1234
    out = ds.to_pandas()
    assert list(out.columns) == ["id"]
    assert out["id"].dtype == np.int64
    np.testing.assert_array_equal(out["id"].to_numpy(), np.arange(1234))
    schema = ds.schema()
    assert schema.names == ["id"]
    assert schema.field("id").type == pa.int64()


def test_range_blocks(client):
    ds = di.range(100, override_num_blocks=4)
    blocks = blocks_of(ds)
    assert [len(b) for b in blocks] == [25, 25, 25, 25]
    np.testing.assert_array_equal(pd.concat(blocks)["id"].to_numpy(), np.arange(100))


def test_range_zero(client):
    ds = di.range(0)
    assert ds.count() == 0
    assert ds.take_all() == []
    assert len(ds.to_pandas()) == 0


# ---------------------------------------------------------------------- transformations


@pytest.mark.parametrize("in_format", FORMATS)
@pytest.mark.parametrize("out_format", FORMATS)
def test_map_batches_formats(client, in_format, out_format):
    df = make_frame(500)
    ds = di.from_pandas(df, npartitions=3).map_batches(
        convert_to,
        batch_format=in_format,
        batch_size=64,
        fn_kwargs={"out_format": out_format, "in_format": in_format},
    )
    want = pd.DataFrame({"i10": df["i"] * 10, "S": [s.upper() for s in df["s"]]})
    assert_frame_values(ds.to_pandas(), want)


@pytest.mark.parametrize("batch_format", FORMATS)
def test_map_batches_same_format_roundtrip(client, batch_format):
    df = make_frame(300)
    out = (
        di.from_pandas(df, npartitions=2)
        .map_batches(double_x, batch_format=batch_format, batch_size=50)
        .to_pandas()
    )
    want = df.assign(x=df["x"] * 2)
    assert_frame_values(out, want)


def test_map_batches_fn_args(client):
    def affine(batch, a, *, b):
        return {"y": batch["id"] * a + b}

    out = di.range(100).map_batches(affine, fn_args=(3,), fn_kwargs={"b": 7}).to_pandas()
    np.testing.assert_array_equal(out["y"].to_numpy(), np.arange(100) * 3 + 7)


def test_map(client):
    df = make_frame(200)

    def fn(row):
        return {"i": row["i"], "label": f"{row['s']}!", "x2": row["x"] ** 2}

    out = di.from_pandas(df, npartitions=3).map(fn).to_pandas()
    want = pd.DataFrame({"i": df["i"], "label": df["s"] + "!", "x2": df["x"] ** 2})
    assert_frame_values(out[["i", "label"]], want[["i", "label"]])
    np.testing.assert_allclose(out["x2"].to_numpy(dtype=float), want["x2"].to_numpy())


def test_filter(client):
    df = make_frame()
    out = (
        di.from_pandas(df, npartitions=5)
        .filter(lambda r: r["i"] % 3 == 0 and r["x"] > 0)
        .to_pandas()
    )
    want = df[(df["i"] % 3 == 0) & (df["x"] > 0)].reset_index(drop=True)
    assert_frame_values(out, want)


def test_flat_map(client):
    df = make_frame(100)

    def fn(row):
        return [{"i": row["i"], "k": k} for k in range(row["i"] % 3)]

    out = di.from_pandas(df, npartitions=4).flat_map(fn).to_pandas()
    want = pd.DataFrame([{"i": i, "k": k} for i in df["i"] for k in range(i % 3)])
    assert_frame_values(out, want)


def test_add_column(client):
    df = make_frame(300)
    ds = di.from_pandas(df, npartitions=3).add_column("y", lambda b: b["x"] * 2 + b["i"])
    out = ds.to_pandas()
    want = df.assign(y=df["x"] * 2 + df["i"])
    assert_frame_values(out, want)
    assert ds.columns() == ["i", "x", "s", "y"]
    # numpy format, replacing an existing column keeps its place
    ds2 = di.from_pandas(df, npartitions=3).add_column(
        "i", lambda b: b["i"] + 1, batch_format="numpy"
    )
    assert_frame_values(ds2.to_pandas(), df.assign(i=df["i"] + 1))


def test_select_drop_rename(client):
    df = make_frame(200)
    ds = di.from_pandas(df, npartitions=3)
    assert_frame_values(ds.select_columns(["s", "i"]).to_pandas(), df[["s", "i"]])
    assert_frame_values(ds.select_columns("x").to_pandas(), df[["x"]])
    assert_frame_values(ds.drop_columns(["x"]).to_pandas(), df.drop(columns=["x"]))
    renamed = ds.rename_columns({"i": "idx", "s": "text"})
    assert renamed.columns() == ["idx", "x", "text"]
    assert_frame_values(renamed.to_pandas(), df.rename(columns={"i": "idx", "s": "text"}))
    with pytest.raises(di.PlanError, match="nope"):
        ds.select_columns(["nope"])


def test_repartition(client):
    df = make_frame()
    ds = di.from_pandas(df, npartitions=7).repartition(3)
    blocks = blocks_of(ds)
    assert [len(b) for b in blocks] == [334, 333, 333]
    assert_frame_values(pd.concat(blocks, ignore_index=True), df)
    mat = ds.materialize()
    assert [len(b) for b in blocks_of(mat)] == [334, 333, 333]
    del mat
    gc.collect()  # see test_materialized_blocks_freed_without_gc


def test_repartition_more_blocks(client):
    df = make_frame(100)
    blocks = blocks_of(di.from_pandas(df, npartitions=2).repartition(8))
    assert len(blocks) == 8
    assert sum(len(b) for b in blocks) == 100
    assert_frame_values(pd.concat(blocks, ignore_index=True), df)


def test_repartition_after_map_batches(client):
    df = make_frame(500)
    ds = di.from_pandas(df, npartitions=5).map_batches(
        double_x, batch_size=33, batch_format="pandas"
    )
    blocks = blocks_of(ds.repartition(2))
    assert [len(b) for b in blocks] == [250, 250]
    assert_frame_values(pd.concat(blocks, ignore_index=True), df.assign(x=df["x"] * 2))


@pytest.mark.parametrize("n", [0, 1, 150, 999, 1000, 5000])
def test_limit(client, n):
    df = make_frame()
    ds = di.from_pandas(df, npartitions=7).limit(n)
    out = ds.to_pandas()
    assert len(out) == min(n, N)
    if n:
        assert_frame_values(out, df.iloc[:n].reset_index(drop=True))
    assert ds.count() == min(n, N)


def test_limit_after_map_batches(client, task_size):
    df = make_frame()
    ds = di.from_pandas(df, npartitions=4).map_batches(record_len, batch_size=100).limit(250)
    out = ds.to_pandas()
    np.testing.assert_array_equal(out["i"].to_numpy(), np.arange(250))


def test_chained_limits_and_take(client):
    ds = di.range(500, override_num_blocks=5).limit(300).limit(120)
    assert ds.count() == 120
    assert [r["id"] for r in ds.take(5)] == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------- batch sizes


def test_exact_batch_size_across_blocks(client, task_size):
    df = make_frame()
    ds = di.from_pandas(df, npartitions=7).map_batches(record_len, batch_size=64)
    out = ds.to_pandas()
    if task_size != "default":
        assert "16 tasks" in str(ds.stats())  # one task per batch
    np.testing.assert_array_equal(out["i"].to_numpy(), df["i"].to_numpy())
    # one value of batch_len per batch, in order
    sizes = _batch_sizes(out["batch_len"].to_numpy())
    assert sizes == [64] * (N // 64) + [N % 64]


def _batch_sizes(batch_len: np.ndarray) -> list[int]:
    sizes, pos = [], 0
    while pos < len(batch_len):
        n = int(batch_len[pos])
        assert (batch_len[pos : pos + n] == n).all()
        sizes.append(n)
        pos += n
    return sizes


def test_batch_size_none_is_whole_blocks(client):
    df = make_frame()
    ds = di.from_pandas(df, npartitions=7).map_batches(record_len, batch_size=None)
    out = ds.to_pandas()
    want_sizes = [len(p) for p in np.array_split(np.arange(N), 7)]
    sizes = _batch_sizes(out["batch_len"].to_numpy())
    assert sizes == want_sizes


def test_batch_size_larger_than_data(client):
    out = (
        di.range(100, override_num_blocks=3)
        .map_batches(lambda b: {"n": np.full(len(b["id"]), len(b["id"]))}, batch_size=1000)
        .to_pandas()
    )
    assert out["n"].tolist() == [100] * 100


def test_two_batch_sizes_in_a_row(client, task_size):
    df = make_frame()
    ds = (
        di.from_pandas(df, npartitions=3)
        .map_batches(record_len, batch_size=100)
        .map_batches(
            lambda b: {**b, "second_len": np.full(len(b["i"]), len(b["i"]))}, batch_size=37
        )
    )
    out = ds.to_pandas()
    np.testing.assert_array_equal(out["i"].to_numpy(), np.arange(N))
    assert _batch_sizes(out["batch_len"].to_numpy()) == [100] * 10
    assert _batch_sizes(out["second_len"].to_numpy()) == [37] * (N // 37) + [N % 37]


def test_fewer_rows_then_batch_size(client, task_size):
    df = make_frame()
    ds = (
        di.from_pandas(df, npartitions=6)
        .map_batches(keep_even, batch_size=90, batch_format="pandas")
        .map_batches(record_len, batch_size=64)
    )
    out = ds.to_pandas()
    want = df[df["i"] % 2 == 0].reset_index(drop=True)
    np.testing.assert_array_equal(out["i"].to_numpy(), want["i"].to_numpy())
    assert _batch_sizes(out["batch_len"].to_numpy()) == [64] * (500 // 64) + [500 % 64]
    assert ds.count() == 500


def test_more_rows_then_batch_size(client, task_size):
    df = make_frame(300)
    ds = (
        di.from_pandas(df, npartitions=4)
        .map_batches(explode3, batch_size=50, batch_format="pandas")
        .map_batches(record_len, batch_size=128)
    )
    out = ds.to_pandas()
    want = df.loc[df.index.repeat(3)].reset_index(drop=True)
    np.testing.assert_array_equal(out["i"].to_numpy(), want["i"].to_numpy())
    assert _batch_sizes(out["batch_len"].to_numpy()) == [128] * 7 + [900 - 7 * 128]
    full = (
        di.from_pandas(df, npartitions=4)
        .map_batches(explode3, batch_size=50, batch_format="pandas")
        .to_pandas()
    )
    want_full = want.assign(k=np.tile(np.arange(3), 300))
    assert_frame_values(full, want_full)


def test_empty_frame_through_verbs(client, tmp_path):
    empty = pd.DataFrame({"i": pd.Series([], dtype="int64"), "x": pd.Series([], dtype="float64")})
    ds = di.from_pandas(empty).map_batches(double_x, batch_size=10)
    assert ds.count() == 0
    out = ds.to_pandas()
    assert len(out) == 0
    assert ds.take() == []
    assert ds.take_all() == []
    assert list(ds.iter_batches(batch_size=4)) == []
    paths = ds.write_parquet(str(tmp_path / "out"))
    assert paths == []


def test_filter_drops_everything(client, tmp_path):
    df = make_frame(300)
    ds = di.from_pandas(df, npartitions=3).filter(lambda r: False)
    assert ds.count() == 0
    assert ds.take(5) == []
    assert len(ds.to_pandas()) == 0
    mapped = ds.map_batches(record_len, batch_size=16)
    assert mapped.count() == 0
    assert len(mapped.to_pandas()) == 0
    assert ds.write_parquet(str(tmp_path / "out")) == []


def test_empty_result_keeps_its_columns(client):
    empty = pd.DataFrame({"i": pd.Series([], dtype="int64"), "x": pd.Series([], dtype="float64")})
    ds = di.from_pandas(empty).map_batches(double_x, batch_size=10)
    assert list(ds.to_pandas().columns) == ["i", "x"]
    assert ds.schema().names == ["i", "x"]


def test_empty_result_of_fused_stage_keeps_its_columns(client):
    """A filter fused into the source: the last stage's empty block keeps the columns."""
    df = make_frame(300)
    ds = di.from_pandas(df, npartitions=3).filter(lambda r: False)
    out = ds.to_pandas()
    assert list(out.columns) == ["i", "x", "s"]
    assert len(out) == 0
    assert ds.columns() == ["i", "x", "s"]


def test_map_batches_drops_everything(client):
    df = make_frame(300)
    ds = di.from_pandas(df, npartitions=3).map_batches(
        drop_everything, batch_size=40, batch_format="pandas"
    )
    assert ds.count() == 0
    out = ds.to_pandas()
    assert len(out) == 0
    mapped = ds.map_batches(record_len, batch_size=16)
    assert mapped.take_all() == []


# ---------------------------------------------------------------------- consumption


def test_show(client, capsys):
    di.from_items([{"a": k, "b": f"t{k}"} for k in range(30)]).show(3)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [str({"a": k, "b": f"t{k}"}) for k in range(3)]


def test_take(client):
    df = make_frame()
    ds = di.from_pandas(df, npartitions=7)
    rows = ds.take(5)
    assert rows == df.iloc[:5].to_dict("records")
    assert len(ds.take()) == 20
    assert len(ds.take(5000)) == N


@pytest.mark.parametrize("batch_format", FORMATS)
def test_take_batch(client, batch_format):
    df = make_frame()
    batch = di.from_pandas(df, npartitions=7).take_batch(200, batch_format=batch_format)
    if batch_format == "numpy":
        assert isinstance(batch, dict)
        assert list(batch) == ["i", "x", "s"]
        got = pd.DataFrame(batch)
    elif batch_format == "pandas":
        assert isinstance(batch, pd.DataFrame)
        got = batch
    else:
        assert isinstance(batch, pa.Table)
        got = batch.to_pandas()
    assert_frame_values(got, df.iloc[:200])


def test_take_all(client):
    df = make_frame(100)
    ds = di.from_pandas(df, npartitions=3)
    assert ds.take_all() == df.to_dict("records")
    assert ds.take_all(limit=100) == df.to_dict("records")
    with pytest.raises(di.PlanError, match="more than 99 rows"):
        ds.take_all(limit=99)


@pytest.mark.parametrize("batch_size", [1, 64, 333, 1000, 4096])
def test_iter_batches_exact(client, batch_size):
    df = make_frame()
    batches = list(di.from_pandas(df, npartitions=7).iter_batches(batch_size=batch_size))
    sizes = [len(b["i"]) for b in batches]
    full, rest = divmod(N, batch_size)
    assert sizes == [batch_size] * full + ([rest] if rest else [])
    np.testing.assert_array_equal(np.concatenate([b["i"] for b in batches]), df["i"].to_numpy())


def test_iter_batches_drop_last(client):
    df = make_frame()
    batches = list(di.from_pandas(df, npartitions=7).iter_batches(batch_size=64, drop_last=True))
    assert [len(b["i"]) for b in batches] == [64] * (N // 64)
    np.testing.assert_array_equal(
        np.concatenate([b["i"] for b in batches]), np.arange(64 * (N // 64))
    )


def test_iter_batches_none(client):
    df = make_frame()
    batches = list(di.from_pandas(df, npartitions=7).iter_batches(batch_size=None))
    assert [len(b["i"]) for b in batches] == [len(p) for p in np.array_split(np.arange(N), 7)]


@pytest.mark.parametrize("batch_format", FORMATS)
def test_iter_batches_formats(client, batch_format):
    df = make_frame(500)
    batches = list(
        di.from_pandas(df, npartitions=3).iter_batches(batch_size=128, batch_format=batch_format)
    )
    typ = {"numpy": dict, "pandas": pd.DataFrame, "pyarrow": pa.Table}[batch_format]
    assert all(isinstance(b, typ) for b in batches)
    assert_frame_values(pd.concat([_as_pandas(b) for b in batches], ignore_index=True), df)


@pytest.mark.parametrize("prefetch", [0, 3])
def test_iter_batches_prefetch(client, prefetch):
    df = make_frame()
    batches = list(
        di.from_pandas(df, npartitions=7).iter_batches(batch_size=100, prefetch_batches=prefetch)
    )
    assert [len(b["i"]) for b in batches] == [100] * 10
    np.testing.assert_array_equal(np.concatenate([b["i"] for b in batches]), np.arange(N))


def test_iter_batches_stop_early(client):
    """Leaving the loop early stops the run and frees everything (fixture checks)."""
    ds = di.from_pandas(make_frame(), npartitions=7).map_batches(record_len, batch_size=10)
    it = ds.iter_batches(batch_size=10)
    first = next(it)
    assert first["i"].tolist() == list(range(10))
    it.close()


def test_iter_rows(client):
    df = make_frame(150)
    rows = list(di.from_pandas(df, npartitions=4).iter_rows())
    assert rows == df.to_dict("records")


def test_iter_torch_batches(client):
    import torch  # a test dependency: its absence must fail, not skip

    df = make_frame(300)
    df["f"] = np.linspace(0, 1, 300).astype("float32")
    ds = di.from_pandas(df, npartitions=3)
    batches = list(ds.iter_torch_batches(batch_size=128))
    assert [len(b["i"]) for b in batches] == [128, 128, 44]
    first = batches[0]
    assert isinstance(first["i"], torch.Tensor) and first["i"].dtype == torch.int64
    assert isinstance(first["x"], torch.Tensor) and first["x"].dtype == torch.float64
    assert first["f"].dtype == torch.float32
    assert isinstance(first["s"], np.ndarray)
    assert list(first["s"][:2]) == ["row-0", "row-1"]
    np.testing.assert_array_equal(torch.cat([b["i"] for b in batches]).numpy(), df["i"].to_numpy())
    np.testing.assert_allclose(torch.cat([b["x"] for b in batches]).numpy(), df["x"].to_numpy())

    one = next(iter(ds.iter_torch_batches(batch_size=64, dtypes=torch.float32)))
    assert one["i"].dtype == torch.float32 and one["x"].dtype == torch.float32
    per_col = next(iter(ds.iter_torch_batches(batch_size=64, dtypes={"x": torch.float16})))
    assert per_col["x"].dtype == torch.float16 and per_col["i"].dtype == torch.int64
    collated = next(iter(ds.iter_torch_batches(batch_size=10, collate_fn=lambda b: len(b["i"]))))
    assert collated == 10


def test_iter_torch_batches_nd(client):
    import torch  # a test dependency: its absence must fail, not skip

    arr = np.arange(20 * 3 * 2, dtype="float32").reshape(20, 3, 2)
    batches = list(di.from_numpy(arr, npartitions=3).iter_torch_batches(batch_size=8))
    assert [tuple(b["data"].shape) for b in batches] == [(8, 3, 2), (8, 3, 2), (4, 3, 2)]
    np.testing.assert_array_equal(torch.cat([b["data"] for b in batches]).numpy(), arr)


def test_to_pandas_and_to_arrow(client):
    df = make_frame(400)
    ds = di.from_pandas(df, npartitions=4).map_batches(double_x, batch_size=70)
    want = df.assign(x=df["x"] * 2)
    assert_frame_values(ds.to_pandas(), want)
    table = ds.to_arrow()
    assert isinstance(table, pa.Table)
    assert table.num_rows == 400
    assert table.column_names == ["i", "x", "s"]
    assert table["i"].to_pylist() == want["i"].tolist()
    np.testing.assert_allclose(table["x"].to_numpy(), want["x"].to_numpy())
    assert table["s"].to_pylist() == want["s"].tolist()
    assert_frame_values(ds.limit(17).to_pandas(), want.iloc[:17])


def test_to_dask(client):
    df = make_frame(400)
    ds = di.from_pandas(df, npartitions=4).map_batches(double_x, batch_size=64)
    frame = ds.to_dask()
    assert isinstance(frame, dd.DataFrame)
    out = frame.compute().reset_index(drop=True)
    assert_frame_values(out, df.assign(x=df["x"] * 2))
    assert len(frame.columns) == 3
    del frame


def test_to_dask_nd_values(client):
    arr = np.arange(30 * 2 * 3, dtype="int16").reshape(30, 2, 3)
    frame = di.from_numpy(arr, npartitions=3).to_dask()
    out = frame.compute()
    assert len(out) == 30
    for k, value in enumerate(out["data"]):
        assert isinstance(value, np.ndarray), type(value)
        np.testing.assert_array_equal(value, arr[k])
    del frame


def test_to_dask_and_back_with_an_nd_output_column(client):
    # a stage's N-D output is a tensor column: dask computes over it, and it comes back
    # (from_dask of a to_dask() frame failed before 2026-12-06: its graph reads futures)
    def embed(batch):
        ids = batch["id"].astype("float32")
        return {"id": batch["id"], "emb": np.stack([ids, ids * 2, ids * 3], axis=1)}

    frame = di.range(40, override_num_blocks=4).map_batches(embed, batch_size=16).to_dask()
    assert str(frame.dtypes["emb"]) == "tensor[float32,(3)]"
    out = frame.compute().reset_index(drop=True)
    np.testing.assert_array_equal(out["emb"].array.values[:, 2], np.arange(40) * 3)
    assert frame.map_partitions(len).compute().sum() == 40
    # the way round for verbs daskinfer leaves to dask: to_dask(), dask, from_dask();
    # the frame reads results held on the cluster (its partitions' graphs end there)
    batch = di.from_dask(frame).take_batch(40)
    assert batch["emb"].shape == (40, 3) and batch["emb"].dtype == np.float32
    np.testing.assert_array_equal(batch["emb"][:, 1], np.arange(40) * 2)
    evens = di.from_dask(frame[frame["id"] % 2 == 0]).map_batches(lambda b: {"id": b["id"] + 1})
    assert sorted(r["id"] for r in evens.take_all()) == list(range(1, 40, 2))
    del frame


def test_from_items_with_array_values(client):
    items = [{"k": k, "vec": np.full(4, k, dtype="float32")} for k in range(25)]
    batch = di.from_items(items, npartitions=2).take_batch(25)
    assert batch["vec"].shape == (25, 4)
    np.testing.assert_array_equal(batch["vec"], np.stack([it["vec"] for it in items]))
    np.testing.assert_array_equal(batch["k"], np.arange(25))


def test_count(client):
    df = make_frame()
    assert di.from_pandas(df, npartitions=7).count() == N
    assert di.from_pandas(df, npartitions=7).filter(lambda r: r["i"] < 77).count() == 77
    assert (
        di.from_pandas(df, npartitions=7)
        .map_batches(explode3, batch_format="pandas", batch_size=100)
        .count()
        == 3 * N
    )


def test_schema(client):
    df = make_frame(100)
    ds = di.from_pandas(df, npartitions=2)
    schema = ds.schema()
    assert isinstance(schema, pa.Schema)
    assert schema.names == ["i", "x", "s"]
    assert schema.field("i").type == pa.int64()
    assert schema.field("x").type == pa.float64()
    assert schema.field("s").type in (pa.string(), pa.large_string())
    mapped = ds.map_batches(convert_to, fn_kwargs={"out_format": "numpy", "in_format": "numpy"})
    schema2 = mapped.schema()
    assert schema2.names == ["i10", "S"]
    assert schema2.field("i10").type == pa.int64()
    assert schema2.field("S").type in (pa.string(), pa.large_string())


def test_columns(client):
    df = make_frame(100)
    ds = di.from_pandas(df, npartitions=2)
    assert ds.columns() == ["i", "x", "s"]
    assert ds.drop_columns("x").columns() == ["i", "s"]
    assert ds.map_batches(record_len).columns() == ["i", "batch_len"]


def test_materialize(client):
    df = make_frame()
    calls = di.from_pandas(df, npartitions=5).map_batches(double_x, batch_size=128)
    mat = calls.materialize()
    want = df.assign(x=df["x"] * 2)
    first = mat.to_pandas()
    second = mat.to_pandas()
    assert_frame_values(first, want)
    assert_frame_values(second, want)
    assert mat.count() == N
    assert mat.take(3) == want.iloc[:3].to_dict("records")
    # transformations on a materialized dataset
    assert_frame_values(
        mat.map_batches(double_x, batch_size=300).to_pandas(), df.assign(x=df["x"] * 4)
    )
    assert_frame_values(mat.filter(lambda r: r["i"] < 10).to_pandas(), want.iloc[:10])
    assert mat.schema().names == ["i", "x", "s"]
    del mat
    gc.collect()  # see test_materialized_blocks_freed_without_gc


def _scheduler_tasks(client) -> int:
    return client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))


def test_materialized_blocks_freed_without_gc(client):
    mat = di.from_pandas(make_frame(), npartitions=7).materialize()
    gc.disable()
    try:
        assert mat.count() == N  # runs an executor over the materialized blocks
        del mat
        deadline = time.monotonic() + 3
        while _scheduler_tasks(client) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _scheduler_tasks(client) == 0, "blocks still held after the Dataset was deleted"
    finally:
        gc.enable()
        gc.collect()


def test_stats_mentions_stages(client):
    ds = di.from_pandas(make_frame(), npartitions=3).map_batches(record_len, batch_size=64)
    assert "not been executed" in str(ds.stats())
    ds.to_pandas()
    stats = str(ds.stats())
    assert "MapBatches(record_len)" in stats
    assert "FromPandas" in stats
    assert f"{N} rows out" in stats
    ds2 = di.from_pandas(make_frame(), npartitions=3).filter(lambda r: True).map_batches(record_len)
    ds2.count()
    assert "Filter(<lambda>)" in str(ds2.stats())


# ---------------------------------------------------------------------- order


def test_order_preserved_with_random_sleeps(client, task_size):
    df = make_frame()
    ds = (
        di.from_pandas(df, npartitions=10)
        .map_batches(sleepy_identity, batch_size=25, batch_format="pandas")
        .map_batches(sleepy_identity, batch_size=None, batch_format="pandas")
    )
    out = ds.to_pandas()
    assert_frame_values(out, df)
    if task_size != "default":
        # 40 batches, each its own task, finishing out of order on two workers
        assert "MapBatches(sleepy_identity)->MapBatches(sleepy_identity): 40 tasks" in str(
            ds.stats()
        )
    rows = [r["i"] for r in ds.iter_rows()]
    assert rows == list(range(N))


def test_order_preserved_by_row_verbs(client, task_size):
    df = make_frame()
    ds = (
        di.from_pandas(df, npartitions=9)
        .map_batches(sleepy_identity, batch_size=31, batch_format="pandas")
        .filter(lambda r: r["i"] % 7 != 0)
        .map(lambda r: {"i": r["i"]})
    )
    assert ds.to_pandas()["i"].tolist() == [i for i in range(N) if i % 7 != 0]


# ---------------------------------------------------------------------- errors


def explode_late(batch):
    if batch["i"][0] >= 800:
        raise ValueError(f"boom at row {batch['i'][0]}")
    return batch


def test_user_error(client):
    ds = di.from_pandas(make_frame(), npartitions=5).map_batches(explode_late, batch_size=100)
    with pytest.raises(di.UserCodeError) as info:
        ds.to_pandas()
    message = str(info.value)
    assert "MapBatches(explode_late)" in message
    assert "boom at row 800" in message
    assert "ValueError" in message
    assert "explode_late" in message and "raise ValueError" in message  # the worker traceback
    assert info.value.stage == "MapBatches(explode_late)"


def test_user_error_in_row_verb(client):
    def bad(row):
        if row["i"] == 321:
            raise KeyError("no such thing")
        return row

    ds = di.from_pandas(make_frame(), npartitions=5).map(bad)
    with pytest.raises(di.UserCodeError, match="Map\\(bad\\)") as info:
        ds.count()
    assert "no such thing" in str(info.value)


def test_unequal_columns_error(client):
    ds = di.range(10).map_batches(lambda b: {"a": b["id"], "b": b["id"][:3]})
    with pytest.raises(di.UserCodeError, match="unequal length") as info:
        ds.to_pandas()
    assert "MapBatches(<lambda>)" in str(info.value)


def test_add_column_wrong_length_error(client):
    ds = di.range(10).add_column("y", lambda b: [1, 2])
    with pytest.raises(di.UserCodeError, match=r"AddColumn\(y\).*2 values for a batch of 10 rows"):
        ds.to_pandas()


def test_row_fn_returning_non_dict_error(client):
    ds = di.range(10).map(lambda r: r["id"])
    with pytest.raises(di.UserCodeError, match="returned int"):
        ds.take_all()


class AddOffset:
    """A callable class run in an actor pool: built once per actor."""

    def __init__(self, offset):
        import os

        self.offset = offset
        self.pid = os.getpid()

    def __call__(self, batch):
        return {
            "i": batch["i"],
            "y": batch["i"] + self.offset,
            "pid": np.full(len(batch["i"]), self.pid),
        }


def test_map_batches_actor_pool(client):
    df = make_frame()
    ds = di.from_pandas(df, npartitions=5).map_batches(
        AddOffset,
        batch_size=50,
        compute=di.ActorPoolStrategy(size=2),
        fn_constructor_args=(1000,),
    )
    out = ds.to_pandas()
    np.testing.assert_array_equal(out["i"].to_numpy(), np.arange(N))
    np.testing.assert_array_equal(out["y"].to_numpy(), np.arange(N) + 1000)
    worker_pids = set(client.run(lambda: __import__("os").getpid()).values())
    assert set(out["pid"]) <= worker_pids  # ran on the workers, never on the client


def test_bad_return_type(client):
    ds = di.range(10).map_batches(lambda b: 42)
    with pytest.raises(di.UserCodeError, match="returned int"):
        ds.take_all()
