"""Readers and sinks on real files, checked against pandas/pyarrow, on a real cluster.

Readers: local paths, globs, (nested) directories, lists of paths and ``file://`` URLs.
Sinks: values and row order read back, the three modes, and atomicity when a job fails.
"""

from __future__ import annotations

import os
import pathlib
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dask.utils import natural_sort_key

import daskinfer as di
from daskinfer.io.sinks import TEMP_DIR

N = 1000


def make_frame(n: int = N, start: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(start)
    i = np.arange(start, start + n, dtype="int64")
    return pd.DataFrame({"i": i, "x": rng.normal(size=n).round(6), "s": [f"row-{k}" for k in i]})


def assert_frame_values(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Same columns (in order), same values and row order; text compared as Python str."""
    assert list(got.columns) == list(want.columns)
    assert len(got) == len(want)
    for name in want.columns:
        g, w = got[name].to_numpy(), want[name].to_numpy()
        if w.dtype.kind in "OUS" or g.dtype.kind in "OUS":
            assert [str(v) for v in g] == [str(v) for v in w], name
        else:
            np.testing.assert_allclose(g, w, err_msg=name)


def visible_files(root: pathlib.Path) -> list[str]:
    """Files under ``root`` as relative paths, hidden ones (``_``/``.``) included."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def local(url: str) -> str:
    return url.removeprefix("file://")


def blocks_of(ds: di.Dataset) -> list[pd.DataFrame]:
    return list(ds.iter_batches(batch_size=None, batch_format="pandas"))


# ---------------------------------------------------------------------- readers


@pytest.fixture
def parquet_tree(tmp_path):
    """pq/a.parquet, pq/sub/b.parquet, pq/sub/deeper/c.parquet, plus hidden files."""
    root = tmp_path / "pq"
    (root / "sub" / "deeper").mkdir(parents=True)
    parts = {
        "a.parquet": make_frame(120, 0),
        "sub/b.parquet": make_frame(50, 120),
        "sub/deeper/c.parquet": make_frame(200, 170),
    }
    for name, df in parts.items():
        df.to_parquet(root / name, index=False)
    (root / "_SUCCESS").write_text("")
    make_frame(5, 9000).to_parquet(root / ".hidden.parquet", index=False)
    make_frame(5, 9000).to_parquet(root / "sub" / "_tmp.parquet", index=False)
    return root, parts


def test_read_parquet_nested_directory(client, parquet_tree):
    root, parts = parquet_tree
    ds = di.read_parquet(str(root))
    want = pd.concat(parts.values(), ignore_index=True)
    assert_frame_values(ds.to_pandas(), want)
    assert [len(b) for b in blocks_of(ds)] == [120, 50, 200]
    assert ds.count() == 370
    schema = ds.schema()
    assert schema.names == ["i", "x", "s"]
    assert schema.field("i").type == pa.int64()


def test_read_parquet_glob_list_url(client, parquet_tree):
    root, parts = parquet_tree
    assert_frame_values(di.read_parquet(str(root / "*.parquet")).to_pandas(), parts["a.parquet"])
    assert_frame_values(
        di.read_parquet(str(root / "sub" / "*" / "*.parquet")).to_pandas(),
        parts["sub/deeper/c.parquet"],
    )
    listed = di.read_parquet([str(root / "sub" / "deeper" / "c.parquet"), str(root / "a.parquet")])
    assert_frame_values(
        listed.to_pandas(),
        pd.concat([parts["sub/deeper/c.parquet"], parts["a.parquet"]], ignore_index=True),
    )
    url = f"file://{root}"
    assert_frame_values(
        di.read_parquet(url).to_pandas(), pd.concat(parts.values(), ignore_index=True)
    )
    # "**" spans directories; hidden names are skipped there too
    assert_frame_values(
        di.read_parquet(str(root / "**" / "*.parquet")).to_pandas(),
        pd.concat(parts.values(), ignore_index=True),
    )
    # hidden files are read when the pattern spells them out
    hidden = di.read_parquet(str(root / ".hid*.parquet")).to_pandas()
    assert_frame_values(hidden, make_frame(5, 9000))


def test_read_parquet_columns(client, parquet_tree):
    root, parts = parquet_tree
    ds = di.read_parquet(str(root), columns=["s", "i"])
    assert ds.columns() == ["s", "i"]
    want = pd.concat(parts.values(), ignore_index=True)[["s", "i"]]
    assert_frame_values(ds.to_pandas(), want)


def test_read_parquet_then_transform(client, parquet_tree):
    root, parts = parquet_tree
    want = pd.concat(parts.values(), ignore_index=True)
    out = (
        di.read_parquet(str(root))
        .map_batches(lambda b: {"i": b["i"], "n": np.full(len(b["i"]), len(b["i"]))}, batch_size=64)
        .to_pandas()
    )
    np.testing.assert_array_equal(out["i"].to_numpy(), want["i"].to_numpy())
    assert out["n"].tolist() == [64] * 320 + [50] * 50


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json", "text"])
def test_read_natural_and_list_order(client, tmp_path, fmt):
    """Directories and globs read in natural order (part-2 before part-10); lists as given."""
    root = tmp_path / "parts"
    root.mkdir()
    frames = {k: make_frame(10, 100 * k) for k in (1, 2, 10, 11)}
    ext = {"parquet": "parquet", "csv": "csv", "json": "jsonl", "text": "txt"}[fmt]
    for k, df in frames.items():
        path = root / f"part-{k}.{ext}"
        if fmt == "parquet":
            df.to_parquet(path, index=False)
        elif fmt == "csv":
            df.to_csv(path, index=False)
        elif fmt == "json":
            df.to_json(path, orient="records", lines=True)
        else:
            path.write_text("".join(f"{i}\n" for i in df["i"]))
    reader = {
        "parquet": di.read_parquet,
        "csv": di.read_csv,
        "json": di.read_json,
        "text": di.read_text,
    }[fmt]

    def ids(ds: di.Dataset) -> list[int]:
        out = ds.to_pandas()
        return [int(v) for v in (out["text"] if fmt == "text" else out["i"])]

    def expected(order: list[int]) -> list[int]:
        return [int(i) for k in order for i in frames[k]["i"]]

    assert ids(reader(str(root))) == expected([1, 2, 10, 11])
    assert ids(reader(str(root / f"part-*.{ext}"))) == expected([1, 2, 10, 11])
    listed = [str(root / f"part-{k}.{ext}") for k in (11, 2, 10, 1)]
    assert ids(reader(listed)) == expected([11, 2, 10, 1])


def test_read_csv(client, tmp_path):
    root = tmp_path / "csv"
    (root / "nested").mkdir(parents=True)
    a, b = make_frame(100, 0), make_frame(70, 100)
    a.to_csv(root / "a.csv", index=False)
    b.to_csv(root / "nested" / "b.csv", index=False)
    (root / "notes.txt").write_text("not a csv")
    want = pd.concat([a, b], ignore_index=True)
    assert_frame_values(di.read_csv(str(root)).to_pandas(), want)
    assert_frame_values(di.read_csv(str(root / "*.csv")).to_pandas(), a)
    assert_frame_values(di.read_csv([str(root / "nested" / "b.csv")]).to_pandas(), b)
    assert_frame_values(di.read_csv(f"file://{root}").to_pandas(), want)
    ds = di.read_csv(str(root))
    assert ds.schema().field("i").type == pa.int64()
    # pandas keyword arguments reach pandas.read_csv
    subset = di.read_csv(str(root / "a.csv"), usecols=["i", "s"]).to_pandas()
    assert_frame_values(subset, a[["i", "s"]])


def test_read_json_lines(client, tmp_path):
    root = tmp_path / "json"
    (root / "deep" / "er").mkdir(parents=True)
    a, b = make_frame(80, 0), make_frame(40, 80)
    a.to_json(root / "a.jsonl", orient="records", lines=True)
    b.to_json(root / "deep" / "er" / "b.json", orient="records", lines=True)
    want = pd.concat([a, b], ignore_index=True)
    assert_frame_values(di.read_json(str(root)).to_pandas(), want)
    assert_frame_values(di.read_json(str(root / "*.jsonl")).to_pandas(), a)
    assert_frame_values(
        di.read_json([str(root / "deep" / "er" / "b.json"), str(root / "a.jsonl")]).to_pandas(),
        pd.concat([b, a], ignore_index=True),
    )
    assert_frame_values(di.read_json(f"file://{root}").to_pandas(), want)


def test_read_text(client, tmp_path):
    root = tmp_path / "text"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("first line\nsecond line\n\nfourth, after an empty one\n")
    (root / "sub" / "b.txt").write_text("b1\nb2")
    (root / "z.md").write_text("# title\nünïcödé\n")
    want_a = ["first line", "second line", "", "fourth, after an empty one"]
    want = [*want_a, "b1", "b2", "# title", "ünïcödé"]
    ds = di.read_text(str(root), drop_empty_lines=False)  # kept here: rows and blocks
    assert ds.columns() == ["text"]
    assert [r["text"] for r in ds.take_all()] == want
    assert [len(b) for b in blocks_of(ds)] == [4, 2, 2]
    globbed = di.read_text(str(root / "*.txt"), drop_empty_lines=False)
    assert [r["text"] for r in globbed.take_all()] == want_a
    assert [r["text"] for r in di.read_text(f"file://{root / 'sub'}").take_all()] == ["b1", "b2"]
    listed = di.read_text([str(root / "z.md"), str(root / "sub" / "b.txt")])
    assert [r["text"] for r in listed.take_all()] == ["# title", "ünïcödé", "b1", "b2"]
    dropped = di.read_text(str(root / "a.txt"))  # Ray's default: drop_empty_lines=True
    assert [r["text"] for r in dropped.take_all()] == [t for t in want_a if t]
    batch = ds.take_batch(8)
    assert list(batch["text"]) == want
    upper = ds.map_batches(
        lambda b: {"text": np.array([t.upper() for t in b["text"]], dtype=object)}
    )
    assert [r["text"] for r in upper.take_all()] == [t.upper() for t in want]


@pytest.fixture
def image_tree(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    (root / "more").mkdir(parents=True)
    rng = np.random.default_rng(1)
    arrays = {
        "a.png": rng.integers(0, 255, size=(8, 6, 3), dtype=np.uint8),
        "b.png": rng.integers(0, 255, size=(5, 7, 3), dtype=np.uint8),
        "more/c.png": rng.integers(0, 255, size=(4, 4, 3), dtype=np.uint8),
    }
    for name, arr in arrays.items():
        Image.fromarray(arr, mode="RGB").save(root / name)
    (root / "readme.txt").write_text("not an image")
    return root, arrays


def ray_data_decode(data: bytes, size: tuple[int, int], mode: str):
    """What Ray Data's ImageDatasource does with a file's bytes (Ray 2.x, _read_stream)."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image = image.resize((size[1], size[0]), resample=Image.BILINEAR)
    return image.convert(mode)


class SlowImageServer:
    """A threaded HTTP server for a directory that holds each GET for ``delay_s``.

    Counts the most requests it served at once: read_images fetches a block's files
    concurrently from object stores, which shows here as more than one at a time.
    """

    def __init__(self, root: pathlib.Path, delay_s: float = 0.2) -> None:
        import functools
        import http.server
        import threading

        server_self = self
        self.lock = threading.Lock()
        self.active = self.most_at_once = self.requests = 0

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                with server_self.lock:
                    server_self.active += 1
                    server_self.requests += 1
                    server_self.most_at_once = max(server_self.most_at_once, server_self.active)
                try:
                    threading.Event().wait(delay_s)
                    super().do_GET()
                finally:
                    with server_self.lock:
                        server_self.active -= 1

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            # socketserver's default backlog of 5 drops concurrent connections, which
            # the client retries a second later: a server artifact, not a client cost
            request_queue_size = 128

        self.httpd = Server(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_read_images_over_http_fetches_a_block_s_files_at_once(client, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    arrays = [rng.integers(0, 255, size=(6, 6, 3), dtype=np.uint8) for _ in range(12)]
    names = [f"img-{i}.png" for i in range(10)] + ["odd [1].png", "odd*.png"]  # taken literally
    for name, arr in zip(names, arrays, strict=True):
        Image.fromarray(arr).save(tmp_path / name)
    with SlowImageServer(tmp_path) as server:
        urls = [f"{server.url}/{name.replace(' ', '%20').replace('*', '%2A')}" for name in names]
        rows = di.read_images(urls, include_paths=True, files_per_block=12).take_all()
        assert server.most_at_once > 1, "the block's files were fetched one after another"
    assert [r["path"] for r in rows] == urls
    for row, want in zip(rows, arrays, strict=True):
        np.testing.assert_array_equal(row["image"], want)


def test_read_images_that_cannot_be_fetched_fail_naming_the_file(client, tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "there.png")
    with SlowImageServer(tmp_path, delay_s=0.0) as server:
        ds = di.read_images([f"{server.url}/there.png"])
        (tmp_path / "there.png").unlink()  # gone between planning and reading
        with pytest.raises(di.UserCodeError, match=r"there\.png' could not be read"):
            ds.take_all()


def test_read_images(client, image_tree):
    root, arrays = image_tree
    ds = di.read_images(str(root))
    assert ds.columns() == ["image"]
    rows = ds.take_all()
    assert len(rows) == 3
    for row, want in zip(rows, arrays.values(), strict=True):
        assert isinstance(row["image"], np.ndarray)
        assert row["image"].dtype == np.uint8
        np.testing.assert_array_equal(row["image"], want)


def test_read_images_size_mode_paths(client, image_tree):
    root, arrays = image_tree
    ds = di.read_images(str(root), size=(3, 5), mode="L", include_paths=True)
    batch = ds.take_batch(10)
    assert batch["image"].shape == (3, 3, 5)  # stacked: same size for all
    assert batch["image"].dtype == np.uint8
    for k, name in enumerate(arrays):
        # the pixels Ray Data's read_images gives: resized bilinear (not Pillow's
        # default, bicubic), so that a ported pipeline sees the same inputs
        png = (root / name).read_bytes()
        want = np.asarray(ray_data_decode(png, size=(3, 5), mode="L"))
        np.testing.assert_array_equal(batch["image"][k], want)
        assert local(str(batch["path"][k])) == str(root / name)
    rgb = di.read_images(str(root / "*.png"), size=(2, 2)).take_batch(10)
    assert rgb["image"].shape == (2, 2, 2, 3)
    listed = di.read_images([str(root / "more" / "c.png")], include_paths=True).take_all()
    assert len(listed) == 1 and local(listed[0]["path"]) == str(root / "more" / "c.png")
    via_url = di.read_images(f"file://{root}").take_all()
    assert len(via_url) == 3


def test_read_images_through_map_batches(client, image_tree):
    root, arrays = image_tree
    ds = di.read_images(str(root), size=(4, 4)).map_batches(
        lambda b: {"mean": b["image"].reshape(len(b["image"]), -1).mean(axis=1)}, batch_size=2
    )
    means = ds.to_pandas()["mean"].to_numpy()
    from PIL import Image

    want = [
        np.asarray(Image.fromarray(a).resize((4, 4), Image.Resampling.BILINEAR)).mean()
        for a in arrays.values()
    ]
    np.testing.assert_allclose(means, want)


def test_read_binary_files(client, image_tree):
    root, arrays = image_tree
    want = {str(root / name): (root / name).read_bytes() for name in arrays}
    want[str(root / "readme.txt")] = (root / "readme.txt").read_bytes()
    ds = di.read_binary_files(str(root), include_paths=True, files_per_block=2)
    assert ds.columns() == ["bytes", "path"]
    rows = ds.take_all()
    got = {local(r["path"]): r["bytes"] for r in rows}
    assert got == want  # every file, whole, as bytes (not str)
    assert all(isinstance(r["bytes"], bytes) for r in rows)
    assert [local(r["path"]) for r in rows] == sorted(got, key=natural_sort_key)
    # decoded later, in a stage of its own (or by the predictor, on its device)
    import io

    from PIL import Image

    decoded = (
        ds.filter(lambda r: r["path"].endswith(".png"))
        .map(
            lambda r: {
                "path": r["path"],
                "shape": np.asarray(Image.open(io.BytesIO(r["bytes"]))).shape,
            }
        )
        .take_all()
    )
    assert {local(r["path"]): tuple(r["shape"]) for r in decoded} == {
        str(root / name): arr.shape for name, arr in arrays.items()
    }
    assert di.read_binary_files(str(root / "a.png")).columns() == ["bytes"]
    with pytest.raises(di.PlanError, match=r"files_per_block=0\): use a positive integer"):
        di.read_binary_files(str(root), files_per_block=0)


def test_read_binary_files_writes_to_parquet_as_binary(client, image_tree, tmp_path):
    root, _ = image_tree
    di.read_binary_files(str(root / "*.png"), include_paths=True).write_parquet(
        str(tmp_path / "out")
    )
    table = pq.read_table(str(tmp_path / "out"))
    assert table.schema.field("bytes").type == pa.binary()
    by_path = dict(
        zip(table.column("path").to_pylist(), table.column("bytes").to_pylist(), strict=True)
    )
    assert {local(p): b for p, b in by_path.items()} == {
        str(root / n): (root / n).read_bytes() for n in ("a.png", "b.png")
    }


READERS = {
    "read_parquet": lambda p: di.read_parquet(p),
    "read_csv": lambda p: di.read_csv(p),
    "read_json": lambda p: di.read_json(p),
    "read_text": lambda p: di.read_text(p),
    "read_images": lambda p: di.read_images(p),
    "read_binary_files": lambda p: di.read_binary_files(p),
}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_missing_path(client, tmp_path, reader):
    missing = str(tmp_path / "no" / "such" / "thing")
    with pytest.raises(di.PlanError, match=f"{reader}.*does not exist") as info:
        READERS[reader](missing)
    assert missing in str(info.value)


@pytest.mark.parametrize("reader", sorted(READERS))
def test_glob_matching_nothing(client, tmp_path, reader):
    (tmp_path / "other.bin").write_bytes(b"x")
    pattern = str(tmp_path / "*.nothing")
    with pytest.raises(di.PlanError, match="matched no files") as info:
        READERS[reader](pattern)
    assert pattern in str(info.value)


def test_directory_without_matching_files(client, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(di.PlanError, match=r"matched no files with extension \.parquet") as info:
        di.read_parquet(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_missing_path_in_a_list(client, tmp_path, parquet_tree):
    root, _ = parquet_tree
    missing = str(tmp_path / "gone.parquet")
    with pytest.raises(di.PlanError) as info:
        di.read_parquet([str(root / "a.parquet"), missing])
    assert missing in str(info.value)


# ---------------------------------------------------------------------- sinks


def pipeline(n: int = N) -> tuple[di.Dataset, pd.DataFrame]:
    df = make_frame(n)

    def scale(batch: pd.DataFrame) -> pd.DataFrame:
        return batch.assign(y=batch["x"] * 10)

    ds = di.from_pandas(df, npartitions=7).map_batches(scale, batch_size=64, batch_format="pandas")
    return ds, df.assign(y=df["x"] * 10)


READ_BACK = {
    "parquet": lambda p: pd.read_parquet(p),
    "csv": lambda p: pd.read_csv(p),
    "json": lambda p: pd.read_json(p, orient="records", lines=True),
}


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json"])
def test_write_and_read_back(client, tmp_path, fmt):
    ds, want = pipeline()
    dest = tmp_path / "out"
    paths = getattr(ds, f"write_{fmt}")(str(dest))
    assert paths, "no files written"
    assert all(os.path.exists(local(p)) for p in paths)
    assert all(local(p).endswith(f".{fmt}") for p in paths)
    # the returned paths are in row order
    got = pd.concat([READ_BACK[fmt](local(p)) for p in paths], ignore_index=True)
    assert_frame_values(got, want)
    # nothing else in the destination, and no temporary directory left
    assert sorted(visible_files(dest)) == sorted(os.path.relpath(local(p), dest) for p in paths)
    # file names sort in row order too, so a directory reader sees the rows in order
    assert sorted(paths) == paths
    # the written files read back through daskinfer's own reader, in order
    reader = {"parquet": di.read_parquet, "csv": di.read_csv, "json": di.read_json}[fmt]
    assert_frame_values(reader(str(dest)).to_pandas(), want)


def test_write_parquet_read_by_pyarrow_directory(client, tmp_path):
    ds, want = pipeline()
    dest = tmp_path / "out"
    ds.write_parquet(str(dest))
    table = pq.read_table(str(dest))
    assert_frame_values(table.to_pandas(), want)


def test_write_parquet_file_url(client, tmp_path):
    ds, want = pipeline(300)
    dest = tmp_path / "url_out"
    paths = ds.write_parquet(f"file://{dest}")
    assert all(p.startswith("file://") for p in paths)
    assert_frame_values(pd.read_parquet(str(dest)), want)


def test_write_parquet_vectors(client, tmp_path):
    arr = np.arange(60 * 4, dtype="float32").reshape(60, 4)
    ds = di.from_numpy(arr, npartitions=3)
    ds.write_parquet(str(tmp_path / "vec"))
    table = pq.read_table(str(tmp_path / "vec"))
    np.testing.assert_array_equal(np.array(table["data"].to_pylist(), dtype="float32"), arr)
    back = di.read_parquet(str(tmp_path / "vec")).take_batch(60)
    assert back["data"].shape == (60, 4)
    np.testing.assert_array_equal(back["data"], arr)


def test_write_parquet_compression(client, tmp_path):
    ds, want = pipeline(200)
    paths = ds.write_parquet(str(tmp_path / "gz"), compression="gzip")
    meta = pq.ParquetFile(local(paths[0])).metadata
    assert meta.row_group(0).column(0).compression == "GZIP"
    assert_frame_values(pd.read_parquet(tmp_path / "gz"), want)


def test_write_parquet_nd_values(client, tmp_path):
    arr = np.arange(40 * 3 * 2, dtype="float32").reshape(40, 3, 2)
    paths = di.from_numpy(arr, npartitions=3).write_parquet(str(tmp_path / "nd"))
    table = pq.read_table(local(paths[0]))
    assert isinstance(table.schema.field("data").type, pa.FixedShapeTensorType)
    got = np.concatenate(
        [pq.read_table(local(p))["data"].combine_chunks().to_numpy_ndarray() for p in paths]
    )
    np.testing.assert_array_equal(got, arr)


def test_write_parquet_images(client, image_tree, tmp_path):
    root, _ = image_tree
    paths = di.read_images(str(root), size=(4, 5)).write_parquet(str(tmp_path / "img"))
    got = np.concatenate(
        [pq.read_table(local(p))["image"].combine_chunks().to_numpy_ndarray() for p in paths]
    )
    assert got.shape == (3, 4, 5, 3)
    assert got.dtype == np.uint8


def test_write_parquet_ragged_images_error(client, image_tree, tmp_path):
    root, _ = image_tree
    with pytest.raises(di.UserCodeError, match="different shapes") as info:
        di.read_images(str(root)).write_parquet(str(tmp_path / "img"))
    assert "size=" in str(info.value)
    assert not (tmp_path / "img" / TEMP_DIR).exists()


class Marker:
    """A batch function that leaves a file per call, to see whether any work ran."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.__name__ = "marker"

    def __call__(self, batch):
        import uuid

        pathlib.Path(self.folder, uuid.uuid4().hex).write_text("called")
        return batch


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json"])
def test_mode_error_refuses_before_any_work(client, tmp_path, fmt):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "existing.txt").write_text("keep me")
    calls = tmp_path / "calls"
    calls.mkdir()
    ds = di.from_pandas(make_frame(200), npartitions=2).map_batches(
        Marker(str(calls)), batch_size=50
    )
    with pytest.raises(di.PlanError, match="already holds 1 file") as info:
        getattr(ds, f"write_{fmt}")(str(dest))
    assert str(dest) in str(info.value)
    assert "mode='overwrite'" in str(info.value)
    assert visible_files(dest) == ["existing.txt"]  # no new files, no temporary directory
    assert list(calls.iterdir()) == []  # the pipeline never ran
    assert (dest / "existing.txt").read_text() == "keep me"


def test_mode_error_accepts_empty_or_missing_destination(client, tmp_path):
    ds, want = pipeline(100)
    (tmp_path / "empty").mkdir()
    ds.write_parquet(str(tmp_path / "empty"))
    ds.write_parquet(str(tmp_path / "missing" / "deeper"))
    assert_frame_values(pd.read_parquet(tmp_path / "empty"), want)
    assert_frame_values(pd.read_parquet(tmp_path / "missing" / "deeper"), want)


def test_mode_overwrite(client, tmp_path):
    dest = tmp_path / "out"
    old_ds, _ = pipeline(50)
    old_paths = old_ds.write_parquet(str(dest))
    (dest / "stray.parquet").write_bytes(b"old")
    ds, want = pipeline(400)
    paths = ds.write_parquet(str(dest), mode="overwrite")
    assert not any(os.path.exists(local(p)) for p in old_paths)
    assert not (dest / "stray.parquet").exists()
    assert sorted(visible_files(dest)) == sorted(os.path.relpath(local(p), dest) for p in paths)
    assert_frame_values(pd.read_parquet(dest), want)


def test_mode_append(client, tmp_path):
    dest = tmp_path / "out"
    first_ds, first = pipeline(100)
    first_paths = first_ds.write_csv(str(dest))
    second_df = make_frame(150, 5000)
    second_paths = di.from_pandas(second_df, npartitions=2).write_csv(str(dest), mode="append")
    assert set(first_paths).isdisjoint(second_paths)
    assert sorted(visible_files(dest)) == sorted(
        os.path.relpath(local(p), dest) for p in [*first_paths, *second_paths]
    )
    got_first = pd.concat([pd.read_csv(local(p)) for p in first_paths], ignore_index=True)
    got_second = pd.concat([pd.read_csv(local(p)) for p in second_paths], ignore_index=True)
    assert_frame_values(got_first, first)
    assert_frame_values(got_second, second_df)


def test_invalid_mode(client, tmp_path):
    ds, _ = pipeline(10)
    with pytest.raises(di.PlanError, match="mode='replace'"):
        ds.write_parquet(str(tmp_path / "out"), mode="replace")
    assert not (tmp_path / "out").exists()


def explode_late(batch):
    if batch["i"][0] >= 800:
        raise ValueError(f"exploded on the batch starting at row {batch['i'][0]}")
    return batch


@pytest.mark.parametrize("mode", ["error", "overwrite", "append"])
@pytest.mark.parametrize("fmt", ["parquet", "csv", "json"])
def test_failed_job_leaves_no_partial_output(client, tmp_path, fmt, mode):
    dest = tmp_path / "out"
    before: list[str] = []
    if mode != "error":
        old = make_frame(30, 7000)
        getattr(di.from_pandas(old), f"write_{fmt}")(str(dest))
        before = visible_files(dest)
        contents = {name: (dest / name).read_bytes() for name in before}
    ds = di.from_pandas(make_frame(), npartitions=7).map_batches(explode_late, batch_size=100)
    with pytest.raises(di.UserCodeError) as info:
        getattr(ds, f"write_{fmt}")(str(dest), mode=mode)
    message = str(info.value)
    assert "MapBatches(explode_late)" in message
    # the batches at rows 800 and 900 both fail, in tasks that may finish in either
    # order (under load the later one did first): the error names the one that failed
    assert re.search(r"exploded on the batch starting at row (800|900)", message)
    assert "raise ValueError" in message  # the worker's traceback text
    assert isinstance(info.value.__cause__, ValueError)
    # no part files, no temporary directory; earlier content intact
    assert visible_files(dest) == before if dest.exists() else before == []
    assert not (dest / TEMP_DIR).exists()
    if mode != "error":
        assert {name: (dest / name).read_bytes() for name in before} == contents


def test_failed_job_then_success(client, tmp_path):
    dest = tmp_path / "out"
    bad = di.from_pandas(make_frame(), npartitions=7).map_batches(explode_late, batch_size=100)
    with pytest.raises(di.UserCodeError):
        bad.write_parquet(str(dest))
    ds, want = pipeline()
    ds.write_parquet(str(dest))  # mode="error" accepts what the failed job left: nothing
    assert_frame_values(pd.read_parquet(dest), want)


def test_write_after_limit_and_filter(client, tmp_path):
    df = make_frame()
    ds = di.from_pandas(df, npartitions=7).filter(lambda r: r["i"] % 2 == 1).limit(123)
    paths = ds.write_json(str(tmp_path / "out"))
    got = pd.concat(
        [pd.read_json(local(p), orient="records", lines=True) for p in paths], ignore_index=True
    )
    assert_frame_values(got, df[df["i"] % 2 == 1].iloc[:123].reset_index(drop=True))


@pytest.mark.filterwarnings(
    # dask's parquet reader calls reset_index(inplace=True); in-process workers share
    # this process's warning filters, which turn it into an error
    "ignore:The inplace keyword in DataFrame.reset_index"
)
def test_memory_filesystem_round_trip(tmp_path):
    """``memory://`` works where workers share this process (an in-process cluster)."""
    from distributed import Client, LocalCluster

    df = make_frame(300)
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=2,
            processes=False,
            dashboard_address=None,
            silence_logs=40,
        ) as cluster,
        Client(cluster, set_as_default=False) as c,
        c.as_current(),
    ):
        ds = di.from_pandas(df, npartitions=3).map_batches(
            lambda b: b.assign(y=b["i"] * 2), batch_size=64, batch_format="pandas"
        )
        paths = ds.write_parquet("memory://daskinfer-test/out")
        assert paths and all(p.startswith("memory://") for p in paths)
        back = di.read_parquet("memory://daskinfer-test/out").to_pandas()
        assert_frame_values(back, df.assign(y=df["i"] * 2))
        # each row's file, as the URL write_parquet returned for it
        with_paths = di.read_parquet("memory://daskinfer-test/out", include_paths=True)
        got = with_paths.to_pandas()
        assert sorted(set(got["path"])) == sorted(paths)
        assert got.groupby("path")["i"].count().sum() == len(df)
        import fsspec

        fs = fsspec.filesystem("memory")
        assert not fs.exists(f"/daskinfer-test/out/{TEMP_DIR}")
        fs.rm("/daskinfer-test", recursive=True)
