"""Ray Data's write options on a real cluster: Hive partitions, rows per file, writer args.

``write_parquet(partition_cols=...)`` writes ``col=value/`` directories that pyarrow and
``read_parquet`` read back (nulls and ``/`` in values included); ``min_rows_per_file`` /
``max_rows_per_file`` (and the old ``num_rows_per_file``) set the rows of each file;
``arrow_parquet_args`` and ``pandas_json_args`` reach the writers; bad values are refused
at the call, before the destination exists.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pandas as pd
import pyarrow.dataset as pa_ds
import pyarrow.parquet as pq
import pytest

import daskinfer as di


def local(url: str) -> str:
    return url.removeprefix("file://")


def frame(n: int = 60) -> pd.DataFrame:
    ids = np.arange(n)
    return pd.DataFrame(
        {
            "id": ids,
            "year": np.where(ids % 3 == 0, 2023, 2024),
            # a null, and a value with a '/' that must not become a directory level
            "city": pd.Series(["a/b", "c", None, "d"] * (n // 4), dtype=object),
            "value": ids * 0.5,
        }
    )


def by_id(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values("id").reset_index(drop=True)


# ------------------------------------------------------------------ partition_cols


def test_partitioned_write_reads_back_everywhere(client, tmp_path):
    df = frame()
    written = di.from_pandas(df, npartitions=3).write_parquet(
        str(tmp_path / "out"), partition_cols=["year", "city"]
    )
    dirs = {pathlib.Path(local(u)).parent.relative_to(tmp_path / "out").as_posix() for u in written}
    assert dirs == {
        f"year={y}/city={c}"
        for y in (2023, 2024)
        for c in ("a%2Fb", "c", "d", "__HIVE_DEFAULT_PARTITION__")
    }
    # the directories hold the partition columns; the files do not
    for url in written:
        assert pq.read_schema(local(url)).names == ["id", "value"]
    # each file holds only its partition's rows
    for url in written:
        year = int(pathlib.Path(local(url)).parent.parent.name.split("=")[1])
        ids = pq.read_table(local(url)).column("id").to_numpy()
        assert set(np.where(ids % 3 == 0, 2023, 2024)) == {year}
    assert sum(pq.read_metadata(local(u)).num_rows for u in written) == len(df)

    expected = by_id(df)
    with_pyarrow = by_id(
        pa_ds.dataset(str(tmp_path / "out"), partitioning="hive").to_table().to_pandas()
    )
    back = by_id(di.read_parquet(str(tmp_path / "out")).to_pandas())
    for got in (with_pyarrow, back):
        assert got["id"].tolist() == expected["id"].tolist()
        assert got["year"].astype("int64").tolist() == expected["year"].tolist()
        assert got["value"].tolist() == expected["value"].tolist()
        # null stays null, 'a/b' comes back whole
        assert [None if pd.isna(c) else c for c in got["city"]] == expected["city"].tolist()


def test_partitioned_overwrite_replaces_old_partitions(client, tmp_path):
    out = str(tmp_path / "out")
    ds = di.from_pandas(frame(), npartitions=2)
    ds.write_parquet(out, partition_cols=["year"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["year=2023", "year=2024"]
    ds.filter(lambda r: r["year"] == 2024).write_parquet(
        out, partition_cols=["year"], mode="overwrite"
    )
    # the emptied year=2023 directory is gone, not left to read as an empty partition
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["year=2024"]
    back = di.read_parquet(out).to_pandas()
    assert len(back) == 40 and set(back["year"].astype(int)) == {2024}


def test_partitioned_resumable_write_matches_plain(client, tmp_path):
    df = frame()
    ds = di.from_pandas(df, npartitions=3).map_batches(
        lambda b: {**b, "double": b["value"] * 2}, batch_size=7
    )
    plain = ds.write_parquet(str(tmp_path / "plain"), partition_cols=["city"])
    resumed = ds.write_parquet(str(tmp_path / "resumed"), partition_cols=["city"], resume=True)

    def contents(root: str) -> pd.DataFrame:
        return by_id(pa_ds.dataset(root, partitioning="hive").to_table().to_pandas())

    pd.testing.assert_frame_equal(
        contents(str(tmp_path / "plain")), contents(str(tmp_path / "resumed"))
    )
    assert len(plain) > 0 and len(resumed) > 0
    assert not list((tmp_path / "resumed").glob("_*"))  # journal and temporary files gone


def test_partition_col_errors_before_anything_is_written(client, tmp_path):
    ds = di.from_pandas(frame(), npartitions=2)
    out = tmp_path / "out"
    with pytest.raises(di.PlanError, match="no column 'town'"):
        ds.write_parquet(str(out), partition_cols=["town"])
    with pytest.raises(di.PlanError, match="leave at least one column"):
        ds.select_columns(["year"]).write_parquet(str(out), partition_cols=["year"])
    with pytest.raises(di.PlanError, match="without '/' or '='"):
        ds.write_parquet(str(out), partition_cols=["a=b"])
    assert not out.exists()


def test_partition_by_array_column_is_refused(client, tmp_path):
    ds = di.from_numpy(np.zeros((4, 2, 2), dtype="float32")).add_column(
        "k", lambda b: np.arange(len(b["data"]))
    )
    with pytest.raises(di.UserCodeError, match="cannot name a directory"):
        ds.write_parquet(str(tmp_path / "out"), partition_cols=["data"])
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


# ------------------------------------------------------------------ rows per file


def test_min_rows_per_file_makes_files_of_that_many_rows(client, tmp_path):
    ds = di.range(100, override_num_blocks=7)
    written = ds.write_parquet(str(tmp_path / "out"), min_rows_per_file=30)
    assert [pq.read_metadata(local(u)).num_rows for u in written] == [30, 30, 30, 10]
    ids = np.concatenate([pq.read_table(local(u)).column("id").to_numpy() for u in written])
    assert ids.tolist() == list(range(100))  # in order, each row once


def test_max_rows_per_file_splits_blocks(client, tmp_path):
    ds = di.range(50, override_num_blocks=2)  # blocks of 25
    written = ds.write_csv(str(tmp_path / "out"), max_rows_per_file=10)
    sizes = [len(pd.read_csv(local(u))) for u in written]
    assert sizes == [10, 10, 5, 10, 10, 5]
    ids = pd.concat([pd.read_csv(local(u)) for u in written])["id"].tolist()
    assert ids == list(range(50))


def test_num_rows_per_file_is_the_old_name(client, tmp_path):
    with pytest.warns(DeprecationWarning, match="min_rows_per_file"):
        written = di.range(20, override_num_blocks=4).write_json(
            str(tmp_path / "out"), num_rows_per_file=8
        )
    assert [len(pd.read_json(local(u), lines=True)) for u in written] == [8, 8, 4]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_rows_per_file": 0}, "positive number of rows"),
        ({"max_rows_per_file": 2.5}, "positive number of rows"),
        ({"min_rows_per_file": 10, "max_rows_per_file": 5}, "minimum is above the maximum"),
        ({"min_rows_per_file": 10, "num_rows_per_file": 10}, "give only min_rows_per_file"),
        ({"row_group_sise": 10}, "pyarrow refuses"),
    ],
)
def test_bad_write_options_are_refused_at_the_call(client, tmp_path, kwargs, message):
    out = tmp_path / "out"
    with pytest.raises(di.PlanError, match=message):
        di.range(10).write_parquet(str(out), **kwargs)
    assert not out.exists()


# ------------------------------------------------------------------ writer arguments


def test_arrow_parquet_args_reach_the_writer(client, tmp_path):
    written = di.range(100, override_num_blocks=1).write_parquet(
        str(tmp_path / "out"), row_group_size=25, compression="zstd"
    )
    meta = pq.read_metadata(local(written[0]))
    assert meta.num_row_groups == 4
    assert meta.row_group(0).column(0).compression == "ZSTD"


def test_pandas_json_args_reach_the_writer(client, tmp_path):
    df = pd.DataFrame({"t": pd.to_datetime(["2024-01-31 12:00:00"]), "x": [1.0 / 3]})
    written = di.from_pandas(df).write_json(
        str(tmp_path / "out"), date_format="iso", double_precision=3
    )
    record = json.loads(pathlib.Path(local(written[0])).read_text().splitlines()[0])
    assert record["t"].startswith("2024-01-31T12:00:00")
    assert record["x"] == 0.333
    with pytest.raises(di.PlanError, match="pandas refuses"):
        di.from_pandas(df).write_json(str(tmp_path / "bad"), orient="sideways")


# ------------------------------------------------------------------ numpy and images


def test_write_numpy_keeps_nd_rows_in_order(client, tmp_path):
    arr = np.arange(10 * 4 * 3, dtype="float32").reshape(10, 4, 3)
    ds = di.from_numpy(arr, npartitions=3)
    written = ds.write_numpy(str(tmp_path / "out"), column="data", min_rows_per_file=4)
    pieces = [np.load(local(u), allow_pickle=False) for u in written]
    assert [len(p) for p in pieces] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(pieces), arr)


def test_write_numpy_refuses_what_a_npy_file_cannot_hold(client, tmp_path):
    with pytest.raises(di.PlanError, match="no such column"):
        di.range(4).write_numpy(str(tmp_path / "a"), column="data")
    ragged = di.from_items([{"v": np.zeros(2)}, {"v": np.zeros(3)}], npartitions=1)
    with pytest.raises(di.UserCodeError, match="not one array"):
        ragged.write_numpy(str(tmp_path / "b"), column="v")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_write_images_one_file_per_row_lossless(client, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 6, 4, 3), dtype=np.uint8)
    written = di.from_numpy(images, npartitions=2).write_images(
        str(tmp_path / "out"), column="data"
    )
    assert len(written) == 5 and all(u.endswith(".png") for u in written)
    back = np.stack([np.asarray(Image.open(local(u))) for u in written])
    np.testing.assert_array_equal(back, images)  # PNG is lossless, and rows keep their order
    jpegs = di.from_numpy(images).write_images(str(tmp_path / "jpg"), "data", "jpg")
    assert Image.open(local(jpegs[0])).format == "JPEG"
    with pytest.raises(di.PlanError, match="Pillow cannot write"):
        di.from_numpy(images).write_images(str(tmp_path / "bad"), "data", "nope")


# ------------------------------------------------------------------ random_sample


def test_random_sample_keeps_about_the_fraction_in_order(client):
    ds = di.range(20_000, override_num_blocks=4)
    ids = [r["id"] for r in ds.random_sample(0.1, seed=7).take_all()]
    assert 1_700 < len(ids) < 2_300  # binomial(20000, 0.1): sd 42
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    again = [r["id"] for r in ds.random_sample(0.1, seed=7).take_all()]
    other = [r["id"] for r in ds.random_sample(0.1, seed=8).take_all()]
    assert again == ids and other != ids
    # blocks of equal size draw differently: the kept positions are not the same in each
    block_rows = 5_000
    positions = [{i % block_rows for i in ids if i // block_rows == b} for b in range(4)]
    assert positions[0] != positions[1]
    assert ds.random_sample(0.0).count() == 0 and ds.random_sample(1.0).count() == 20_000
    with pytest.raises(di.PlanError, match="fraction from 0 to 1"):
        ds.random_sample(1.5)
