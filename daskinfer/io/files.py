"""Datasets from files on any fsspec URL: Parquet, CSV, JSON, text, binary, images, numpy.

Paths are expanded here first (globs, directories), so that a path matching nothing
fails at once with the path in the message.
"""

from __future__ import annotations

import builtins
import functools
import importlib.util
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

import dask.dataframe as dd
from dask.dataframe.io.parquet.arrow import ArrowDatasetEngine
from dask.utils import natural_sort_key

from daskinfer._internal.batching import arrow_to_pandas, batch_to_block
from daskinfer._internal.ray_args import CSV_ARGS, READER_ARGS, takes_ray_args
from daskinfer.dataset import Dataset
from daskinfer.exceptions import PlanError
from daskinfer.io._source import (
    _check_override_num_blocks,
    _dataset,
    _override_blocks,
    keep_object_columns,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _is_hidden(name: str) -> bool:
    return name.startswith(("_", "."))


def _hidden_by_glob(pattern: str, match: str) -> bool:
    """Whether a glob match passes through a hidden name the pattern did not spell out.

    Names starting with ``_`` or ``.`` (``_SUCCESS``, ``.DS_Store``, a running write's
    ``_daskinfer_temporary``) are skipped, as in a directory listing, unless the pattern
    asks for them at that level (``data/.cache/*``, ``_*.parquet``).
    """
    pat = pattern.rstrip("/").split("/")
    got = match.rstrip("/").split("/")
    if "**" not in pat:
        return len(pat) == len(got) and any(
            _is_hidden(g) and not p.startswith(g[0]) for p, g in zip(pat, got, strict=True)
        )
    head = pat.index("**")
    if any(_is_hidden(g) and not p.startswith(g[0]) for p, g in zip(pat[:head], got, strict=False)):
        return True
    spelled = {p[0] for p in pat[head:] if _is_hidden(p)}
    return any(_is_hidden(g) and g[0] not in spelled for g in got[head:])


def expand_paths(
    paths: str | Sequence[str],
    call: str,
    *,
    extensions: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    file_extensions: Sequence[str] | None = None,
) -> list[str]:
    """Expand files, globs and directories (recursively) into a list of URLs.

    The matches of each glob or directory are in natural order (``part-2`` before
    ``part-10``, as dask's readers order them); a list keeps the order it was given in.
    ``extensions``: the reader's own, which keep a directory's files of its format.
    ``file_extensions``: the user's (Ray Data's argument), which keep only the files
    ending so, however they were named, in place of the reader's.
    """
    import fsspec

    wanted = _check_file_extensions(file_extensions, call)
    if wanted is not None:
        extensions = None

    items = [paths] if isinstance(paths, str) else list(paths)
    if not items or not all(isinstance(p, str) and p for p in items):
        raise PlanError(
            f"{call}(paths={paths!r}): give a path, a glob, a directory or a list of them"
        )
    found: list[str] = []
    for item in items:
        fs, path = fsspec.core.url_to_fs(item, **dict(storage_options or {}))
        # a name with glob characters that exists as a file ("scan [1].png") is that file
        if any(ch in path for ch in "*?[") and not fs.isfile(path):
            matches = sorted(
                (p for p in fs.glob(path) if not fs.isdir(p) and not _hidden_by_glob(path, p)),
                key=natural_sort_key,
            )
        elif fs.isdir(path):
            matches = sorted(
                (
                    p
                    for p in fs.find(path)
                    if not any(_is_hidden(part) for part in p[len(path) :].split("/") if part)
                ),
                key=natural_sort_key,
            )
            if extensions:
                matches = [p for p in matches if p.lower().endswith(tuple(extensions))]
        elif fs.exists(path):
            matches = [path]
        else:
            raise PlanError(
                f"{call}: {item!r} does not exist; check the path (globs and directories are allowed)"
            )
        if not matches:
            which = f" with extension {', '.join(extensions)}" if extensions else ""
            raise PlanError(
                f"{call}: {item!r} matched no files{which}; check the path or the pattern"
            )
        found.extend(str(fs.unstrip_protocol(p)) for p in matches)
    if wanted is not None:
        kept = [url for url in found if url.lower().endswith(wanted)]
        if not kept:
            raise PlanError(
                f"{call}(file_extensions={file_extensions!r}): none of the {len(found)} "
                f"files under {paths!r} ends with {' or '.join(wanted)}; check the "
                "extensions, or leave file_extensions out to read them all"
            )
        return kept
    return found


def _check_file_extensions(value: Any, call: str) -> tuple[str, ...] | None:
    """Ray Data's ``file_extensions`` (``["jpg", "png"]``) as lower-case suffixes."""
    if value is None:
        return None
    if (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or not value
        or not all(isinstance(v, str) and v.strip(".") for v in value)
    ):
        raise PlanError(
            f"{call}(file_extensions={value!r}): give a list of extensions, e.g. "
            "['parquet'] or ['jpg', 'png'], or None for every file"
        )
    return tuple("." + v.lower().lstrip(".") for v in value)


ROW_FILTER = "daskinfer_row_filter"  # read_parquet(filter=), carried in dask's arrow_to_pandas


class _ParquetEngine(ArrowDatasetEngine):
    """dask's pyarrow engine for Parquet, with N-D columns read as tensor columns.

    dask's own engine cannot read back what ``write_parquet`` makes of N-D rows (Arrow's
    ``fixed_shape_tensor``): it builds the meta from ``schema.empty_table()``, which
    pyarrow refuses for that type with a permutation (``write_parquet``'s carry the
    identity one), and ``Table.to_pandas`` gives each row as a flat 1-D array (an
    ``(h, w, 3)`` image as ``h*w*3`` numbers). Here such columns become ``TensorArray``
    columns of the written shape and dtype, in the meta as in every partition, as in a
    Dataset made by ``from_numpy``; dask converts the other columns as it does.

    An engine rather than a ``types_mapper`` in dask's ``arrow_to_pandas`` option: dask
    stores its wrapper of that mapper back into the option, which the partitions of one
    read share, so each partition read in a process wraps it once more (one stack frame
    more per partition with dask 2026.8: a RecursionError after about a thousand).
    """

    @classmethod
    def _create_dd_meta(cls, dataset_info: dict[str, Any]) -> pd.DataFrame:
        # dask makes the meta from ``schema.empty_table()``, which pyarrow refuses for a
        # fixed_shape_tensor type with a permutation ("not supported"), and the type
        # that write_parquet writes carries one (the identity): let dask see the storage
        # type (fixed-size lists) here only, then put in each tensor column as it reads
        schema = dataset_info["schema"]
        tensors = {f.name: f.type for f in schema if isinstance(f.type, pa.FixedShapeTensorType)}
        if not tensors:
            return super()._create_dd_meta(dataset_info)
        dataset_info["schema"] = pa.schema(
            [f.with_type(f.type.storage_type) if f.name in tensors else f for f in schema],
            metadata=schema.metadata,
        )
        try:
            meta = super()._create_dd_meta(dataset_info)
        finally:
            dataset_info["schema"] = schema  # the files are read with their own types
        empty = pa.table(
            {
                name: pa.ExtensionArray.from_storage(typ, pa.array([], typ.storage_type))
                for name, typ in tensors.items()
            }
        )
        for name, column in arrow_to_pandas(empty).items():
            if name in meta.columns:
                meta[name] = column.array
        return meta

    @classmethod
    def multi_support(cls) -> bool:
        # dask reads several pieces of a partition at once only with its own engine (a
        # subclass might read differently); this one reads as dask's does
        return True

    @classmethod
    def _arrow_table_to_pandas(
        cls, arrow_table: pa.Table, categories: Any, *args: Any, **kwargs: Any
    ) -> pd.DataFrame:
        # read_parquet(filter=): a pyarrow expression, applied to each table as read,
        # before the rows it drops cost a conversion (a copy of dask's options without
        # it, since dask hands the rest to Table.to_pandas)
        to_pandas = dict(kwargs.get("arrow_to_pandas") or {})
        row_filter = to_pandas.pop(ROW_FILTER, None)
        kwargs["arrow_to_pandas"] = to_pandas
        if row_filter is not None:
            arrow_table = arrow_table.filter(row_filter)
        schema = arrow_table.schema
        tensors = [f.name for f in schema if isinstance(f.type, pa.FixedShapeTensorType)]
        if not tensors:
            return super()._arrow_table_to_pandas(arrow_table, categories, *args, **kwargs)
        df = super()._arrow_table_to_pandas(
            arrow_table.drop_columns(tensors), categories, *args, **kwargs
        )
        as_tensors = arrow_to_pandas(arrow_table.select(tensors))
        for name in tensors:  # in the file's column order
            before = schema.names[: schema.get_field_index(name)]
            df.insert(sum(n in df.columns for n in before), name, as_tensors[name].array)
        return df


#: the column ``include_paths=True`` adds: each row's file, as a URL (Ray Data's name)
PATH_COLUMN = "path"


class _ParquetEngineWithPaths(_ParquetEngine):
    """``read_parquet(include_paths=True)``: each row's file URL in column ``path``.

    dask's ``read_parquet`` has no such option (its CSV and JSON readers do). The
    column is in the meta, so dask keeps it when it selects the requested
    columns from a partition; it is left out of what pyarrow is asked to read, and
    added to each file's table as it is read, before the conversion to pandas (so it
    converts as the files' own text columns do, and several files in one block each
    give their own rows their own path).
    """

    @classmethod
    def _create_dd_meta(cls, dataset_info: dict[str, Any]) -> pd.DataFrame:
        schema = dataset_info["schema"]
        # read_parquet checked that the files have no such column of their own
        dataset_info["schema"] = schema.append(pa.field(PATH_COLUMN, pa.string()))
        try:
            return super()._create_dd_meta(dataset_info)
        finally:
            dataset_info["schema"] = schema

    @classmethod
    def _read_table(
        cls, path_or_frag: Any, fs: Any, row_groups: Any, columns: Any, *args: Any, **kwargs: Any
    ) -> pa.Table:
        import pyarrow.dataset as pa_ds

        if columns is not None:
            columns = [c for c in columns if c != PATH_COLUMN]
        table = super()._read_table(path_or_frag, fs, row_groups, columns, *args, **kwargs)
        path = (
            path_or_frag.path
            if isinstance(path_or_frag, pa_ds.ParquetFileFragment)
            else path_or_frag
        )
        url = str(fs.unstrip_protocol(path))
        return table.append_column(PATH_COLUMN, pa.array([url] * table.num_rows, pa.string()))


def _hive_partitioning(
    files: Sequence[str], storage_options: Mapping[str, Any] | None
) -> dict[str, Any]:
    """dask's ``dataset=`` options that give Hive directories (``year=2024/``) their types.

    dask discovers the partitioning file by file when it reads, and a file whose only
    directory for a column is the null one (``city=__HIVE_DEFAULT_PARTITION__``, as
    ``write_parquet(partition_cols=...)`` writes nulls) has no value to infer a type
    from: its read fails. The schema is discovered here once, over all the paths, and
    every read uses it (the columns then hold plain values, not dask's categoricals).
    """
    import fsspec
    import pyarrow.dataset as pa_ds
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    if not any("=" in part for url in files for part in url.split("/")[:-1]):
        return {}
    options = dict(storage_options or {})
    fs = fsspec.core.url_to_fs(files[0], **options)[0]
    paths = [fsspec.core.url_to_fs(url, **options)[1] for url in files]
    discovered = pa_ds.dataset(
        paths, filesystem=PyFileSystem(FSSpecHandler(fs)), format="parquet", partitioning="hive"
    ).partitioning
    if discovered is None or not len(discovered.schema):
        return {}
    return {"partitioning": {"flavor": "hive", "schema": discovered.schema}}


@takes_ray_args("read_parquet", READER_ARGS)
def read_parquet(
    paths: str | Sequence[str],
    *,
    columns: Sequence[str] | None = None,
    filter: Any = None,  # Ray Data's name, though it shadows the builtin
    include_paths: bool = False,
    file_extensions: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    override_num_blocks: int | None = None,
) -> Dataset:
    """Read Parquet files (paths, globs, directories, any fsspec URL).

    Columns that ``write_parquet`` wrote from N-D rows (Arrow's ``fixed_shape_tensor``)
    read back as tensor columns, each row an array of the written shape; list columns
    (1-D rows, e.g. embeddings) as columns of 1-D arrays. Either stacks into one array
    in the numpy batch format.

    ``override_num_blocks=n`` (as Ray Data's readers take it) reads into exactly ``n``
    blocks: neighbouring files join into one block, or each file splits into several,
    in order (by default, a block per file).

    As in Ray Data: ``filter=`` takes a pyarrow expression (``pc.field("x") > 5``),
    applied to the rows as each file is read (a ``filter(expr=...)`` after the read is
    also handed to the reader, and skips whole partitions and row groups besides).

    ``include_paths=True`` adds a column ``path``: the URL of the file each row came
    from (whatever ``columns`` selects).
    """
    _check_override_num_blocks(override_num_blocks, "read_parquet")
    _check_include_paths(include_paths, "read_parquet")
    if include_paths and columns is not None and PATH_COLUMN not in columns:
        columns = [*columns, PATH_COLUMN]
    if filter is not None:
        import pyarrow.dataset as pa_ds

        if not isinstance(filter, pa_ds.Expression):
            raise PlanError(
                f"read_parquet(filter={filter!r}): give a pyarrow expression, e.g. "
                "pyarrow.compute.field('x') > 5 (for a string condition, use "
                "read_parquet(...).filter(expr='x > 5'))"
            )
    files = expand_paths(
        paths,
        "read_parquet",
        extensions=(".parquet", ".parq", ".pq"),
        storage_options=storage_options,
        file_extensions=file_extensions,
    )
    try:
        frame = parquet_frame(
            files,
            columns=columns,
            storage_options=storage_options,
            override_num_blocks=override_num_blocks,
            row_filter=filter,
            include_paths=include_paths,
        )
    except PlanError:
        raise
    except Exception as exc:
        raise PlanError(
            f"read_parquet: could not read the Parquet files under {paths!r}: {exc}"
        ) from exc
    options: dict[str, Any] = {"columns": columns}
    if include_paths:  # only when asked: a resumed job's description stays as it was
        options["include_paths"] = True
    if override_num_blocks is not None:
        options["override_num_blocks"] = override_num_blocks
    if filter is not None:
        options["filter"] = filter
    return _dataset(
        frame,
        "ReadParquet",
        files=files,
        storage_options=storage_options,
        options=options,
    )


def parquet_frame(
    files: Sequence[str],
    *,
    columns: Sequence[str] | None,
    storage_options: Mapping[str, Any] | None,
    override_num_blocks: int | None,
    filters: list[list[tuple[str, str, Any]]] | None = None,
    row_filter: Any = None,
    include_paths: bool = False,
) -> dd.DataFrame:
    """The dask frame of ``read_parquet`` over expanded ``files`` (``filters``: dask's DNF)."""
    # dask's reader sorts the files it is given; read each naturally sorted run of the
    # list on its own, so that rows come in the order of the paths the user listed
    runs: list[list[str]] = []
    for url in files:
        if runs and natural_sort_key(runs[-1][-1]) <= natural_sort_key(url):
            runs[-1].append(url)
        else:
            runs.append([url])
    dataset_options = _hive_partitioning(files, storage_options)
    if include_paths:
        _refuse_own_path_column(files[0], storage_options, dataset_options)
    frames = [
        dd.read_parquet(
            run,
            columns=list(columns) if columns else None,
            storage_options=dict(storage_options or {}),
            engine=_ParquetEngineWithPaths if include_paths else _ParquetEngine,
            dataset=dataset_options,
            filters=filters,
            **({"arrow_to_pandas": {ROW_FILTER: row_filter}} if row_filter is not None else {}),
        )
        for run in runs
    ]
    frame = frames[0] if len(frames) == 1 else dd.concat(frames)
    frame, _ = _override_blocks(frame, override_num_blocks, {})
    return frame


def _check_include_paths(value: Any, call: str) -> None:
    if not isinstance(value, bool):
        raise PlanError(f"{call}(include_paths={value!r}): use True or False")


def _with_include_paths(options: Mapping[str, Any], include_paths: bool) -> dict[str, Any]:
    """A reader's options, with ``include_paths`` only where asked for: the options
    describe the source to ``resume``, and a job started before the option existed must
    still be recognised."""
    return {**options, "include_paths": True} if include_paths else dict(options)


def _refuse_own_path_column(
    url: str, storage_options: Mapping[str, Any] | None, dataset_options: Mapping[str, Any]
) -> None:
    """Fail before any work where the files hold a column named ``path`` themselves.

    ``include_paths=True`` would hide it (Ray Data overwrites it); the first file's
    schema, and the Hive directories' keys, say whether there is one.
    """
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb", **dict(storage_options or {})) as f:
        names = list(pq.read_schema(f).names)
    partitioning = dataset_options.get("partitioning") or {}
    if "schema" in partitioning:
        names += list(partitioning["schema"].names)
    if PATH_COLUMN in names:
        raise _own_path_column("read_parquet", url)


def _own_path_column(call: str, url: str) -> PlanError:
    return PlanError(
        f"{call}(include_paths=True): {url!r} has a column {PATH_COLUMN!r} of its own, "
        "which the files' paths would replace; read without include_paths, or rename "
        "that column in the files"
    )


def _with_path_column(block: pd.DataFrame, url: str, call: str) -> pd.DataFrame:
    """``block`` with column ``path`` holding ``url`` (``include_paths=True``)."""
    if PATH_COLUMN in block.columns:
        raise _own_path_column(call, url)
    paths = np.empty(len(block), dtype=object)
    paths[:] = url
    return block.assign(**{PATH_COLUMN: paths})


def _read_table_file(
    url: str,
    fmt: str,
    storage_options: Mapping[str, Any],
    pandas_kwargs: Mapping[str, Any],
    include_paths: bool = False,
) -> pd.DataFrame:
    """One CSV or JSON file as one block, with the types pandas infers for this file."""
    import fsspec

    with fsspec.open(url, "rb", compression="infer", **dict(storage_options)) as f:
        if fmt == "csv":
            block = pd.read_csv(f, **pandas_kwargs)
        else:
            block = pd.read_json(f, **pandas_kwargs)
    return _with_path_column(block, url, f"read_{fmt}") if include_paths else block


def _table_files_frame(
    files: Sequence[str],
    fmt: str,
    storage_options: Mapping[str, Any] | None,
    pandas_kwargs: Mapping[str, Any],
    include_paths: bool,
) -> dd.DataFrame:
    """A block per file, each file's types its own, as Ray Data's readers do.

    dask's ``read_csv``/``read_json`` infer the types from the start of the first file
    and fail the job on a later file that disagrees (a column of whole numbers there,
    decimals here); a file read on its own never disagrees with itself, and blocks of
    different types concatenate as pandas does (int and float make float). The meta is
    the first file's, read here; a bad argument or file fails here, before any work.
    """
    options = dict(storage_options or {})
    read = functools.partial(
        _read_table_file,
        fmt=fmt,
        storage_options=options,
        pandas_kwargs=dict(pandas_kwargs),
        include_paths=include_paths,
    )
    try:
        meta = read(files[0]).iloc[:0]
    except PlanError:
        raise
    except Exception as exc:
        raise PlanError(
            f"read_{fmt}: could not read {files[0]!r} with {dict(pandas_kwargs)!r}: {exc}"
        ) from exc
    return dd.from_map(read, list(files), meta=meta, enforce_metadata=False)


@takes_ray_args("read_csv", CSV_ARGS)
def read_csv(
    paths: str | Sequence[str],
    *,
    include_paths: bool = False,
    file_extensions: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    override_num_blocks: int | None = None,
    **pandas_kwargs: Any,
) -> Dataset:
    """Read CSV files; extra keyword arguments go to ``pandas.read_csv``.

    Each file is read with its own types (a later file whose column holds decimals
    where the first held whole numbers is read as such; ``dtype=`` fixes them).
    ``override_num_blocks=n`` (as Ray Data's readers take it) reads into exactly ``n``
    blocks: neighbouring files join into one block, or each file splits into several,
    in order (by default, a block per file). ``include_paths=True`` adds a column
    ``path``: the URL of the file each row came from.
    """
    _check_override_num_blocks(override_num_blocks, "read_csv")
    _check_include_paths(include_paths, "read_csv")
    files = expand_paths(
        paths,
        "read_csv",
        extensions=(".csv", ".csv.gz", ".tsv"),
        storage_options=storage_options,
        file_extensions=file_extensions,
    )
    frame = _table_files_frame(files, "csv", storage_options, pandas_kwargs, include_paths)
    frame, options = _override_blocks(
        frame, override_num_blocks, _with_include_paths(pandas_kwargs, include_paths)
    )
    return _dataset(frame, "ReadCSV", files=files, storage_options=storage_options, options=options)


@takes_ray_args("read_json", READER_ARGS)
def read_json(
    paths: str | Sequence[str],
    *,
    lines: bool = True,
    include_paths: bool = False,
    file_extensions: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    override_num_blocks: int | None = None,
) -> Dataset:
    """Read JSON files: JSON lines by default, or one array of records per file.

    Each file is read with its own types, as in ``read_csv``. ``override_num_blocks=n``
    (as Ray Data's readers take it) reads into exactly ``n`` blocks: neighbouring files
    join into one block, or each file splits into several, in order (by default, a
    block per file). ``include_paths=True`` adds a column ``path``: the URL of the file
    each row came from.
    """
    _check_override_num_blocks(override_num_blocks, "read_json")
    _check_include_paths(include_paths, "read_json")
    files = expand_paths(
        paths,
        "read_json",
        extensions=(".json", ".jsonl", ".json.gz"),
        storage_options=storage_options,
        file_extensions=file_extensions,
    )
    frame = _table_files_frame(
        files, "json", storage_options, {"orient": "records", "lines": lines}, include_paths
    )
    frame, options = _override_blocks(
        frame, override_num_blocks, _with_include_paths({"lines": lines}, include_paths)
    )
    return _dataset(
        frame, "ReadJSON", files=files, storage_options=storage_options, options=options
    )


def _read_text_file(
    url: str,
    encoding: str,
    drop_empty_lines: bool,
    storage_options: Mapping[str, Any],
    include_paths: bool = False,
) -> pd.DataFrame:
    import fsspec

    with fsspec.open(url, "rt", encoding=encoding, **dict(storage_options)) as f:
        lines = f.read().splitlines()
    if drop_empty_lines:
        lines = [line for line in lines if line.strip()]
    column = np.empty(len(lines), dtype=object)
    column[:] = lines
    block = pd.DataFrame({"text": column})
    return _with_path_column(block, url, "read_text") if include_paths else block


@takes_ray_args("read_text", READER_ARGS)
def read_text(
    paths: str | Sequence[str],
    *,
    encoding: str = "utf-8",
    drop_empty_lines: bool = True,
    include_paths: bool = False,
    file_extensions: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    override_num_blocks: int | None = None,
) -> Dataset:
    """Read text files: one row per line, in column ``text`` (and with
    ``include_paths=True``, the URL of its file in column ``path``).

    Lines that are empty or hold only whitespace are dropped, as Ray Data's
    ``read_text`` drops them by default; ``drop_empty_lines=False`` keeps them (e.g. to
    keep line numbers, or paragraph breaks).

    ``override_num_blocks=n`` (as Ray Data's readers take it) reads into exactly ``n``
    blocks: neighbouring files join into one block, or each file splits into several,
    in order (by default, a block per file).
    """
    _check_override_num_blocks(override_num_blocks, "read_text")
    _check_include_paths(include_paths, "read_text")
    files = expand_paths(
        paths, "read_text", storage_options=storage_options, file_extensions=file_extensions
    )
    meta_columns = {"text": pd.Series([], dtype=object)}
    if include_paths:
        meta_columns[PATH_COLUMN] = pd.Series([], dtype=object)
    frame = dd.from_map(
        _read_text_file,
        files,
        encoding=encoding,
        drop_empty_lines=drop_empty_lines,
        storage_options=dict(storage_options or {}),
        include_paths=include_paths,
        meta=pd.DataFrame(meta_columns),
        enforce_metadata=False,
    )
    frame, options = _override_blocks(
        frame,
        override_num_blocks,
        _with_include_paths(
            {"encoding": encoding, "drop_empty_lines": drop_empty_lines}, include_paths
        ),
    )
    return _dataset(
        frame, "ReadText", files=files, storage_options=storage_options, options=options
    )


# files fetched per request in read_images: fsspec's ``cat`` of a list runs its requests
# concurrently on object stores (s3, gcs, http), where one request per file in turn
# would leave the task waiting on round trips; a bound, so that a block of large TIFFs
# does not hold all its files' bytes at once
_IMAGE_FILES_PER_FETCH = 16


def _fetch_files(
    urls: Sequence[str], storage_options: Mapping[str, Any]
) -> Iterable[tuple[str, bytes]]:
    """Each URL with its file's bytes, in order."""
    import fsspec

    located = [(url, *fsspec.core.url_to_fs(url, **dict(storage_options))) for url in urls]
    start = 0
    while start < len(located):
        # a run of files on one filesystem (fsspec keeps one instance per protocol and
        # options), at most _IMAGE_FILES_PER_FETCH long
        fs = located[start][1]
        stop = start + 1
        while (
            stop < len(located) and stop - start < _IMAGE_FILES_PER_FETCH and located[stop][1] is fs
        ):
            stop += 1
        run = located[start:stop]
        # cat_ranges, not cat: it takes paths literally (cat globs a name with "[" in
        # it) and answers in order, an exception in place of a file it could not read
        contents = fs.cat_ranges([path for _, _, path in run], None, None, on_error="return")
        for (url, _, _), data in zip(run, contents, strict=True):
            if isinstance(data, BaseException):
                raise OSError(f"read_images: {url!r} could not be read: {data!r}") from data
            yield url, data
        start = stop


def _read_files(
    urls: Sequence[str],
    column: str,
    decode: Callable[[str, bytes], Any] | None,
    include_paths: bool,
    storage_options: Mapping[str, Any],
) -> pd.DataFrame:
    """One row per file: its bytes, or ``decode(url, bytes)``, in ``column``; the URL in ``path``."""
    values = np.empty(len(urls), dtype=object)
    for i, (url, data) in enumerate(_fetch_files(urls, storage_options)):
        values[i] = data if decode is None else decode(url, data)
    columns: dict[str, Any] = {column: values}
    if include_paths:
        paths = np.empty(len(urls), dtype=object)
        paths[:] = list(urls)
        columns[PATH_COLUMN] = paths
    return pd.DataFrame(columns)


def _files_dataset(
    call: str,
    name: str,
    paths: str | Sequence[str],
    column: str,
    decode: Callable[[str, bytes], Any] | None,
    *,
    include_paths: bool,
    files_per_block: int | None,
    default_files_per_block: int,
    override_num_blocks: int | None,
    storage_options: Mapping[str, Any] | None,
    extensions: Sequence[str] | None = None,
    file_extensions: Sequence[str] | None = None,
    options: Mapping[str, Any] | None = None,
) -> Dataset:
    """A Dataset of one row per file (see _read_files).

    ``files_per_block`` files a block (``default_files_per_block`` if None), or the
    files cut into ``override_num_blocks`` runs of near-equal length, as Ray Data's
    file readers cut their paths into read tasks (so never more blocks than files).
    """
    if files_per_block is not None and (
        not isinstance(files_per_block, int)
        or isinstance(files_per_block, bool)
        or files_per_block < 1
    ):
        raise PlanError(f"{call}(files_per_block={files_per_block!r}): use a positive integer")
    _check_override_num_blocks(override_num_blocks, call)
    _check_include_paths(include_paths, call)
    if files_per_block is not None and override_num_blocks is not None:
        raise PlanError(
            f"{call}(files_per_block={files_per_block}, override_num_blocks="
            f"{override_num_blocks}): both set how the files are cut into blocks; give only "
            "one of them"
        )
    files = expand_paths(
        paths,
        call,
        extensions=extensions,
        storage_options=storage_options,
        file_extensions=file_extensions,
    )
    if override_num_blocks is not None:
        # a file is one row, so a block holds at least one file
        edges = np.linspace(0, len(files), min(override_num_blocks, len(files)) + 1)
        bounds = itertools.pairwise(edges.astype(int).tolist())
        groups = [files[a:b] for a, b in bounds]
    else:
        files_per_block = files_per_block or default_files_per_block
        groups = [
            files[i : i + files_per_block] for i in builtins.range(0, len(files), files_per_block)
        ]
    meta_cols: dict[str, Any] = {column: pd.Series([], dtype=object)}
    if include_paths:
        meta_cols[PATH_COLUMN] = pd.Series([], dtype=object)
    with keep_object_columns():  # arrays and bytes stay what they are, not str
        frame = dd.from_map(
            _read_files,
            groups,
            column=column,
            decode=decode,
            include_paths=include_paths,
            storage_options=dict(storage_options or {}),
            meta=pd.DataFrame(meta_cols),
            enforce_metadata=False,
        )
    options = {
        **(options or {}),
        "include_paths": include_paths,
        "files_per_block": files_per_block,
    }
    if override_num_blocks is not None:
        options["override_num_blocks"] = override_num_blocks
    return _dataset(frame, name, files=files, storage_options=storage_options, options=options)


@takes_ray_args("read_binary_files", READER_ARGS)
def read_binary_files(
    paths: str | Sequence[str],
    *,
    include_paths: bool = False,
    files_per_block: int | None = None,
    file_extensions: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    override_num_blocks: int | None = None,
) -> Dataset:
    """Read whole files, one row each, into column ``bytes`` (and ``path``), as Ray Data does.

    For formats no reader here decodes (audio, PDF, video), and for images that the
    predictor decodes itself, e.g. on the GPU when the CPUs cannot decode as fast as the
    model runs. Files are fetched 16 at a time, concurrently on object stores; a block
    holds ``files_per_block`` whole files (16 by default), so lower it for large files.
    Or, as in Ray Data, ``override_num_blocks=n`` cuts the files into ``n`` blocks of
    near-equal counts (a block a file where there are fewer than ``n``, as Ray).
    """
    return _files_dataset(
        "read_binary_files",
        "ReadBinaryFiles",
        paths,
        "bytes",
        None,
        include_paths=include_paths,
        files_per_block=files_per_block,
        default_files_per_block=16,
        override_num_blocks=override_num_blocks,
        storage_options=storage_options,
        file_extensions=file_extensions,
    )


def _decode_image(
    url: str, data: bytes, size: tuple[int, int] | None, mode: str | None
) -> np.ndarray:
    import io

    from PIL import Image

    try:
        image: Image.Image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:
        raise OSError(f"read_images: {url!r} is not a readable image: {exc}") from exc
    # as Ray Data's read_images does, so that a ported pipeline sees the same pixels:
    # resize first, bilinear (about a sixth less CPU than Pillow's default, bicubic),
    # then convert (rounding makes the order matter, e.g. for RGB -> L)
    if size is not None:
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    if mode is not None:
        image = image.convert(mode)
    return np.asarray(image)


def _read_images(
    urls: Sequence[str],
    size: tuple[int, int] | None,
    mode: str | None,
    include_paths: bool,
    storage_options: Mapping[str, Any],
) -> pd.DataFrame:
    """One block of ``read_images``, as its read task builds it (benchmarks time it alone)."""
    decode = functools.partial(_decode_image, size=size, mode=mode)
    return _read_files(urls, "image", decode, include_paths, storage_options)


@takes_ray_args("read_images", READER_ARGS)
def read_images(
    paths: str | Sequence[str],
    *,
    size: tuple[int, int] | None = None,
    mode: str | None = None,
    include_paths: bool = False,
    files_per_block: int | None = None,
    file_extensions: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    override_num_blocks: int | None = None,
) -> Dataset:
    """Read images (decoded with Pillow on the workers) into column ``image``.

    ``size=(height, width)`` resizes and then ``mode`` (``"RGB"``, ``"L"`` ...) converts,
    as Ray Data's ``read_images`` does (bilinear; Pillow resizes palette images nearest),
    so that a port sees the same pixels. Each value is an ``HxWxC`` (or ``HxW``) uint8
    array. A block holds ``files_per_block`` images (64 by default), or, as in Ray
    Data, ``override_num_blocks=n`` cuts the files into ``n`` blocks (a block an image
    where there are fewer, as Ray). The files of a block are fetched 16 at a time,
    concurrently on object stores. Needs the ``images`` extra
    (``pip install 'daskinfer[images]'``).
    """
    if importlib.util.find_spec("PIL") is None:
        raise PlanError("read_images needs Pillow: pip install 'daskinfer[images]'")
    if size is not None and (len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size)):
        raise PlanError(f"read_images(size={size!r}): use (height, width) with positive integers")
    size = (size[0], size[1]) if size else None
    return _files_dataset(
        "read_images",
        "ReadImages",
        paths,
        "image",
        functools.partial(_decode_image, size=size, mode=mode),
        include_paths=include_paths,
        files_per_block=files_per_block,
        default_files_per_block=64,
        override_num_blocks=override_num_blocks,
        storage_options=storage_options,
        extensions=IMAGE_EXTENSIONS,
        file_extensions=file_extensions,
        options={"size": size, "mode": mode},
    )


def _read_npy(url: str, storage_options: Mapping[str, Any], include_paths: bool) -> pd.DataFrame:
    import fsspec

    with fsspec.open(url, "rb", **dict(storage_options)) as f:
        array = np.load(f, allow_pickle=False)
    if array.ndim == 0:
        array = array.reshape(1)
    columns: dict[str, Any] = {"data": array}
    if include_paths:
        paths = np.empty(len(array), dtype=object)
        paths[:] = url
        columns[PATH_COLUMN] = paths
    return batch_to_block(columns)


@takes_ray_args("read_numpy", READER_ARGS)
def read_numpy(
    paths: str | Sequence[str],
    *,
    include_paths: bool = False,
    file_extensions: Sequence[str] | None = None,
    override_num_blocks: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Dataset:
    """Read ``.npy`` files into column ``data``, as Ray Data does: a row per first-axis entry.

    Each file is one block (a file of N-D arrays gives a tensor column of the rest of
    its shape); ``override_num_blocks`` re-cuts them. Pickled object arrays are refused
    (``allow_pickle=False``), as Ray's default. ``write_numpy`` writes such files.
    """
    import fsspec

    _check_override_num_blocks(override_num_blocks, "read_numpy")
    _check_include_paths(include_paths, "read_numpy")
    files = expand_paths(
        paths,
        "read_numpy",
        extensions=(".npy",),
        storage_options=storage_options,
        file_extensions=file_extensions,
    )
    options = dict(storage_options or {})
    # the meta (dtype and row shape) from the first file's header, without reading its data
    with fsspec.open(files[0], "rb", **options) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:  # no public reader of a 3.0 header alone: load the file
            f.seek(0)
            first = np.load(f, allow_pickle=False)
            shape, dtype = first.shape, first.dtype
    if dtype.hasobject:
        raise PlanError(
            f"read_numpy: {files[0]!r} holds Python objects, which need pickle to load; "
            "save plain numeric or string arrays"
        )
    meta_columns: dict[str, Any] = {"data": np.empty((0, *shape[1:]), dtype=dtype)}
    if include_paths:
        meta_columns[PATH_COLUMN] = np.empty(0, dtype=object)
    with keep_object_columns():
        frame = dd.from_map(
            functools.partial(_read_npy, storage_options=options, include_paths=include_paths),
            files,
            meta=batch_to_block(meta_columns),
            enforce_metadata=False,
        )
    frame, read_options = _override_blocks(
        frame, override_num_blocks, {"include_paths": include_paths}
    )
    return _dataset(
        frame, "ReadNumpy", files=files, storage_options=storage_options, options=read_options
    )
