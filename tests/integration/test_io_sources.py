"""Ray Data's non-file sources on a real cluster: ``from_huggingface`` and ``read_sql``."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import sqlite3
import uuid
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

import daskinfer as di
from daskinfer.io.sql import SQL_DEFAULT_SHARDS

# ---------------------------------------------------------------- from_huggingface


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(12, dtype=np.uint8).reshape(2, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def _features_dataset(n: int = 6) -> datasets.Dataset:
    """A dataset of the features Ray passes through as stored (Image, Audio, ClassLabel ...)."""
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["neg", "pos"]),
            "ints": datasets.Sequence(datasets.Value("int32")),
            "fixed": datasets.Sequence(datasets.Value("float32"), length=3),
            "arr": datasets.Array2D(shape=(2, 2), dtype="float32"),
            "ragged": datasets.Array2D(shape=(None, 2), dtype="int64"),
            "nested": {"a": datasets.Value("int64"), "b": datasets.Value("string")},
            "image": datasets.Image(),
            "maybe": datasets.Value("float64"),
        }
    )
    png = _png()
    hf = datasets.Dataset.from_dict(
        {
            "text": [f"t{i}" for i in range(n)],
            "label": [i % 2 for i in range(n)],
            "ints": [list(range(i)) for i in range(n)],
            "fixed": [[i, i, i] for i in range(n)],
            "arr": [np.full((2, 2), i, dtype="float32") for i in range(n)],
            "ragged": [np.full((i % 3 + 1, 2), i) for i in range(n)],
            "nested": [{"a": i, "b": str(i)} for i in range(n)],
            "image": [{"bytes": png, "path": None}] * n,
            "maybe": [None if i % 3 == 0 else float(i) for i in range(n)],
        },
        features=features,
    )
    # an Audio column as stored; datasets encodes audio only with torchcodec installed
    audio_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    audio = pa.array([{"bytes": b"RIFF", "path": f"a{i}.wav"} for i in range(n)], audio_type)
    features["audio"] = datasets.Audio()
    table = hf.data.table.append_column("audio", audio)
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features))


def test_from_huggingface_gives_the_columns_ray_gives(client):
    hf = _features_dataset()
    ds = di.from_huggingface(hf)
    assert ds.columns() == [*hf.column_names]
    rows = ds.take_all()
    assert [r["text"] for r in rows] == [f"t{i}" for i in range(6)]
    row = rows[4]
    assert row["label"] == 0 and isinstance(row["label"], (int, np.integer))  # ClassLabel: int
    np.testing.assert_array_equal(row["ints"], [0, 1, 2, 3])
    np.testing.assert_array_equal(row["fixed"], [4.0, 4.0, 4.0])
    assert row["nested"] == {"a": 4, "b": "4"}
    # Image and Audio as stored, not decoded, as in Ray
    assert row["image"] == {"bytes": _png(), "path": None}
    assert row["audio"] == {"bytes": b"RIFF", "path": "a4.wav"}
    assert np.isnan(rows[3]["maybe"]) and row["maybe"] == 4.0
    assert rows[2]["ragged"].shape == (3, 2) and rows[3]["ragged"].shape == (1, 2)

    batch = ds.take_batch(6)  # Array2D: a tensor column, stacked as in Ray's numpy batches
    assert batch["arr"].shape == (6, 2, 2) and batch["arr"].dtype == np.float32
    np.testing.assert_array_equal(batch["arr"][:, 0, 0], np.arange(6))
    assert batch["label"].dtype == np.int64
    assert ds.schema().field("label").type == pa.int64()

    assert di.from_huggingface(hf, override_num_blocks=3).num_blocks() == 3


def test_from_huggingface_keeps_the_order_of_select_shuffle_and_filter(client):
    hf = datasets.Dataset.from_dict({"x": list(range(500)), "sq": [i * i for i in range(500)]})
    picked = hf.shuffle(seed=3).select(range(200)).filter(lambda x: x % 2 == 0, input_columns="x")
    assert picked._indices is not None  # the case: rows through an indices mapping
    rows = di.from_huggingface(picked, override_num_blocks=4).take_all()
    assert [r["x"] for r in rows] == picked["x"]
    assert all(r["sq"] == r["x"] ** 2 for r in rows)


def test_from_huggingface_reads_iterable_datasets(client):
    # three Arrow batches of 4096 rows (the last shorter), from two shards, in order
    hf = datasets.Dataset.from_dict({"x": list(range(9000)), "s": [str(i) for i in range(9000)]})
    ds = di.from_huggingface(hf.to_iterable_dataset(num_shards=2))
    assert ds.count() == 9000
    batch = ds.take_batch(9000)
    np.testing.assert_array_equal(batch["x"], np.arange(9000))
    assert batch["s"][8999] == "8999"

    def rows():
        for i in range(5):
            yield {"x": i, "y": [i] * (i + 1)}

    stream = datasets.IterableDataset.from_generator(rows)
    assert stream.features is None  # types from the data itself
    got = di.from_huggingface(stream).take_all()
    assert [r["x"] for r in got] == list(range(5))
    np.testing.assert_array_equal(got[2]["y"], [2, 2, 2])

    no_rows = datasets.IterableDataset.from_generator(
        lambda: iter([]), features=datasets.Features({"x": datasets.Value("int64")})
    )
    empty = di.from_huggingface(no_rows)
    assert empty.count() == 0 and empty.columns() == ["x"]


def test_from_huggingface_refuses_other_inputs(client):
    hf = datasets.Dataset.from_dict({"x": [1, 2]})
    with pytest.raises(di.PlanError, match=r"splits \['train', 'test'\].*dataset\['train'\]"):
        di.from_huggingface(datasets.DatasetDict({"train": hf, "test": hf}))
    with pytest.raises(di.PlanError, match=r"from_huggingface\(dict\).*datasets\.Dataset"):
        di.from_huggingface({"x": [1, 2]})
    with pytest.raises(di.PlanError, match="override_num_blocks=0"):
        di.from_huggingface(hf, override_num_blocks=0)


# ---------------------------------------------------------------------- read_sql
ROWS = 3000


def _hash(value):
    """An MD5 for sqlite3, which has none: a number from the value's digest."""
    if value is None:
        return None
    return int(hashlib.md5(str(value).encode()).hexdigest()[:12], 16)


def _concat(*values):
    return "".join(str(v) for v in values if v is not None)


def _connect(path: str, calls: str | None = None, functions: bool = False):
    """A sqlite3 connection; each call noted in ``calls`` by process, to see where it ran."""
    if calls is not None:
        (Path(calls) / f"{os.getpid()}-{uuid.uuid4().hex}").touch()
    connection = sqlite3.connect(path)
    if functions:
        connection.create_function("MD5", 1, _hash, deterministic=True)
        connection.create_function("CONCAT", -1, _concat, deterministic=True)
    return connection


@pytest.fixture(scope="module")
def database(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("sql") / "data.db")
    connection = sqlite3.connect(path)
    connection.execute(
        "CREATE TABLE t (id INTEGER, name TEXT, score REAL, maybe INTEGER, blob BLOB, grp INTEGER)"
    )
    connection.executemany(
        "INSERT INTO t VALUES (?, ?, ?, ?, ?, ?)",
        [
            (i, f"n{i}", i / 3, None if i % 7 == 0 else i * 10, bytes([i % 256, 1]), i % 5)
            for i in range(ROWS)
        ],
    )
    connection.commit()
    connection.close()
    return path


def _calls_by_process(calls: Path) -> dict[int, int]:
    counts: dict[int, int] = {}
    for name in os.listdir(calls):
        pid = int(name.split("-")[0])
        counts[pid] = counts.get(pid, 0) + 1
    return counts


def test_read_sql_gives_what_pandas_read_sql_gives(client, database, tmp_path):
    calls = tmp_path / "calls"
    calls.mkdir()
    factory = functools.partial(_connect, database, str(calls))
    ds = di.read_sql("SELECT * FROM t ORDER BY id", factory)
    with sqlite3.connect(database) as connection:
        want = pd.read_sql("SELECT * FROM t ORDER BY id", connection)
    assert want["maybe"].isna().any()  # an INTEGER column with NULLs: float, as pandas
    pd.testing.assert_frame_equal(ds.to_pandas(), want)
    by_process = _calls_by_process(calls)
    # the client connected once, for the first rows; the read itself ran on a worker
    assert by_process.pop(os.getpid()) == 1
    workers = set(client.run(os.getpid).values())
    assert by_process and set(by_process) <= workers

    ds = di.read_sql(
        "SELECT id, name FROM t WHERE id < ? AND name <> ?", factory, sql_params=(50, "n3")
    )
    assert [r["id"] for r in ds.take_all()] == [i for i in range(50) if i != 3]


def test_read_sql_shards_read_every_row_once(client, database):
    with sqlite3.connect(database) as connection:
        want = pd.read_sql("SELECT * FROM t", connection)

    def check(ds, blocks):
        ds = ds.materialize()
        assert ds.num_blocks() == blocks
        got = ds.to_pandas().sort_values("id").reset_index(drop=True)
        pd.testing.assert_frame_equal(got, want)
        return ds

    plain = functools.partial(_connect, database)
    # sqlite's ABS of an integer key as the hash: MOD(ABS(ABS(id)), 4), as Ray builds it
    ds = check(di.read_sql("SELECT * FROM t", plain, shard_keys=["id"], shard_hash_fn="ABS",
                           override_num_blocks=4), 4)  # fmt: skip
    assert list(ds._plan.source.rows) == [750] * 4
    # a shard without rows (ids 4k + 1) has the types of the others, not object columns
    query = "SELECT * FROM t WHERE id % 4 <> 1 ORDER BY id"
    sharded = di.read_sql(
        query, plain, shard_keys=["id"], shard_hash_fn="ABS", override_num_blocks=4
    )
    with sqlite3.connect(database) as connection:
        want_some = pd.read_sql(query, connection)
    got = sharded.to_pandas().sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want_some)
    empty_shard = sharded._plan.source.frame.partitions[1].compute()
    assert len(empty_shard) == 0 and empty_shard.dtypes.to_dict() == want.dtypes.to_dict()

    hashing = functools.partial(_connect, database, functions=True)
    # Ray's default MD5, registered in the factory: no shard empty, none holds all
    ds = check(di.read_sql("SELECT * FROM t", hashing, shard_keys=["id"], override_num_blocks=5), 5)
    assert all(0 < n < ROWS for n in ds._plan.source.rows)
    # several keys are joined with CONCAT; a NULL key (maybe) is read once, in shard 0
    check(di.read_sql("SELECT * FROM t;", hashing, shard_keys=["maybe"], override_num_blocks=3), 3)
    check(
        di.read_sql("SELECT * FROM t", hashing, shard_keys=["grp", "name"], override_num_blocks=3),
        3,
    )
    # shard keys without a count of blocks: SQL_DEFAULT_SHARDS of them
    check(di.read_sql("SELECT * FROM t", hashing, shard_keys=["id"]), SQL_DEFAULT_SHARDS)
    # a query with no rows: its columns, no rows, sharded or not
    for keys in (None, ["id"]):
        empty = di.read_sql("SELECT id, name FROM t WHERE id < 0", hashing, shard_keys=keys)
        assert empty.count() == 0 and empty.columns() == ["id", "name"]


def test_read_sql_without_the_hash_function_reads_in_one_task_or_refuses(client, database, caplog):
    plain = functools.partial(_connect, database)  # sqlite3 has no MD5
    with pytest.raises(di.PlanError, match=r"cannot evaluate the shards.*MD5.*create_function"):
        di.read_sql("SELECT * FROM t", plain, shard_keys=["id"], override_num_blocks=4)
    with caplog.at_level("WARNING", logger="daskinfer"):
        ds = di.read_sql("SELECT * FROM t", plain, shard_keys=["id"]).materialize()
    assert "reading the query in one task" in caplog.text
    assert ds.num_blocks() == 1 and ds.count() == ROWS
    one = di.read_sql("SELECT * FROM t", plain, shard_keys=["id"], override_num_blocks=1)
    assert one.materialize().num_blocks() == 1


def test_read_sql_refuses_bad_arguments_at_the_call(client, database):
    factory = functools.partial(_connect, database)
    with pytest.raises(di.PlanError, match="non-empty string"):
        di.read_sql(["SELECT 1"], factory)
    with pytest.raises(di.PlanError, match="function of no arguments"):
        di.read_sql("SELECT * FROM t", database)  # a path, not a factory
    connection = sqlite3.connect(database)
    with pytest.raises(di.PlanError, match=r"cannot be pickled.*opens a new connection"):
        di.read_sql("SELECT * FROM t", lambda: connection)
    connection.close()
    with pytest.raises(di.PlanError, match="give shard_keys"):
        di.read_sql("SELECT * FROM t", factory, override_num_blocks=2)
    with pytest.raises(di.PlanError, match=r"shard_keys='id'.*\['id'\]"):
        di.read_sql("SELECT * FROM t", factory, shard_keys="id", override_num_blocks=2)
    with pytest.raises(di.PlanError, match="name of a SQL function"):
        di.read_sql("SELECT * FROM t", factory, shard_keys=["id"], shard_hash_fn="MD5(id)); --")
    with pytest.raises(di.PlanError, match="override_num_blocks=0"):
        di.read_sql("SELECT * FROM t", factory, override_num_blocks=0)
    with pytest.raises(di.PlanError, match="no such table: missing"):
        di.read_sql("SELECT * FROM missing", factory)
    with pytest.raises(di.PlanError, match="returns no rows"):
        di.read_sql("DELETE FROM t WHERE id < 0", factory)
    with pytest.raises(di.PlanError, match="no cursor"):
        di.read_sql("SELECT 1", dict)


def test_read_sql_is_not_resumable(client, database, tmp_path):
    ds = di.read_sql("SELECT id FROM t", functools.partial(_connect, database))
    with pytest.raises(di.PlanError, match="database query can return other rows"):
        ds.write_parquet(str(tmp_path / "out"), resume=True)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.parquet"))
