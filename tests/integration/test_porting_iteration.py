"""Ray Data arguments and methods a port relies on, on a real cluster: the local shuffle
buffer of ``iter_batches``/``iter_torch_batches``, ``num_blocks``, ``size_bytes``,
``input_files``, and the readers' ``override_num_blocks``.
"""

from __future__ import annotations

import itertools
import json
import pathlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import daskinfer as di


def ids_of(batches: list[dict[str, np.ndarray]]) -> list[list[int]]:
    return [b["id"].tolist() for b in batches]


def shuffled(ds: di.Dataset, **kwargs: object) -> list[list[int]]:
    return ids_of(list(ds.iter_batches(**kwargs)))  # type: ignore[arg-type]


# ------------------------------------------------------------------ local shuffle


def test_local_shuffle_gives_every_row_once_in_another_order(client):
    ds = di.range(200, override_num_blocks=5)
    batches = shuffled(ds, batch_size=16, local_shuffle_buffer_size=50, local_shuffle_seed=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(200))  # every row, exactly once
    assert flat != list(range(200))
    # batches are exact but for the last one
    assert [len(b) for b in batches] == [16] * 12 + [8]
    # rows of one batch come from across the buffer, not a run of neighbours
    assert sum(b != sorted(b) for b in batches) >= 10


def test_local_shuffle_is_local_to_the_buffer(client):
    """A batch is drawn from the rows buffered so far, not from the whole dataset."""
    ds = di.range(1000, override_num_blocks=10)  # blocks of 100 rows
    batches = shuffled(ds, batch_size=10, local_shuffle_buffer_size=20, local_shuffle_seed=3)
    # the first block (100 rows) is in the buffer before any batch is drawn: the first
    # batch holds rows of it only; rows of the last block come at the end
    assert max(batches[0]) < 100
    assert min(batches[-1]) >= 800
    assert sorted(i for b in batches for i in b) == list(range(1000))


def test_local_shuffle_seed_reproduces_and_another_seed_differs(client):
    ds = di.range(300, override_num_blocks=6).map_batches(lambda b: b, batch_size=7)
    kwargs = {"batch_size": 20, "local_shuffle_buffer_size": 64}
    first = shuffled(ds, local_shuffle_seed=7, **kwargs)
    assert shuffled(ds, local_shuffle_seed=7, **kwargs) == first
    assert shuffled(ds, local_shuffle_seed=8, **kwargs) != first
    # without a seed, two runs differ (a 1 in 300! chance of a false failure)
    assert shuffled(ds, **kwargs) != shuffled(ds, **kwargs)
    # a seed without a buffer does nothing, as in Ray
    assert [i for b in shuffled(ds, batch_size=20, local_shuffle_seed=7) for i in b] == list(
        range(300)
    )


@pytest.mark.parametrize("rows_kind", ["numpy", "pandas"])
def test_local_shuffle_does_not_depend_on_block_cuts(rows_kind):
    """The executor cuts blocks by timing; the same rows cut otherwise shuffle the same."""
    from daskinfer._internal.local_shuffle import NUMPY_ROWS, PANDAS_ROWS, shuffled_batches

    ids = np.arange(500)

    def run(cuts: list[int]) -> list[list[int]]:
        edges = [0, *cuts, len(ids)]
        pieces = [ids[a:b] for a, b in itertools.pairwise(edges)]
        if rows_kind == "numpy":
            blocks = ({"id": p} for p in pieces)
            out = shuffled_batches(blocks, NUMPY_ROWS, 16, 100, 11, False)
            return [b["id"].tolist() for b in out]
        frames = (pd.DataFrame({"id": p}) for p in pieces)
        return [b["id"].tolist() for b in shuffled_batches(frames, PANDAS_ROWS, 16, 100, 11, False)]

    one_block = run([])
    assert run([1, 2, 3, 50, 51, 300]) == one_block
    assert run(list(range(7, 500, 7))) == one_block
    assert sorted(i for b in one_block for i in b) == list(range(500))


def test_local_shuffle_drop_last_and_small_buffer(client):
    ds = di.range(103, override_num_blocks=4)
    batches = shuffled(
        ds, batch_size=10, local_shuffle_buffer_size=30, local_shuffle_seed=1, drop_last=True
    )
    assert [len(b) for b in batches] == [10] * 10
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == 100 and set(flat) <= set(range(103))
    # a buffer smaller than a batch counts as one batch (as Ray): batches stay whole
    small = shuffled(ds, batch_size=10, local_shuffle_buffer_size=3, local_shuffle_seed=1)
    assert [len(b) for b in small] == [10] * 10 + [3]
    assert sorted(i for b in small for i in b) == list(range(103))
    assert [i for b in small for i in b] != list(range(103))


def test_local_shuffle_formats_agree_and_keep_rows_whole(client):
    """numpy, pandas and pyarrow batches come in the same order for one seed; N-D values
    and text stay with their row."""
    images = np.arange(60 * 2 * 3).reshape(60, 2, 3)

    def add_columns(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["data"][:, 0, 0] // 6
        return {"id": ids, "image": batch["data"], "name": np.array([f"n{i}" for i in ids])}

    ds = di.from_numpy(images, npartitions=4).map_batches(add_columns, batch_size=None)
    kwargs = {"batch_size": 8, "local_shuffle_buffer_size": 25, "local_shuffle_seed": 5}
    as_numpy = list(ds.iter_batches(**kwargs))
    as_pandas = list(ds.iter_batches(batch_format="pandas", **kwargs))
    as_arrow = list(ds.iter_batches(batch_format="pyarrow", **kwargs))
    order = ids_of(as_numpy)
    assert sorted(i for b in order for i in b) == list(range(60))
    assert order != sorted(order)
    assert [b["id"].tolist() for b in as_pandas] == order
    assert all(isinstance(b, pd.DataFrame) for b in as_pandas)
    assert [b.column("id").to_pylist() for b in as_arrow] == order
    assert all(isinstance(b, pa.Table) for b in as_arrow)
    for batch in as_numpy:
        assert batch["image"].shape == (len(batch["id"]), 2, 3)
        np.testing.assert_array_equal(batch["image"], images[batch["id"]])
        assert batch["name"].tolist() == [f"n{i}" for i in batch["id"]]
    for frame in as_pandas:
        np.testing.assert_array_equal(np.stack(list(frame["image"])), images[frame["id"]])


def test_iter_torch_batches_local_shuffle(client):
    torch = pytest.importorskip("torch")
    ds = di.range(90, override_num_blocks=3)
    kwargs = {"batch_size": 16, "local_shuffle_buffer_size": 40, "local_shuffle_seed": 2}
    tensors = list(ds.iter_torch_batches(**kwargs))
    assert all(isinstance(b["id"], torch.Tensor) for b in tensors)
    got = [b["id"].tolist() for b in tensors]
    assert got == shuffled(ds, **kwargs)  # the same rows in the same order
    assert sorted(i for b in got for i in b) == list(range(90))
    assert got != sorted(got)
    dropped = list(ds.iter_torch_batches(drop_last=True, **kwargs))
    assert [len(b["id"]) for b in dropped] == [16] * 5


def test_iter_torch_batches_device_auto_and_bad_devices(client):
    torch = pytest.importorskip("torch")
    ds = di.range(10)
    (batch,) = ds.iter_torch_batches(batch_size=10, device="auto")  # Ray's default
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert batch["id"].device.type == want and batch["id"].tolist() == list(range(10))
    with pytest.raises(di.PlanError, match="not a torch device"):
        ds.iter_torch_batches(device="gpu0")


def _never(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    raise AssertionError("the pipeline ran although the call was refused")


@pytest.mark.parametrize("call", ["iter_batches", "iter_torch_batches"])
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"local_shuffle_buffer_size": 0},
            r"local_shuffle_buffer_size=0 is not valid: use an integer >= 1",
        ),
        ({"local_shuffle_buffer_size": -5}, r"local_shuffle_buffer_size=-5 is not valid"),
        ({"local_shuffle_buffer_size": 2.5}, r"local_shuffle_buffer_size=2.5 is not valid"),
        ({"local_shuffle_buffer_size": True}, r"local_shuffle_buffer_size=True is not valid"),
        ({"local_shuffle_buffer_size": "64"}, r"local_shuffle_buffer_size='64' is not valid"),
        (
            {"local_shuffle_buffer_size": 64, "batch_size": None},
            r"local_shuffle_buffer_size=64\) needs a batch_size.*batch_size=n",
        ),
        ({"local_shuffle_seed": -1}, r"local_shuffle_seed=-1\): use an integer >= 0"),
        ({"local_shuffle_seed": "x", "local_shuffle_buffer_size": 8}, r"local_shuffle_seed='x'"),
        ({"local_shuffle_seed": 1.5, "local_shuffle_buffer_size": 8}, r"local_shuffle_seed=1.5"),
        ({"drop_last": "yes"}, r"drop_last='yes'\): use True or False"),
    ],
)
def test_local_shuffle_bad_values_raise_at_the_call(client, call, kwargs, message):
    pytest.importorskip("torch")
    ds = di.range(10).map_batches(_never)
    with pytest.raises(di.PlanError, match=rf"{call}\(" + message):
        getattr(ds, call)(**kwargs)  # refused at the call: no iteration, no run
    assert ds.stats().state == "not executed"


# ------------------------------------------------------------------ Dataset methods


def test_num_blocks_of_materialized_datasets_only(client, tmp_path):
    assert di.from_items(list(range(10)), override_num_blocks=3).num_blocks() == 3
    frames = [pd.DataFrame({"a": [1, 2]}), pd.DataFrame({"a": [3]})]
    assert di.from_pandas(frames).num_blocks() == 2  # a block a frame, as Ray
    assert di.from_numpy(np.zeros((8, 2)), npartitions=4).num_blocks() == 4
    mat = di.range(100, override_num_blocks=4).materialize()
    assert mat.num_blocks() == 4
    assert mat.map_batches(lambda b: b, batch_size=None).materialize().num_blocks() == 4
    # as Ray: not materialized (a reader, range, a verb applied) -> call materialize()
    (tmp_path / "a.csv").write_text("x\n1\n")
    for unmaterialized in (
        di.range(100, override_num_blocks=4),
        di.read_csv(str(tmp_path / "a.csv")),
        di.from_items([1, 2]).map_batches(lambda b: b),
        mat.limit(3),
    ):
        with pytest.raises(
            di.PlanError, match=r"num_blocks\(\).*ds\.materialize\(\)\.num_blocks\(\)"
        ):
            unmaterialized.num_blocks()
        assert unmaterialized.stats().state == "not executed"


def test_size_bytes(client):
    assert di.range(100).size_bytes() == 800  # int64, as Ray's 8 bytes a row
    narrowed = di.range(100, override_num_blocks=3).map_batches(
        lambda b: {"x": b["id"].astype("int32")}
    )
    assert narrowed.size_bytes() == 400  # runs the pipeline
    assert narrowed.stats().state == "finished"
    images = di.from_numpy(np.zeros((10, 4, 4), dtype="float32"))
    assert images.size_bytes() == 10 * 4 * 4 * 4
    mat = di.range(50).materialize()
    run = mat.stats()
    assert mat.size_bytes() == 400
    assert mat.stats() is run  # answered from the blocks, without a run


def test_input_files(client, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    for name in ("part-10.csv", "part-2.csv", "part-1.csv"):
        (root / name).write_text("x\n1\n2\n")
    want = [str(root / n) for n in ("part-1.csv", "part-2.csv", "part-10.csv")]
    ds = di.read_csv(str(root))
    assert ds.input_files() == want  # natural order, no file:// (as Ray's paths)
    assert ds.stats().state == "not executed"
    assert ds.map_batches(lambda b: b).limit(1).input_files() == want  # through verbs
    listed = di.read_csv([want[2], f"file://{want[0]}", want[2]])
    assert listed.input_files() == [want[2], want[0]]  # as listed, each once
    pq = root / "p.parquet"
    pd.DataFrame({"x": [1]}).to_parquet(pq)
    assert di.read_parquet(str(pq)).input_files() == [str(pq)]
    assert ds.materialize().input_files() == []  # as Ray
    assert di.from_items([1]).input_files() == []
    assert di.range(3).input_files() == []


# ------------------------------------------------------------------ override_num_blocks


@pytest.fixture
def three_files(tmp_path) -> dict[str, pathlib.Path]:
    """Three files of 10 rows each (``x`` = 0..29 over them), in each format."""
    out = {}
    for fmt in ("csv", "parquet", "json", "text"):
        root = tmp_path / fmt
        root.mkdir()
        for i in range(3):
            rows = list(range(10 * i, 10 * i + 10))
            path = root / f"part-{i}.{'txt' if fmt == 'text' else fmt}"
            if fmt == "csv":
                pd.DataFrame({"x": rows}).to_csv(path, index=False)
            elif fmt == "parquet":
                pd.DataFrame({"x": rows}).to_parquet(path)
            elif fmt == "json":
                path.write_text("".join(json.dumps({"x": r}) + "\n" for r in rows))
            else:
                path.write_text("".join(f"{r}\n" for r in rows))
        out[fmt] = root
    return out


READERS = {
    "csv": di.read_csv,
    "parquet": di.read_parquet,
    "json": di.read_json,
    "text": di.read_text,
}


@pytest.mark.parametrize("fmt", list(READERS))
def test_readers_override_num_blocks(client, three_files, fmt):
    read = READERS[fmt]
    column = "text" if fmt == "text" else "x"
    for n in (1, 2, 3, 7):
        mat = read(str(three_files[fmt]), override_num_blocks=n).materialize()
        assert mat.num_blocks() == n, (fmt, n)
        values = [int(v) for v in mat.to_pandas()[column]]
        assert values == list(range(30)), (fmt, n)  # every row, in order


def test_file_per_row_readers_override_num_blocks(client, tmp_path):
    root = tmp_path / "bin"
    root.mkdir()
    for i in range(5):
        (root / f"f{i}.bin").write_bytes(bytes([i]) * 3)

    def blocks(**kwargs: object) -> list[list[bytes]]:
        ds = di.read_binary_files(str(root), **kwargs)  # type: ignore[arg-type]
        return [
            b["bytes"].tolist() for b in ds.iter_batches(batch_size=None, batch_format="pandas")
        ]

    assert [len(b) for b in blocks(override_num_blocks=2)] == [2, 3]
    # a block holds at least one file (a row): more blocks than files gives a block a
    # file, as Ray's file readers give a read task a file
    cut = blocks(override_num_blocks=10)
    assert [len(b) for b in cut] == [1] * 5
    assert [b[0] for b in cut] == [bytes([i]) * 3 for i in range(5)]
    assert [len(b) for b in blocks(files_per_block=4)] == [4, 1]
    assert di.read_binary_files(str(root), override_num_blocks=3).materialize().num_blocks() == 3
    with pytest.raises(di.PlanError, match=r"files_per_block=4, override_num_blocks=2.*only one"):
        di.read_binary_files(str(root), files_per_block=4, override_num_blocks=2)
    pytest.importorskip("PIL")
    with pytest.raises(
        di.PlanError, match=r"read_images\(files_per_block=8, override_num_blocks=2"
    ):
        di.read_images(str(root), files_per_block=8, override_num_blocks=2)


def test_from_items_pandas_arrow_override_num_blocks(client):
    df = pd.DataFrame({"a": range(12)})
    for ds in (
        di.from_items([{"a": i} for i in range(12)], override_num_blocks=4),
        di.from_pandas(df, override_num_blocks=4),
        di.from_arrow(pa.Table.from_pandas(df), override_num_blocks=4),
    ):
        assert ds.num_blocks() == 4
        assert ds.to_pandas()["a"].tolist() == list(range(12))
    for make, name in (
        (lambda: di.from_items([1, 2], npartitions=2, override_num_blocks=2), "from_items"),
        (lambda: di.from_pandas(df, npartitions=2, override_num_blocks=3), "from_pandas"),
        (
            lambda: di.from_arrow(pa.table({"a": [1]}), npartitions=1, override_num_blocks=1),
            "from_arrow",
        ),
    ):
        with pytest.raises(di.PlanError, match=rf"{name}\(npartitions=.*give only one of them"):
            make()


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "4"])
def test_override_num_blocks_bad_values(bad):
    """Refused by every reader before it looks at the paths (they do not exist here)."""
    message = rf"override_num_blocks={bad!r}\): use an integer >= 1"
    for name in ("read_parquet", "read_csv", "read_json", "read_text", "read_binary_files"):
        with pytest.raises(di.PlanError, match=rf"{name}\({message}"):
            getattr(di, name)("/no/such/dir", override_num_blocks=bad)
    with pytest.raises(di.PlanError, match=rf"range\({message}"):
        di.range(10, override_num_blocks=bad)
    with pytest.raises(di.PlanError, match=rf"from_items\({message}"):
        di.from_items([1], override_num_blocks=bad)
