"""File sinks: parts written by workers under a temporary name, committed at the end.

Layout while a write runs::

    <path>/_daskinfer_temporary/<run>/<uuid>.<ext>    written by workers
    <path>/_daskinfer_commit-<run>.json               the commit record (see below)
    <path>/<run>_<000000>.<ext>                       renamed into place on commit

With ``partition_cols`` (Parquet), each part lies in its Hive directory, in the temporary
directory and after the commit alike (``<path>/year=2024/<run>_<000000>.parquet``).

Readers (pyarrow, dask, pandas over a directory) skip names that start with ``_``, so a
running or failed write is invisible. A failed write removes its temporary directory.

Exactly once: a part is listed for the commit only when its task's result reached the
driver, once per output block; a retried or recomputed task writes a new file under a
new name, and a file whose task result never arrived is an orphan that stays hidden and
is deleted with the temporary directory. The commit is one atomic step, the commit
record (written under a temporary name, then renamed) that names every part, its final
name and the old files it replaces; the renames follow it. If the driver dies during
the renames, the next write to the same destination (or ``resume=True``) finds the
record and finishes them: no part is lost or shown twice.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
import pandas as pd

from daskinfer._internal.batching import block_to_arrow, column_to_numpy
from daskinfer._internal.tensor import TensorDtype
from daskinfer._internal.transforms import Transform
from daskinfer.exceptions import PlanError

logger = logging.getLogger("daskinfer")

TEMP_DIR = "_daskinfer_temporary"
COMMIT_PREFIX = "_daskinfer_commit-"
MODES = ("error", "overwrite", "append")
EXTENSIONS = {"parquet": "parquet", "csv": "csv", "json": "json", "numpy": "npy"}


def file_extension(fmt: str, options: Mapping[str, Any]) -> str:
    """The extension of a write's files (an image's is its format's: ``png``, ``jpeg``)."""
    return str(options["file_format"]).lower() if fmt == "images" else EXTENSIONS[fmt]


@dataclasses.dataclass(frozen=True, eq=False)
class WriteTransform(Transform):
    """Write one block to a new file in the temporary directory; return its manifest."""

    stage: str
    fmt: str
    temp_url: str
    storage_options: Mapping[str, Any]
    options: Mapping[str, Any]

    def apply(self, block: pd.DataFrame, instance: Any = None) -> pd.DataFrame:
        """Write ``block``; the output is one row per file: its path, rows and partition."""
        if not len(block):
            return pd.DataFrame(
                {
                    "path": pd.Series([], dtype=object),
                    "rows": pd.Series([], dtype="int64"),
                    "partition": pd.Series([], dtype=object),
                }
            )
        if self.fmt == "csv":
            _refuse_array_columns(block)  # before the file exists: nothing to clean up
        paths, rows, partitions = [], [], []
        partition_cols = tuple(self.options.get("partition_cols") or ())
        if self.fmt == "images":  # a file per row
            pieces = [("", block.iloc[i : i + 1]) for i in range(len(block))]
        else:
            pieces = _file_pieces(block, partition_cols, self.options.get("max_rows_per_file"))
        extension = file_extension(self.fmt, self.options)
        for partition, piece in pieces:
            directory = f"{self.temp_url}/{partition}" if partition else self.temp_url
            url = f"{directory}/{uuid.uuid4().hex}.{extension}"
            try:
                self._write_file(url, piece)
            except FileNotFoundError:
                if not partition:
                    raise
                # the partition's directory is new: create it, but only inside a temporary
                # directory that still exists (see below)
                fs, temp_path = fsspec.core.url_to_fs(self.temp_url, **dict(self.storage_options))
                if not fs.isdir(temp_path):
                    raise
                fs.makedirs(f"{temp_path}/{partition}", exist_ok=True)
                self._write_file(url, piece)
            paths.append(url)
            rows.append(len(piece))
            partitions.append(partition)
        return pd.DataFrame({"path": paths, "rows": rows, "partition": partitions})

    def _write_file(self, url: str, block: pd.DataFrame) -> None:
        # no auto_mkdir: if the job failed and its temporary directory is gone, a write
        # that was still running must fail rather than recreate it
        # encoded before the file is opened: a row that cannot be written leaves no file
        array = _column_array(block, self.options["column"]) if self.fmt == "numpy" else None
        image = (
            _encode_image(block, self.options["column"], self.options["file_format"])
            if self.fmt == "images"
            else None
        )
        with fsspec.open(url, "wb", auto_mkdir=False, **dict(self.storage_options)) as f:
            if array is not None:
                np.save(f, array, allow_pickle=False)
            elif image is not None:
                f.write(image)
            elif self.fmt == "parquet":
                import pyarrow.parquet as pq

                pq.write_table(
                    block_to_arrow(block),
                    f,
                    compression=self.options.get("compression", "snappy"),
                    **dict(self.options.get("parquet_args") or {}),
                )
            elif self.fmt == "csv":
                f.write(block.to_csv(index=False).encode())
            else:
                json_args = {"orient": "records", "lines": True}
                json_args.update(self.options.get("json_args") or {})
                f.write(block.to_json(**json_args).encode())


def _column_array(block: pd.DataFrame, column: str) -> np.ndarray:
    """``column`` as one numpy array for a ``.npy`` file (rows along the first axis)."""
    if column not in block.columns:
        raise KeyError(
            f"write_numpy(column={column!r}): no such column; the block has {list(block.columns)}"
        )
    values = column_to_numpy(block[column])
    if values.dtype == object:
        if all(isinstance(v, str) for v in values):
            return np.asarray(values.tolist())  # fixed-width unicode: no pickle needed
        raise TypeError(
            f"write_numpy(column={column!r}): its rows are not one array (rows of different "
            "shapes, or mixed objects), which a .npy file cannot hold without pickling; "
            "write it with write_parquet, or make its rows one shape first"
        )
    return values


_PIL_ALIASES = {"JPG": "JPEG", "TIF": "TIFF"}


def pil_format(file_format: str) -> str:
    """Pillow's name of an image format (``jpg`` is ``JPEG``)."""
    upper = file_format.upper()
    return _PIL_ALIASES.get(upper, upper)


def _encode_image(block: pd.DataFrame, column: str, file_format: str) -> bytes:
    """The one row of ``block``'s ``column`` (an HxW or HxWxC array) as an image file."""
    from PIL import Image

    if column not in block.columns:
        raise KeyError(
            f"write_images(column={column!r}): no such column; the block has {list(block.columns)}"
        )
    pixels = np.asarray(column_to_numpy(block[column])[0])
    try:
        image = Image.fromarray(pixels)
    except TypeError as exc:
        raise TypeError(
            f"write_images(column={column!r}): a row of shape {pixels.shape} and dtype "
            f"{pixels.dtype} is not an image ({exc}); give HxW or HxWx3/4 uint8 arrays"
        ) from None
    buffer = io.BytesIO()
    image.save(buffer, format=pil_format(file_format))
    return buffer.getvalue()


HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"  # pyarrow's (and Hive's) name for a null value


def _file_pieces(
    block: pd.DataFrame, partition_cols: Sequence[str], max_rows: int | None
) -> list[tuple[str, pd.DataFrame]]:
    """Cut a block into the files it becomes: ``(hive directory or "", rows)`` pairs.

    A partition's rows keep their order; the partition columns are left out of the
    files, since their directories hold them (as pyarrow's and Ray Data's writers do).
    """
    if partition_cols:
        keys = {name: _partition_values(block, name) for name in partition_cols}
        data = block.drop(columns=list(partition_cols))
        groups = pd.DataFrame(keys).groupby(list(partition_cols), sort=True, dropna=False)
        pieces = [
            (
                "/".join(
                    f"{name}={urllib.parse.quote(value, safe='')}"
                    for name, value in zip(
                        partition_cols, key if isinstance(key, tuple) else (key,), strict=True
                    )
                ),
                data.iloc[positions],
            )
            for key, positions in groups.indices.items()
        ]
    else:
        pieces = [("", block)]
    if not max_rows:
        return pieces
    return [
        (partition, piece.iloc[start : start + max_rows])
        for partition, piece in pieces
        for start in range(0, len(piece), max_rows)
    ]


def _partition_values(block: pd.DataFrame, name: str) -> np.ndarray:
    """A partition column's values as the text of their directory names.

    Arrow's cast to string gives what pyarrow's own Hive writer puts there (``true``,
    ``2024-01-31``, ``1.5``); nulls become Hive's null name, which readers turn back into null.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    column = block_to_arrow(block[[name]]).column(0)
    try:
        text = pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise TypeError(
            f"write_parquet(partition_cols=...): column {name!r} ({column.type}) cannot name "
            f"a directory ({exc}); partition by a column of scalars (text, numbers, dates, "
            "booleans)"
        ) from None
    return np.asarray(pc.fill_null(text, HIVE_NULL).to_pylist(), dtype=object)


def _array_cell(values: np.ndarray) -> np.ndarray | None:
    """The first numpy array among an object column's values, if any."""
    for value in values:
        if isinstance(value, np.ndarray):
            return value
    return None


def _refuse_array_columns(block: pd.DataFrame) -> None:
    """Refuse a block for CSV if a column holds arrays (images, embeddings, logits).

    pandas writes such a cell as numpy's text of it, which is cut short with ``...``
    past 1000 values and wraps N-D rows over several lines: the values would be lost
    while the write reported success. Ray Data's ``write_csv`` refuses such columns too
    (Arrow's CSV writer has no list or tensor type).
    """
    for name in block.columns:
        col = block[name]
        if isinstance(col.dtype, TensorDtype):
            shape, dtype = col.dtype.cell_shape, col.dtype.subtype
        elif col.dtype == object:
            cell = _array_cell(col.to_numpy())
            if cell is None:
                continue
            shape, dtype = cell.shape, cell.dtype
        else:
            continue
        raise TypeError(
            f"write_csv: column {str(name)!r} holds arrays ({dtype}, shape {shape} in its "
            "first row), which CSV cannot hold: each would be written as numpy's text of "
            "it, cut short with '...' past 1000 values. Use write_parquet, which keeps "
            "arrays, or write_json, which writes them as JSON arrays; or turn the column "
            "into lists or strings first (in a pandas batch: "
            f"df[{str(name)!r}] = [v.tolist() for v in df[{str(name)!r}]]), or drop it"
        )


def check_file_options(
    fmt: str, options: Mapping[str, Any], columns: Sequence[str] | None
) -> dict[str, Any]:
    """Check a write's file options at the call, before any work; return them, normalised.

    ``columns`` are the output's columns where the plan knows them without running
    (``None`` otherwise: a partition column that is not there fails on the first block).
    """
    import importlib.util
    import warnings

    # unset options are left out, so that a resumable write's fingerprint only names
    # what was given
    options = {k: v for k, v in options.items() if v is not None and v != {}}
    call = f"write_{fmt}"
    legacy = options.pop("num_rows_per_file", None)
    if legacy is not None:
        if options.get("min_rows_per_file") is not None:
            raise PlanError(
                f"{call}: num_rows_per_file={legacy!r} and min_rows_per_file="
                f"{options['min_rows_per_file']!r}; num_rows_per_file is the old name of "
                "min_rows_per_file: give only min_rows_per_file"
            )
        warnings.warn(
            f"{call}(num_rows_per_file=) is deprecated, as in Ray Data: use min_rows_per_file",
            DeprecationWarning,
            stacklevel=4,
        )
        options["min_rows_per_file"] = legacy
    for key in ("min_rows_per_file", "max_rows_per_file"):
        value = options.get(key)
        if value is None:
            options.pop(key, None)
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"{call}({key}={value!r}): give a positive number of rows, or None")
    low, high = options.get("min_rows_per_file"), options.get("max_rows_per_file")
    if low is not None and high is not None and low > high:
        raise PlanError(
            f"{call}(min_rows_per_file={low}, max_rows_per_file={high}): the minimum is above "
            "the maximum; lower min_rows_per_file or raise max_rows_per_file"
        )
    column = options.get("column")
    if fmt in ("numpy", "images"):
        if not isinstance(column, str) or not column:
            raise PlanError(f"{call}(column={column!r}): name the column to write")
        if columns is not None and column not in columns:
            raise PlanError(
                f"{call}(column={column!r}): no such column; the output's columns are "
                f"{list(columns)}"
            )
    if fmt == "images":
        if importlib.util.find_spec("PIL") is None:
            raise PlanError("write_images needs Pillow: pip install 'daskinfer[images]'")
        from PIL import Image

        Image.init()
        file_format = options.get("file_format")
        saveable = sorted(name.lower() for name in Image.SAVE)
        if not isinstance(file_format, str) or pil_format(file_format) not in Image.SAVE:
            raise PlanError(
                f"{call}(file_format={file_format!r}): Pillow cannot write that; use one of "
                f"{', '.join(saveable)}"
            )
    partition_cols = options.pop("partition_cols", None)
    if partition_cols:
        if isinstance(partition_cols, str):
            partition_cols = [partition_cols]
        partition_cols = list(partition_cols)
        for name in partition_cols:
            if not isinstance(name, str) or not name or "/" in name or "=" in name:
                raise PlanError(
                    f"{call}(partition_cols={partition_cols!r}): {name!r} cannot name a Hive "
                    "directory; give column names without '/' or '='"
                )
        if len(set(partition_cols)) != len(partition_cols):
            raise PlanError(f"{call}(partition_cols={partition_cols!r}): a column is repeated")
        if columns is not None:
            missing = [c for c in partition_cols if c not in columns]
            if missing:
                raise PlanError(
                    f"{call}(partition_cols={partition_cols!r}): no column {missing[0]!r}; "
                    f"the output's columns are {list(columns)}"
                )
            if len(partition_cols) >= len(columns):
                raise PlanError(
                    f"{call}(partition_cols={partition_cols!r}): every column would go into "
                    "directory names and the files would hold none; leave at least one "
                    "column out of partition_cols"
                )
        options["partition_cols"] = tuple(partition_cols)
    parquet_args = options.get("parquet_args")
    if parquet_args:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:  # pyarrow's own check of its arguments, on one row, here rather than per block
            pq.write_table(
                pa.table({"x": [1]}),
                io.BytesIO(),
                compression=options.get("compression", "snappy"),
                **parquet_args,
            )
        except (TypeError, ValueError, pa.ArrowException) as exc:
            raise PlanError(
                f"{call}: pyarrow refuses {parquet_args!r} ({exc}); give arguments of "
                "pyarrow.parquet.write_table / ParquetWriter (row_group_size, use_dictionary, "
                "version, ...)"
            ) from None
    json_args = options.get("json_args")
    if json_args:
        try:
            pd.DataFrame({"x": [1]}).to_json(**{"orient": "records", "lines": True, **json_args})
        except (TypeError, ValueError) as exc:
            raise PlanError(
                f"{call}: pandas refuses {json_args!r} ({exc}); give arguments of "
                "pandas.DataFrame.to_json (orient, lines, date_format, double_precision, ...)"
            ) from None
    return options


ERRORS_DIR = "_errors"  # dead-letter rows of on_error="quarantine", inside the destination


class FileSink:
    """Checks the destination, hands out the worker-side transform, commits or aborts."""

    def __init__(
        self,
        path: str,
        fmt: str,
        *,
        mode: str,
        storage_options: Mapping[str, Any] | None,
        options: Mapping[str, Any],
    ) -> None:
        if not isinstance(path, str) or not path:
            raise PlanError(f"write_{fmt}(path={path!r}): give a directory path or URL")
        if mode not in MODES:
            raise PlanError(f"write_{fmt}(mode={mode!r}): use one of {', '.join(map(repr, MODES))}")
        self.fmt = fmt
        self.mode = mode
        self.storage_options = dict(storage_options or {})
        self.options = dict(options)
        self.extension = file_extension(fmt, self.options)
        self.fs, self.root = fsspec.core.url_to_fs(path, **self.storage_options)
        self.root = self.root.rstrip("/")
        self.run_id = uuid.uuid4().hex[:12]
        self.temp_root = f"{self.root}/{TEMP_DIR}"
        self.temp_dir = f"{self.temp_root}/{self.run_id}"

    def _url(self, path: str) -> str:
        return str(self.fs.unstrip_protocol(path))

    def existing_files(self) -> list[str]:
        """Visible files already in the destination."""
        if not self.fs.exists(self.root):
            return []
        if not self.fs.isdir(self.root):
            raise PlanError(
                f"write_{self.fmt}: {self._url(self.root)!r} is a file; give a directory path"
            )
        return sorted(
            p
            for p in self.fs.find(self.root)
            if not any(
                part.startswith(("_", ".")) for part in p[len(self.root) :].split("/") if part
            )
        )

    def check_destination(self) -> None:
        """Refuse a non-empty destination in mode ``"error"``, before any work."""
        existing = self.existing_files()
        if existing and self.mode == "error":
            raise PlanError(
                f"write_{self.fmt}: destination {self._url(self.root)!r} already holds "
                f"{len(existing)} file(s), e.g. {existing[0]!r}; pass mode='overwrite' to "
                "replace them or mode='append' to add to them"
            )

    def transform(self, parts_dir: str | None = None) -> WriteTransform:
        """The transform that workers run on each block (writing into ``parts_dir``)."""
        parts_dir = parts_dir or self.temp_dir
        self.fs.makedirs(parts_dir, exist_ok=True)
        return WriteTransform(
            f"Write({self.fmt})", self.fmt, self._url(parts_dir), self.storage_options, self.options
        )

    def stage(self, parts_dir: str | None = None) -> Any:
        """The plan's write stage: whole blocks, or batches of ``min_rows_per_file`` rows."""
        from daskinfer._internal.plan import MapStage

        return MapStage(
            name=f"Write({self.fmt})",
            transform=self.transform(parts_dir),
            batch_size=self.options.get("min_rows_per_file"),
        )

    def commit(
        self,
        parts: Sequence[str],
        *,
        partitions: Sequence[str] | None = None,
        cleanup: Sequence[str] = (),
    ) -> list[str]:
        """Commit ``parts`` (URLs of written parts, in row order) as the output.

        ``partitions`` gives each part's Hive directory ("" for none), where it goes.
        The commit record is written first, atomically; from then on the write counts
        as done, and the renames (and, with ``mode="overwrite"``, the removal of the old
        files) can be finished by ``recover`` if this process dies before it does.
        """
        old = self.existing_files() if self.mode == "overwrite" else []
        moves = []
        for i, url in enumerate(parts):
            src = fsspec.core.url_to_fs(url, **self.storage_options)[1]
            directory = (
                f"{self.root}/{partitions[i]}" if partitions and partitions[i] else self.root
            )
            moves.append((src, f"{directory}/{self.run_id}_{i:06d}.{self.extension}"))
        # cleanup: directories to drop with the commit (a resumable write's journal, which
        # must not outlive it: its entries name parts that are no longer there)
        record = {
            "version": 1,
            "run": self.run_id,
            "moves": moves,
            "remove": old,
            "cleanup": list(cleanup),
        }
        record_path = f"{self.root}/{COMMIT_PREFIX}{self.run_id}.json"
        self.fs.makedirs(self.root, exist_ok=True)
        temp = f"{self.temp_root}/{COMMIT_PREFIX}{self.run_id}.json.tmp"
        self.fs.makedirs(self.temp_root, exist_ok=True)
        with self.fs.open(temp, "wb") as f:
            f.write(json.dumps(record).encode())
        self.fs.mv(temp, record_path)  # the commit point
        self._apply(record)
        self.fs.rm(record_path)
        self._remove_temp()
        return [self._url(dst) for _, dst in moves]

    def _apply(self, record: dict[str, Any]) -> None:
        """Carry out a commit record; safe to repeat (a move already made is skipped)."""
        for src, dst in record["moves"]:
            if self.fs.exists(src):
                parent = dst.rsplit("/", 1)[0]
                if parent != self.root:  # a partition's directory
                    self.fs.makedirs(parent, exist_ok=True)
                self.fs.mv(src, dst)
            elif not self.fs.exists(dst):
                raise OSError(
                    f"commit {record['run']} of {self._url(self.root)!r}: part {src!r} is gone "
                    f"and {dst!r} was never written; the output is incomplete"
                )
        for path in record["remove"]:
            if self.fs.exists(path):
                self.fs.rm(path)
        self._remove_empty_partitions(record["remove"])
        for path in record.get("cleanup", ()):
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)

    def _remove_empty_partitions(self, removed: Sequence[str]) -> None:
        """Remove the directories that removed files leave empty (old partitions).

        Readers would take an empty ``year=2023/`` for a partition with no rows.
        """
        parents = {p.rsplit("/", 1)[0] for p in removed}
        # deepest first, so that a parent emptied by its children goes too
        for directory in sorted(parents, key=lambda d: d.count("/"), reverse=True):
            while directory.startswith(f"{self.root}/") and directory != self.root:
                try:
                    if self.fs.ls(directory, detail=False):
                        break
                    self.fs.rmdir(directory)
                except (OSError, FileNotFoundError):
                    break  # gone already, or an object store with no directories
                directory = directory.rsplit("/", 1)[0]

    def recover(self) -> int:
        """Finish commits that a dead driver left half done; return how many."""
        if not self.fs.exists(self.root) or not self.fs.isdir(self.root):
            return 0
        finished = 0
        for path in sorted(self.fs.ls(self.root, detail=False)):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if not (name.startswith(COMMIT_PREFIX) and name.endswith(".json")):
                continue
            with self.fs.open(path, "rb") as f:
                record = json.loads(f.read())
            self._apply(record)
            self.fs.rm(path)
            finished += 1
            logger.warning(
                "finished the commit of an earlier write to %s (run %s) that its driver left "
                "half done: %d parts",
                self._url(self.root),
                record["run"],
                len(record["moves"]),
            )
        return finished

    def write_quarantine(self, rows: pd.DataFrame, errors_path: str | None) -> str:
        """Write the rows ``on_error="quarantine"`` set aside to a dead-letter Parquet file.

        ``errors_path`` is a directory (any fsspec URL); by default ``_errors/`` inside the
        destination, which readers of the output skip, as they skip every ``_`` name.
        Written under a temporary name and renamed, so a reader never sees half a file.
        """
        import pyarrow.parquet as pq

        from daskinfer._internal.batching import block_to_arrow

        if errors_path is None:
            fs, root = self.fs, f"{self.root}/{ERRORS_DIR}"
        else:
            fs, root = fsspec.core.url_to_fs(errors_path, **self.storage_options)
            root = root.rstrip("/")
        fs.makedirs(root, exist_ok=True)
        final = f"{root}/quarantine-{self.run_id}.parquet"
        temp = f"{root}/.quarantine-{self.run_id}.parquet.tmp"
        with fs.open(temp, "wb") as f:
            pq.write_table(block_to_arrow(rows), f)
        fs.mv(temp, final)
        return str(fs.unstrip_protocol(final))

    def abort(self) -> None:
        """Remove this write's temporary files."""
        self._remove_temp()

    def _remove_temp(self) -> None:
        # a write task that was already running when the job failed may still create
        # its file while we delete: retry until the directory stays gone (workers never
        # recreate it, since they open files without creating parent directories)
        deadline = time.monotonic() + 10.0
        while self.fs.exists(self.temp_dir):
            try:
                self.fs.rm(self.temp_dir, recursive=True)
            except OSError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)
        try:
            if self.fs.exists(self.temp_root) and not self.fs.ls(self.temp_root):
                self.fs.rmdir(self.temp_root)
        except OSError:
            pass  # another write's temporary directory appeared meanwhile
