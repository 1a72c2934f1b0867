"""Ray Data's arguments that mean nothing on Dask, met where a port passes them.

A Ray Data pipeline ports by changing its import, so its calls arrive with Ray's own
arguments: ``memory=`` and remote options (``scheduling_strategy=``) on ``map_batches``,
``filesystem=`` or ``concurrency=`` on a reader. Without this, each would fail with
Python's ``unexpected keyword argument`` (or, for ``read_csv``, inside pandas), which
says what is wrong but not what to do. Here an argument given at Ray's default changes
nothing and is taken; any other value fails at the call, before any work, with what
does the job on Dask. An argument that is neither daskinfer's nor a known Ray one fails
as a Ray remote option would, naming the closest argument the call has (a typo).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, ParamSpec, TypeVar

from daskinfer.exceptions import PlanError

P = ParamSpec("P")
R = TypeVar("R")

_ANY = object()  # a RayOnly default: every value is taken


@dataclasses.dataclass(frozen=True)
class RayOnly:
    """A Ray Data argument daskinfer has no use for: taken at ``default``, else refused."""

    fix: str
    default: Any = None

    def takes(self, value: Any) -> bool:
        if self.default is _ANY:
            return True
        if self.default is None:  # nothing given, or an empty dict or list of options
            return value is None or (isinstance(value, dict | list | tuple) and not value)
        return type(value) is type(self.default) and value == self.default


TASK_OPTIONS = (
    "ask for resources with num_cpus=, num_gpus= and resources= (Dask worker resources), "
    "and set retries with DataContext.get_current().max_retries"
)

#: map_batches, map, flat_map, filter
TRANSFORM_ARGS: Mapping[str, RayOnly] = {
    "memory": RayOnly(
        "Dask reserves no memory per task; give the workers a memory limit (dask worker "
        "--memory-limit), or declare a resource (dask worker --resources 'MEM=64e9') and "
        "ask for it with resources={'MEM': n}"
    ),
    "ray_remote_args_fn": RayOnly(f"Dask tasks take no Ray options: {TASK_OPTIONS}"),
    # Ray's optimizer pushes a limit() through a stage unless told the stage changes
    # the row count; daskinfer never does, so either answer is right here
    "udf_modifying_row_count": RayOnly("", default=_ANY),
}

_READS = "reads run as Dask tasks on the CPU workers, as many at once as they have threads"

#: every file reader
READER_ARGS: Mapping[str, RayOnly] = {
    "filesystem": RayOnly(
        "give an fsspec URL (s3://bucket/path, gs://..., abfs://...) and its options as "
        "storage_options= (e.g. {'anon': True} or credentials)"
    ),
    "parallelism": RayOnly("use override_num_blocks= (Ray's name for it now)", default=-1),
    "concurrency": RayOnly(f"{_READS}; start fewer workers or threads to read fewer at once"),
    "num_cpus": RayOnly(f"{_READS}; to give them more, start workers with more threads"),
    "num_gpus": RayOnly(f"{_READS}; ask for GPUs in the map_batches stage that uses them"),
    "memory": RayOnly(f"{_READS}; give the workers a memory limit (dask worker --memory-limit)"),
    "ray_remote_args": RayOnly(f"{_READS}; they take no Ray options"),
    "meta_provider": RayOnly("files' metadata is read by the reader itself"),
    "partition_filter": RayOnly(
        "list the files to read (paths= takes a list and globs), or filter(expr=...) on "
        "the Hive columns after read_parquet, which skips whole directories"
    ),
    "partitioning": RayOnly(
        "Hive directories (col=value/) are read as columns by read_parquet by default; "
        "other layouts: list the files, and add columns with map_batches"
    ),
    "shuffle": RayOnly("shuffle the list of paths before reading (random.shuffle(paths))"),
    "ignore_missing_paths": RayOnly(
        "list only paths that exist: a missing one fails at the call", default=False
    ),
    "arrow_open_stream_args": RayOnly("give the fsspec options as storage_options="),
    "arrow_open_file_args": RayOnly("give the fsspec options as storage_options="),
    "tensor_column_schema": RayOnly(
        "N-D columns written by write_parquet read back with their shape; other fixed-size "
        "lists: reshape them in map_batches"
    ),
}

_WRITES = "writes run as Dask tasks on the CPU workers, as many at once as they have threads"

#: every writer
WRITER_ARGS: Mapping[str, RayOnly] = {
    "filesystem": READER_ARGS["filesystem"],
    "arrow_open_stream_args": READER_ARGS["arrow_open_stream_args"],
    "try_create_dir": RayOnly("the destination is created as the write commits", default=True),
    "filename_provider": RayOnly(
        "parts are named <run>_<000000>.<ext>, numbered in row order; rename them after "
        "the write if another scheme is needed"
    ),
    "min_bytes_per_file": RayOnly("use min_rows_per_file= or max_rows_per_file="),
    "arrow_parquet_args_fn": RayOnly("give pyarrow's options as write_parquet's keywords"),
    "arrow_csv_args_fn": RayOnly("write_csv writes with pandas, and takes no options"),
    "pandas_json_args_fn": RayOnly("give pandas' to_json options as write_json's keywords"),
    "concurrency": RayOnly(f"{_WRITES}; start fewer workers or threads to write fewer at once"),
    "ray_remote_args": RayOnly(f"{_WRITES}; they take no Ray options"),
}

#: di.init, in place of ray.init
INIT_ARGS: Mapping[str, RayOnly] = {
    "num_cpus": RayOnly(
        "the embedded cluster's size is n_workers= and threads_per_worker= (each worker "
        "offers CPU=threads); a real cluster's is its workers'"
    ),
    "num_gpus": RayOnly(
        "the embedded cluster starts a GPU worker per GPU it sees (set "
        "CUDA_VISIBLE_DEVICES to use fewer); a real cluster runs `dask cuda worker`"
    ),
    "object_store_memory": RayOnly("blocks live in the workers' memory: memory_limit="),
    "runtime_env": RayOnly(
        "install the packages on the workers' machines (an image, or distributed's "
        "PipInstall plugin)"
    ),
    "namespace": RayOnly("a Dask cluster has no namespaces; start a cluster per job"),
    "include_dashboard": RayOnly(
        "the dashboard always runs; dashboard_address=None leaves the embedded one off",
        default=_ANY,
    ),
    # di.init replaces any client it made before, so a second call is never an error
    "ignore_reinit_error": RayOnly("", default=_ANY),
    "log_to_driver": RayOnly("", default=_ANY),
    "logging_level": RayOnly("", default=_ANY),
}

_PANDAS_CSV = (
    "read_csv takes pandas.read_csv's keywords instead (sep='\\t' for a delimiter, "
    "dtype=, usecols=, skiprows=, ...)"
)

#: read_csv's pyarrow options (Ray reads CSV with pyarrow, daskinfer with pandas)
CSV_ARGS: Mapping[str, RayOnly] = {
    **READER_ARGS,
    "parse_options": RayOnly(_PANDAS_CSV),
    "read_options": RayOnly(_PANDAS_CSV),
    "convert_options": RayOnly(_PANDAS_CSV),
}


def takes_ray_args(
    call: str, ray_only: Mapping[str, RayOnly], *, remote_options: bool = False
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Meet Ray-only arguments of ``call`` before the function runs (see the module).

    ``remote_options``: the Ray call takes ``**ray_remote_args`` (``map_batches`` and
    the other transforms), so an argument the function does not have is refused as one
    of those, naming the closest argument it does have.
    """

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        params = inspect.signature(fn).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        own = [name for name in params if name not in ("self", "cls")]

        @functools.wraps(fn)
        def inner(*args: P.args, **kwargs: P.kwargs) -> R:
            for name in [n for n in kwargs if n in ray_only and n not in params]:
                value = kwargs.pop(name)
                entry = ray_only[name]
                if not entry.takes(value):
                    raise PlanError(f"{call}({name}={value!r}): Ray's argument; here {entry.fix}")
            if remote_options and not takes_any:
                unknown = [n for n in kwargs if n not in params]
                if unknown:
                    raise PlanError(_unknown_message(call, unknown, own))
            return fn(*args, **kwargs)

        return inner

    return wrap


def _unknown_message(call: str, unknown: list[str], own: list[str]) -> str:
    names = ", ".join(f"{n}=" for n in unknown)
    close = [m for n in unknown for m in difflib.get_close_matches(n, own, n=1)]
    hint = f" Did you mean {', '.join(f'{m}=' for m in close)}?" if close else ""
    return (
        f"{call}({names}): not an argument of daskinfer's {call}.{hint} Ray passes such "
        f"arguments on as remote options (scheduling_strategy=, max_retries=, "
        f"runtime_env=, ...), which Dask tasks do not take: {TASK_OPTIONS}."
    )
