"""Behaviour a Ray Data pipeline relies on when it is ported by changing the import.

Each test is a case where daskinfer used to differ from Ray Data in a way a port would
not see coming: values that changed type, batches Ray accepts and we refused, calls Ray
never makes, arguments kept but ignored. All run on a real two-worker Dask cluster.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import daskinfer as di


# --- values keep their types through rows --------------------------------------------
def test_datetime_rows_are_timestamps_and_a_row_map_keeps_the_column_type(client):
    when = pd.to_datetime(["2022-02-08 15:43:41", "2023-01-01 00:00:00", None]).astype(
        "datetime64[ns]"
    )
    df = pd.DataFrame({"ts": when, "gap": pd.to_timedelta([1, 2, 3], unit="s"), "i": [0, 1, 2]})
    rows = di.from_pandas(df).take(3)
    assert rows[0]["ts"] == pd.Timestamp("2022-02-08 15:43:41")
    assert isinstance(rows[0]["ts"], pd.Timestamp)
    assert rows[2]["ts"] is None
    assert rows[1]["gap"] == pd.Timedelta(seconds=2)

    out = di.from_pandas(df).map(lambda row: row).to_pandas()
    assert out["ts"].dtype.kind == "M", out.dtypes
    assert out["gap"].dtype.kind == "m", out.dtypes
    assert out["ts"].iloc[0] == pd.Timestamp("2022-02-08 15:43:41")
    assert pd.isna(out["ts"].iloc[2])


# --- batches Ray Data accepts --------------------------------------------------------
def ragged_ids(batch):
    return {"ids": [list(range(int(i))) for i in batch["id"]]}


def test_ragged_lists_from_map_batches_and_map(client):
    got = di.range(6, override_num_blocks=2).map_batches(ragged_ids, batch_size=4).take_all()
    assert [list(r["ids"]) for r in got] == [list(range(i)) for i in range(6)]

    rows = di.range(5).map(lambda r: {"ids": list(range(r["id"])), "id": r["id"]}).take_all()
    assert [list(r["ids"]) for r in rows] == [list(range(i)) for i in range(5)]
    # and they convert to Arrow as lists
    table = di.range(5).map_batches(ragged_ids).to_arrow()
    assert pa.types.is_list(table.schema.field("ids").type)
    assert table["ids"].to_pylist() == [list(range(i)) for i in range(5)]


def two_halves(batch):
    n = len(batch["id"])
    yield {"x": batch["id"][: n // 2] * 10}
    yield {"x": batch["id"][n // 2 :] * 10}


def test_a_batch_function_may_yield_its_output(client):
    ds = di.range(100, override_num_blocks=3).map_batches(two_halves, batch_size=16)
    assert [r["x"] for r in ds.take_all()] == [i * 10 for i in range(100)]


def fails_while_yielding(batch):
    yield {"x": batch["id"]}
    raise RuntimeError("the generator broke")


def test_an_error_raised_inside_a_generator_is_the_stages(client):
    with pytest.raises(di.UserCodeError, match="the generator broke"):
        di.range(10).map_batches(fails_while_yielding).take_all()


def test_batches_whose_arrays_differ_in_shape_across_blocks(client):
    rows = [{"x": np.zeros((2, 2))}] * 2 + [{"x": np.ones((3, 3))}] * 2
    ds = di.from_items(rows, npartitions=2)
    batches = list(ds.iter_batches(batch_size=3))
    assert [len(b["x"]) for b in batches] == [3, 1]
    assert [np.shape(v) for v in batches[0]["x"]] == [(2, 2), (2, 2), (3, 3)]
    assert batches[1]["x"][0].sum() == 9

    out = ds.map_batches(lambda b: b, batch_size=3).take_all()
    assert [r["x"].shape for r in out] == [(2, 2), (2, 2), (3, 3), (3, 3)]


# --- calls Ray Data never makes ------------------------------------------------------
def needs_rows(batch):
    assert len(batch["id"]), "called with an empty batch"
    return {"id": batch["id"], "y": batch["id"] + 1}


def test_no_rows_do_not_fail_a_function_that_needs_some(client):
    nothing = di.range(10).filter(lambda r: r["id"] > 100)
    assert nothing.map_batches(needs_rows).take_all() == []
    after_flat_map = di.range(10).flat_map(lambda r: []).map_batches(lambda b: {"y": b["id"]})
    assert after_flat_map.take_all() == []


def test_a_filter_that_keeps_nothing_keeps_the_columns(client):
    out = di.range(10).filter(lambda r: False).to_pandas()
    assert len(out) == 0
    assert list(out.columns) == ["id"]
    # a stage that does handle an empty batch still tells its columns
    added = di.range(10).filter(lambda r: False).map_batches(lambda b: {**b, "z": b["id"] * 2})
    assert list(added.to_pandas().columns) == ["id", "z"]


def double_in_place(df):
    df["x"] *= 2
    return df


def test_a_pandas_batch_edited_in_place_leaves_the_block_alone(client):
    mat = di.from_pandas(pd.DataFrame({"x": [1, 2, 3]})).materialize()
    doubled = mat.map_batches(double_in_place, batch_format="pandas").take_all()
    assert [r["x"] for r in doubled] == [2, 4, 6]
    assert [r["x"] for r in mat.take_all()] == [1, 2, 3]
    # twice over the same blocks: each run sees the original values
    assert [r["x"] for r in mat.map_batches(double_in_place, batch_format="pandas").take_all()] == [
        2,
        4,
        6,
    ]


# --- results gathered to the client --------------------------------------------------
def test_to_pandas_limit_is_a_guard_as_in_ray(client):
    ds = di.range(100, override_num_blocks=4)
    with pytest.raises(di.PlanError, match=r"more than 10 rows.*ds.limit\(10\).to_pandas"):
        ds.to_pandas(limit=10)
    assert len(ds.to_pandas(limit=100)) == 100
    assert ds.limit(10).to_pandas()["id"].tolist() == list(range(10))
    with pytest.raises(di.PlanError, match="limit=-1"):
        ds.to_pandas(limit=-1)


def test_take_batch_of_an_empty_dataset_raises(client):
    with pytest.raises(di.PlanError, match="empty"):
        di.range(10).filter(lambda r: False).take_batch()
    assert di.range(10).filter(lambda r: False).take(5) == []


def test_schema_of_object_columns_and_of_n_d_values(client, tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x00\x01")
    schema = di.read_binary_files(str(tmp_path)).schema()
    assert schema.field("bytes").type == pa.binary()

    images = di.from_items([{"img": np.zeros((2, 3), np.uint8)}] * 3).map(lambda r: r)
    field = images.schema().field("img")
    assert isinstance(field.type, pa.FixedShapeTensorType)
    assert field.type.shape == [2, 3]

    embedded = di.range(4).map_batches(lambda b: {"e": np.ones((len(b["id"]), 8), np.float32)})
    assert embedded.schema().field("e").type == pa.list_(pa.float32())


# --- pools and settings --------------------------------------------------------------
class AddOne:
    def __call__(self, batch):
        return {"id": batch["id"], "y": batch["id"] + 1}


def test_a_pool_with_only_a_min_size_has_no_maximum(client):
    strategy = di.ActorPoolStrategy(min_size=1)
    assert (strategy.min_size, strategy.max_size, strategy.initial_size) == (1, None, 1)
    ds = di.range(400, override_num_blocks=8).map_batches(AddOne, compute=strategy, batch_size=50)
    assert "actor pool 1..no max" in ds.explain()
    assert [r["y"] for r in ds.take_all()] == list(range(1, 401))


def test_a_pool_starts_with_its_initial_size(client):
    ds = di.range(100).map_batches(
        AddOne,
        compute=di.ActorPoolStrategy(min_size=1, max_size=2, initial_size=2),
        batch_size=50,
    )
    assert [r["y"] for r in ds.take_all()] == list(range(1, 101))
    (pool,) = [op for op in ds.stats().operators if op.kind == "actors"]
    assert pool.actors_started == 2


def test_concurrency_triple_is_min_max_initial(client):
    ds = di.range(100).map_batches(AddOne, concurrency=(1, 2, 2), batch_size=50)
    stage = ds._plan.ops[-1]
    assert (stage.pool_min, stage.pool_max, stage.pool_initial) == (1, 2, 2)
    assert [r["y"] for r in ds.take_all()] == list(range(1, 101))
    (pool,) = [op for op in ds.stats().operators if op.kind == "actors"]
    assert pool.actors_started == 2
    with pytest.raises(di.PlanError, match="between min_size"):
        di.range(10).map_batches(AddOne, concurrency=(1, 2, 3))
    with pytest.raises(di.PlanError, match=r"\(min, max, initial\)"):
        di.range(10).map_batches(AddOne, concurrency=(1, 2, 3, 4))


def test_data_context_refuses_settings_it_does_not_have(context):
    with pytest.raises(AttributeError, match="max_errored_rows"):
        context.max_errored_blocks = 10
    with pytest.raises(AttributeError, match=r"no setting 'preserve_ordr'.*preserve_order"):
        context.preserve_ordr = False
    context.execution_options.preserve_order = False
    assert context.preserve_order is False
    assert context.execution_options.preserve_order is False
    with pytest.raises(AttributeError, match="resource_limits"):
        context.execution_options.resource_limits = None


def test_zero_copy_batch_is_accepted(client):
    ds = di.range(10).map_batches(lambda b: b, zero_copy_batch=True)
    assert ds.count() == 10
    with pytest.raises(di.PlanError, match="zero_copy_batch"):
        di.range(10).map_batches(lambda b: b, zero_copy_batch="yes")


def test_schema_of_a_tensor_source_and_its_parquet(client, tmp_path):
    ds = di.from_numpy(np.zeros((4, 3, 2), np.float32))
    field = ds.schema().field("data")
    assert isinstance(field.type, pa.FixedShapeTensorType)
    assert (field.type.shape, field.type.permutation) == ([3, 2], None)
    ds.write_parquet(str(tmp_path / "nd"))
    # a plain pyarrow read of what we wrote builds its empty table too (dask does)
    import pyarrow.parquet as pq

    assert pq.read_table(str(tmp_path / "nd")).schema.empty_table().num_rows == 0
    assert di.read_parquet(str(tmp_path / "nd")).schema().field("data").type == field.type


def test_union_of_sources_in_order(client, tmp_path):
    a, b = di.range(5), di.from_items([{"id": 100, "x": 1.5}])
    c = di.range(3).materialize()
    both = a.union(b, c)
    rows = both.take_all()
    assert [r["id"] for r in rows] == [0, 1, 2, 3, 4, 100, 0, 1, 2]
    assert np.isnan(rows[0]["x"]) and rows[5]["x"] == 1.5  # a column one side lacks is null
    assert both.count() == 9
    assert [r["id"] for r in both.map_batches(lambda x: {"id": x["id"] * 2}).take_all()][-4:] == [
        200,
        0,
        2,
        4,
    ]
    with pytest.raises(di.PlanError, match="union them first"):
        a.map_batches(lambda x: x).union(b)
    # a union of files is read again from them: a resumable write of it works
    a.write_parquet(str(tmp_path / "a"))
    b.write_parquet(str(tmp_path / "b"))
    files = di.read_parquet(str(tmp_path / "a")).union(di.read_parquet(str(tmp_path / "b")))
    assert len(files.input_files()) == 2
    files.write_parquet(str(tmp_path / "out"), resume=True)
    assert sorted(di.read_parquet(str(tmp_path / "out")).to_pandas()["id"]) == [0, 1, 2, 3, 4, 100]
