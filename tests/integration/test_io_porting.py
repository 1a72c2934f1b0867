"""Readers and sinks where a port from Ray Data would see other values, on a real cluster.

N-D columns read back with their shape (``read_parquet``, ``from_arrow``); ``read_text``
drops empty lines by default, as Ray Data's does; ``write_csv`` refuses columns of arrays
rather than writing numpy's truncated text of them.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import daskinfer as di
from daskinfer._internal.tensor import TensorArray, TensorDtype
from daskinfer.io.sinks import TEMP_DIR, WriteTransform


def visible_files(root: pathlib.Path) -> list[str]:
    """Files under ``root`` as relative paths, hidden ones (``_``/``.``) included."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def source_dtype(ds: di.Dataset, column: str) -> object:
    """The dtype of ``column`` in the dask meta of the Dataset's source frame."""
    return ds._plan.source.frame.dtypes[column]  # type: ignore[union-attr]


# ------------------------------------------------------------------ N-D columns


def test_read_parquet_nd_column_keeps_its_shape(client, tmp_path):
    arr = np.arange(4 * 3 * 2, dtype="float32").reshape(4, 3, 2)
    di.from_numpy(arr).write_parquet(str(tmp_path / "nd"))
    ds = di.read_parquet(str(tmp_path / "nd"))
    # the meta says what the blocks hold, as from_numpy's does: no job needed to know it
    dtype = source_dtype(ds, "data")
    assert isinstance(dtype, TensorDtype), dtype
    assert dtype == source_dtype(di.from_numpy(arr), "data")
    assert str(dtype) == "tensor[float32,(3, 2)]"
    batch = ds.take_batch(4)
    assert batch["data"].shape == (4, 3, 2)
    assert batch["data"].dtype == np.float32
    np.testing.assert_array_equal(batch["data"], arr)
    # rows and pandas cells are arrays of the written shape too
    assert ds.take(1)[0]["data"].shape == (3, 2)
    df = ds.to_pandas()
    assert isinstance(df["data"].dtype, TensorDtype)
    np.testing.assert_array_equal(df["data"].array.values, arr)


def test_read_parquet_nd_images_across_files_and_stages(client, tmp_path):
    """uint8 images over several files, listed out of order, a column projection and a
    stage: every block keeps the ``(h, w, c)`` rows; writing them again keeps them."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 5, 4, 3), dtype=np.uint8)
    ds = di.from_numpy(images, npartitions=3).map_batches(
        lambda b: {"first": b["data"][:, 0, 0, 0], "image": b["data"]}, batch_size=None
    )
    paths = ds.write_parquet(str(tmp_path / "img"))
    assert len(paths) == 3
    listed = [p.removeprefix("file://") for p in (paths[2], paths[0], paths[1])]
    back = di.read_parquet(listed, columns=["image"])  # two runs: dask.concat of frames
    assert back.columns() == ["image"]
    assert isinstance(source_dtype(back, "image"), TensorDtype)
    want = np.concatenate([images[20:], images[:20]])
    got = back.take_batch(30)["image"]
    assert got.shape == (30, 5, 4, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)

    def shapes(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"shape": np.array([str(batch["image"].shape[1:])] * len(batch["image"]))}

    seen = {r["shape"] for r in back.map_batches(shapes, batch_size=7).take_all()}
    assert seen == {"(5, 4, 3)"}
    again = back.write_parquet(str(tmp_path / "again"))
    round_trip = di.read_parquet(str(tmp_path / "again")).take_batch(30)["image"]
    assert len(again) == 3
    np.testing.assert_array_equal(round_trip, want)


def test_read_parquet_tensor_column_of_another_writer(client, tmp_path):
    """A file pyarrow wrote (no permutation on the type, the tensor column between two
    others, an empty file beside it): the columns keep their order, the shape its rows."""
    import pyarrow.parquet as pq

    cells = np.arange(5 * 2 * 2, dtype="int16").reshape(5, 2, 2)
    tensor_type = pa.fixed_shape_tensor(pa.int16(), [2, 2])
    storage = pa.FixedSizeListArray.from_arrays(pa.array(cells.reshape(-1)), 4)

    def table(rows: slice) -> pa.Table:
        return pa.table(
            {
                "id": pa.array(np.arange(5)[rows]),
                "t": pa.ExtensionArray.from_storage(tensor_type, storage[rows]),
                "s": pa.array([f"r{k}" for k in range(5)][rows]),
            }
        )

    (tmp_path / "pa").mkdir()
    pq.write_table(table(slice(0, 5)), tmp_path / "pa" / "part-0.parquet")
    pq.write_table(table(slice(0, 0)), tmp_path / "pa" / "part-1.parquet")
    ds = di.read_parquet(str(tmp_path / "pa"))
    assert ds.columns() == ["id", "t", "s"]
    assert str(source_dtype(ds, "t")) == "tensor[int16,(2, 2)]"
    batch = ds.take_batch(5)
    np.testing.assert_array_equal(batch["t"], cells)
    assert list(batch["s"]) == [f"r{k}" for k in range(5)]
    df = ds.to_pandas()
    assert list(df.columns) == ["id", "t", "s"]
    np.testing.assert_array_equal(df["t"].array.values, cells)


def test_read_parquet_vectors_stay_one_array_per_row(client, tmp_path):
    """1-D rows (embeddings) are list columns in Parquet; they read back as before: an
    object column of 1-D arrays, which the numpy format stacks."""
    emb = np.arange(20 * 8, dtype="float32").reshape(20, 8)
    di.from_numpy(emb, npartitions=2).write_parquet(str(tmp_path / "vec"))
    ds = di.read_parquet(str(tmp_path / "vec"))
    assert source_dtype(ds, "data") == object
    batch = ds.take_batch(20)
    assert batch["data"].shape == (20, 8)
    np.testing.assert_array_equal(batch["data"], emb)
    row = ds.take(1)[0]["data"]
    assert isinstance(row, np.ndarray) and row.shape == (8,)


def test_from_arrow_nd_column_keeps_its_shape(client):
    arr = np.arange(6 * 2 * 3, dtype="float64").reshape(6, 2, 3)
    table = pa.table({"i": np.arange(6), "t": pa.FixedShapeTensorArray.from_numpy_ndarray(arr)})
    ds = di.from_arrow(table)
    assert isinstance(source_dtype(ds, "t"), TensorDtype)
    batch = ds.take_batch(6)
    assert batch["t"].shape == (6, 2, 3)
    np.testing.assert_array_equal(batch["t"], arr)
    np.testing.assert_array_equal(batch["i"], np.arange(6))
    # a list of tables: one block each, the shape kept in every one
    two = di.from_arrow([table.slice(0, 2), table.slice(2)])
    np.testing.assert_array_equal(two.take_batch(6)["t"], arr)


# ------------------------------------------------------------------ read_text


def test_read_text_drops_empty_lines_by_default_as_ray_does(client, tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first\n\nsecond\n   \n\t\nthird\n\n")
    assert [r["text"] for r in di.read_text(str(path)).take_all()] == ["first", "second", "third"]
    kept = di.read_text(str(path), drop_empty_lines=False)
    assert [r["text"] for r in kept.take_all()] == ["first", "", "second", "   ", "\t", "third", ""]


def test_read_text_a_file_of_empty_lines_gives_no_rows(client, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    (tmp_path / "one.txt").write_text("only line\n")
    ds = di.read_text(str(tmp_path))
    assert ds.count() == 1
    assert [r["text"] for r in ds.take_all()] == ["only line"]


# ------------------------------------------------------------------ write_csv


def long_vectors(n: int = 12, dim: int = 1500) -> np.ndarray:
    """Rows longer than numpy's print threshold (1000), which str() cuts with '...'."""
    return np.arange(n * dim, dtype="float32").reshape(n, dim)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: di.from_numpy(long_vectors(), npartitions=3), id="tensor-1d"),
        pytest.param(
            lambda: di.from_numpy(np.zeros((12, 3, 2), "float32"), npartitions=3), id="tensor-nd"
        ),
        pytest.param(
            lambda: di.from_pandas(
                pd.DataFrame(
                    {
                        "i": np.arange(12),
                        # an object column of per-row arrays, of different lengths
                        "data": pd.Series(
                            [np.arange(k + 1, dtype="int64") for k in range(12)], dtype=object
                        ),
                    }
                ),
                npartitions=3,
            ),
            id="object-arrays",
        ),
    ],
)
def test_write_csv_refuses_array_columns(client, tmp_path, make):
    dest = tmp_path / "out"
    with pytest.raises(di.UserCodeError) as info:
        make().write_csv(str(dest))
    message = str(info.value)
    assert "'data'" in message
    assert "write_parquet" in message and "write_json" in message
    assert "tolist()" in message
    assert isinstance(info.value.__cause__, TypeError)
    # the failed write leaves nothing: no part, no temporary directory
    assert not dest.exists() or visible_files(dest) == []
    assert not (dest / TEMP_DIR).exists()


def test_write_csv_refuses_before_the_part_file_exists(tmp_path):
    """The check runs before the part is opened: a refused block leaves no file at all."""
    parts = tmp_path / "parts"
    parts.mkdir()
    write = WriteTransform("Write(csv)", "csv", f"file://{parts}", {}, {})
    block = pd.DataFrame({"i": np.arange(3), "emb": TensorArray(long_vectors(3))})
    with pytest.raises(TypeError, match="column 'emb' holds arrays"):
        write.apply(block)
    assert list(parts.iterdir()) == []
    # a block without arrays is written as before
    assert len(write.apply(block.drop(columns=["emb"]))) == 1
    assert len(list(parts.iterdir())) == 1


def test_write_csv_keeps_strings_and_lists(client, tmp_path):
    """Only arrays are refused: text, and lists made for CSV (the fix the error names)."""
    vectors = long_vectors(6, 3)

    def as_lists(df: pd.DataFrame) -> pd.DataFrame:
        return df.assign(data=[v.tolist() for v in df["data"]], s="text, with a comma")

    ds = di.from_numpy(vectors, npartitions=2).map_batches(as_lists, batch_format="pandas")
    paths = ds.write_csv(str(tmp_path / "out"))
    back = pd.concat([pd.read_csv(p.removeprefix("file://")) for p in paths], ignore_index=True)
    assert [json.loads(v) for v in back["data"]] == vectors.tolist()
    assert list(back["s"]) == ["text, with a comma"] * 6


# ------------------------------------------------------------------ write_json


def test_write_json_writes_arrays_as_json_arrays(client, tmp_path):
    """JSON keeps every value of an array column: nested JSON arrays, nothing cut."""
    vectors = long_vectors(6)
    ds = di.from_numpy(vectors, npartitions=2).map_batches(
        lambda b: {"emb": b["data"], "cube": b["data"][:, :6].reshape(-1, 2, 3).astype("int64")}
    )
    paths = ds.write_json(str(tmp_path / "out"))
    rows = [
        json.loads(line)
        for p in paths
        for line in pathlib.Path(p.removeprefix("file://")).read_text().splitlines()
    ]
    assert len(rows) == 6
    np.testing.assert_array_equal(np.array([r["emb"] for r in rows], dtype="float32"), vectors)
    assert [r["cube"] for r in rows] == vectors[:, :6].reshape(6, 2, 3).astype("int64").tolist()


# ------------------------------------------------------------------ per-file types


def test_read_csv_and_json_take_each_files_types(client, tmp_path):
    # the first file has whole numbers, the second decimals: dask's readers took the
    # first file's types for all and failed the job on the second
    (tmp_path / "a.csv").write_text("x,name\n" + "".join(f"{i},n{i}\n" for i in range(20)))
    (tmp_path / "b.csv").write_text("x,name\n" + "".join(f"{i + 0.5},m{i}\n" for i in range(20)))
    got = di.read_csv(str(tmp_path / "*.csv")).to_pandas()
    assert got["x"].dtype == np.float64
    assert got["x"].tolist() == [float(i) for i in range(20)] + [i + 0.5 for i in range(20)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"x": i}) + "\n" for i in range(5)))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"x": i / 2}) + "\n" for i in range(5)))
    got = di.read_json(str(tmp_path / "*.jsonl")).to_pandas()
    assert got["x"].tolist() == [0, 1, 2, 3, 4, 0, 0.5, 1, 1.5, 2]


def test_read_csv_bad_argument_fails_at_the_call(client, tmp_path):
    (tmp_path / "a.csv").write_text("x\n1\n")
    with pytest.raises(di.PlanError, match="could not read"):
        di.read_csv(str(tmp_path / "a.csv"), usecols=["nope"])


# ------------------------------------------------------------- include_paths=True


def _write(frame: pd.DataFrame, path: pathlib.Path, fmt: str) -> None:
    if fmt == "parquet":
        frame.to_parquet(path)
    elif fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_json(path, orient="records", lines=True)


def _write_parts(tmp_path: pathlib.Path, fmt: str, parts: int = 3, rows: int = 50) -> list[str]:
    """``parts`` files of ``rows`` rows each (column ``i`` counts on across files)."""
    root = tmp_path / fmt
    root.mkdir()
    written = []
    for k in range(parts):
        frame = pd.DataFrame({"i": np.arange(k * rows, (k + 1) * rows), "s": f"f{k}"})
        _write(frame, root / f"part-{k}.{fmt}", fmt)
        written.append(str(root / f"part-{k}.{fmt}"))
    return written


def _path_of_each_row(got: pd.DataFrame, files: list[str], rows: int = 50) -> None:
    """Every row's ``path`` is the URL of the file its ``i`` was written to."""
    want = [f"file://{files[i // rows]}" for i in got["i"]]
    assert [str(p) for p in got["path"]] == want


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json"])
def test_include_paths_gives_each_row_its_file(client, tmp_path, fmt):
    files = _write_parts(tmp_path, fmt)
    read = getattr(di, f"read_{fmt}")
    ds = read(str(tmp_path / fmt), include_paths=True)
    assert ds.columns() == ["i", "s", "path"]
    got = ds.to_pandas()
    assert got["i"].tolist() == list(range(150))
    _path_of_each_row(got, files)
    # files joined into fewer blocks, and split into more: each row keeps its own file
    for blocks in (2, 7):
        cut = read(str(tmp_path / fmt), include_paths=True, override_num_blocks=blocks)
        cut = cut.materialize()
        assert cut.num_blocks() == blocks
        _path_of_each_row(cut.to_pandas(), files)
    # through a batch function, as a pipeline uses it
    names = (
        read(str(tmp_path / fmt), include_paths=True)
        .map_batches(lambda b: {"name": [p.rsplit("/", 1)[-1] for p in b["path"]]})
        .to_pandas()["name"]
    )
    assert names.value_counts().to_dict() == {f"part-{k}.{fmt}": 50 for k in range(3)}
    # without it, no such column
    assert read(str(tmp_path / fmt)).columns() == ["i", "s"]


def test_read_parquet_include_paths_with_columns_filters_and_hive(client, tmp_path):
    files = _write_parts(tmp_path, "parquet")
    root = str(tmp_path / "parquet")
    # the path comes whatever the projection
    projected = di.read_parquet(root, columns=["i"], include_paths=True)
    assert projected.columns() == ["i", "path"]
    _path_of_each_row(projected.to_pandas(), files)
    # a filter pushed into the read keeps the column; one on the path itself stays with
    # the filter stage (the files have no such column to prune by)
    late = di.read_parquet(root, include_paths=True).filter(expr="i >= 120").to_pandas()
    assert late["i"].tolist() == list(range(120, 150))
    _path_of_each_row(late, files)
    second = f"file://{files[1]}"
    by_path = di.read_parquet(root, include_paths=True).filter(expr=f"path == '{second}'")
    assert by_path.to_pandas()["i"].tolist() == list(range(50, 100))
    # Hive directories: the partition column and the path, both
    hive = tmp_path / "hive"
    for year, values in ((2024, [1, 2]), (2025, [3])):
        (hive / f"year={year}").mkdir(parents=True)
        pd.DataFrame({"v": values}).to_parquet(hive / f"year={year}" / "p.parquet")
    got = di.read_parquet(str(hive), include_paths=True).filter(expr="year == 2025").to_pandas()
    assert got["v"].tolist() == [3]
    assert [str(p) for p in got["path"]] == [f"file://{hive}/year=2025/p.parquet"]


def test_read_text_include_paths(client, tmp_path):
    for k in range(2):
        (tmp_path / f"t{k}.txt").write_text(f"a{k}\n\nb{k}\n")
    rows = di.read_text(str(tmp_path), include_paths=True).take_all()
    assert [(r["text"], r["path"]) for r in rows] == [
        (f"{w}{k}", f"file://{tmp_path}/t{k}.txt") for k in range(2) for w in "ab"
    ]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json"])
def test_include_paths_refuses_files_with_a_path_column(tmp_path, fmt):
    """Ray Data overwrites such a column with the paths; here the call fails, at once."""
    path = tmp_path / f"own.{fmt}"
    _write(pd.DataFrame({"i": [1], "path": ["kept"]}), path, fmt)
    read = getattr(di, f"read_{fmt}")
    with pytest.raises(di.PlanError, match=r"include_paths=True.*own\..*column 'path'.*rename"):
        read(str(path), include_paths=True)
    assert read(str(path)).columns() == ["i", "path"]  # read as it is without the option


@pytest.mark.parametrize(
    "reader", ["read_parquet", "read_csv", "read_json", "read_text", "read_images"]
)
def test_include_paths_must_be_a_bool(tmp_path, reader):
    with pytest.raises(di.PlanError, match=r"include_paths='yes'.*True or False"):
        getattr(di, reader)(str(tmp_path), include_paths="yes")


# ------------------------------------------------------------------ file_extensions=


def test_file_extensions_pick_the_files_read(client, tmp_path):
    for k, name in enumerate(["a.parquet", "b.PARQ", "c.data", "d.txt"]):
        if name.endswith("txt"):
            (tmp_path / name).write_text("not parquet")
        else:
            pd.DataFrame({"k": [k]}).to_parquet(tmp_path / name)
    # Ray Data's argument: these extensions only, case and leading dot aside, in place of
    # the reader's own (which would never read c.data)
    assert di.read_parquet(str(tmp_path), file_extensions=["data"]).to_pandas()["k"].tolist() == [2]
    both = di.read_parquet(str(tmp_path), file_extensions=[".parquet", "parq"])
    assert both.to_pandas()["k"].tolist() == [0, 1]
    # it filters a glob and a list of files as well, as Ray's does
    listed = [str(tmp_path / n) for n in ("a.parquet", "c.data", "d.txt")]
    got = di.read_parquet(listed, file_extensions=["parquet", "data"]).to_pandas()
    assert got["k"].tolist() == [0, 2]
    texts = di.read_text(str(tmp_path / "*"), file_extensions=["txt"]).take_all()
    assert texts == [{"text": "not parquet"}]


@pytest.mark.parametrize("value", ["parquet", [], [""], [3]])
def test_file_extensions_refuses_what_is_not_a_list_of_extensions(tmp_path, value):
    pd.DataFrame({"k": [1]}).to_parquet(tmp_path / "a.parquet")
    with pytest.raises(di.PlanError, match=r"file_extensions=.*give a list of extensions"):
        di.read_parquet(str(tmp_path), file_extensions=value)


def test_file_extensions_that_match_nothing_fail_at_the_call(tmp_path):
    pd.DataFrame({"k": [1]}).to_parquet(tmp_path / "a.parquet")
    with pytest.raises(di.PlanError, match=r"none of the 1 files .* ends with \.csv"):
        di.read_parquet(str(tmp_path), file_extensions=["csv"])
