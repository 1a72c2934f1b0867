"""Resumable writes: which source blocks were already written, and by the same pipeline.

``write_parquet(path, resume=True)`` keeps a journal next to its hidden parts::

    <path>/_daskinfer_temporary/resume/job.json        what is being written, from what
    <path>/_daskinfer_temporary/resume/parts/<uuid>    parts written by workers
    <path>/_daskinfer_temporary/resume/done/<k>.json   source block k: all its parts

A source block's entry is written (atomically: a temporary name, then a rename) once
every row that came from it is in a part; after a crash of the whole driver a rerun
with ``resume=True`` skips those blocks and writes only the rest. Nothing is visible in
``<path>`` until the final commit (see ``FileSink.commit``), so a crashed job never shows
half its output.

A block is identified by its position in the source plus the source's fingerprint: for
files, each file's URL, size and modification time, the reader and its options, and the
number of blocks (the row ranges come from these); for in-memory data, dask's token of
the data. The pipeline's fingerprint covers every stage: functions and classes by their
code, arguments by value. A journal made from another source or pipeline is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import re
import types
from collections.abc import Mapping, Sequence
from typing import Any

from daskinfer._internal.plan import BlocksSource, DaskSource, Limit, LogicalPlan, Repartition
from daskinfer.exceptions import PlanError

logger = logging.getLogger("daskinfer")

JOURNAL_DIR = "resume"
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


# ----------------------------------------------------------------- fingerprints
def _code_digest(code: types.CodeType, h: Any) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code_digest(const, h)
        else:
            h.update(_ADDRESS.sub("", repr(const)).encode())


def _callable_text(obj: Any) -> str:
    """Source text of a function or class, or (without source) its bytecode's digest."""
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        pass
    h = hashlib.sha256()
    if isinstance(obj, type):
        for name, value in sorted(vars(obj).items()):
            code = getattr(value, "__code__", None)
            h.update(name.encode())
            if code is not None:
                _code_digest(code, h)
            else:
                h.update(_ADDRESS.sub("", repr(value)).encode())
    elif getattr(obj, "__code__", None) is not None:
        _code_digest(obj.__code__, h)
    else:
        h.update(_ADDRESS.sub("", repr(obj)).encode())
    return h.hexdigest()


def canonical(value: Any, depth: int = 0) -> Any:
    """A JSON-able description of a stage's settings that is the same in every process."""
    if depth > 8:
        return _ADDRESS.sub("", repr(value))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (type, types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
        name = f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}"
        return {
            "callable": name,
            "code": hashlib.sha256(_callable_text(value).encode()).hexdigest(),
        }
    if dataclasses.is_dataclass(value):
        return {
            "type": type(value).__qualname__,
            **{
                f.name: canonical(getattr(value, f.name), depth + 1)
                for f in dataclasses.fields(value)
            },
        }
    if isinstance(value, Mapping):
        return {
            str(k): canonical(v, depth + 1)
            for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
        }
    if isinstance(value, (list, tuple)):
        return [canonical(v, depth + 1) for v in value]
    if callable(value):  # an instance with __call__ (functools.partial, a callable object)
        return {"callable": type(value).__qualname__, "repr": _ADDRESS.sub("", repr(value))}
    return _ADDRESS.sub("", repr(value))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def pipeline_fingerprint(plan: LogicalPlan, write: Mapping[str, Any]) -> str:
    """Digest of every stage of ``plan`` and of the write's own settings."""
    return _digest({"stages": [canonical(op) for op in plan.ops], "write": canonical(write)})


def _file_version(fs: Any, path: str) -> dict[str, Any]:
    info = fs.info(path)
    version = next(
        (
            info[k]
            for k in ("mtime", "LastModified", "updated", "ETag", "etag", "md5Hash")
            if info.get(k)
        ),
        None,
    )
    return {"size": info.get("size"), "version": str(version)}


def describe_source(plan: LogicalPlan) -> dict[str, Any]:
    """What identifies the source's blocks: files (size, modification time) or data token."""
    import fsspec

    import dask

    source = plan.source
    if isinstance(source, BlocksSource) or not isinstance(source, DaskSource):
        raise PlanError(
            "write_*(resume=True) needs a source that can be read again after a crash (files, "
            "or in-memory data built in the script); a materialized Dataset lives only as long "
            "as its cluster: write it without resume=True"
        )
    if source.name == "ReadSQL":
        raise PlanError(
            "write_*(resume=True) needs a source that reads the same rows again after a "
            "crash, and a database query can return other rows by then; write a read_sql "
            "Dataset without resume=True, or export the query to Parquet first and resume "
            "from the files"
        )
    desc: dict[str, Any] = {"reader": source.name, "blocks": int(source.frame.npartitions)}
    if source.files:
        files = {}
        for url in source.files:
            fs, path = fsspec.core.url_to_fs(url, **dict(source.storage_options))
            files[url] = _file_version(fs, path)
        desc["files"] = files
        desc["options"] = canonical(source.options)
    else:
        desc["token"] = dask.base.tokenize(source.frame)
    return desc


def source_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Say in words how two source descriptions differ (empty: the same source)."""
    changes = []
    if old.get("reader") != new.get("reader"):
        changes.append(f"the reader changed ({old.get('reader')} -> {new.get('reader')})")
    old_files, new_files = old.get("files") or {}, new.get("files") or {}
    for url in sorted(set(old_files) - set(new_files)):
        changes.append(f"file {url!r} is no longer in the source")
    for url in sorted(set(new_files) - set(old_files)):
        changes.append(f"file {url!r} is new in the source")
    for url in sorted(set(old_files) & set(new_files)):
        if old_files[url] != new_files[url]:
            changes.append(
                f"file {url!r} changed (size {old_files[url]['size']} -> {new_files[url]['size']}, "
                f"modified {old_files[url]['version']} -> {new_files[url]['version']})"
            )
    if old.get("options") != new.get("options"):
        changes.append("the reader's options changed")
    if old.get("token") != new.get("token"):
        changes.append("the in-memory data changed")
    if not changes and old.get("blocks") != new.get("blocks"):
        changes.append(f"the source's blocks changed ({old.get('blocks')} -> {new.get('blocks')})")
    return changes


def check_resumable(plan: LogicalPlan) -> None:
    """Refuse, before any work, a plan whose output cannot be traced to source blocks."""
    for op in plan.ops:
        if isinstance(op, (Limit, Repartition)):
            raise PlanError(
                f"write_*(resume=True) cannot resume a pipeline with {op.name}: its output "
                "blocks mix rows of several source blocks; drop it or write without resume=True"
            )


# ---------------------------------------------------------------------- journal
class ResumeJournal:
    """The journal of one resumable write (see the module's docstring)."""

    def __init__(self, fs: Any, temp_root: str, url: Any) -> None:
        self.fs = fs
        self.dir = f"{temp_root}/{JOURNAL_DIR}"
        self.parts_dir = f"{self.dir}/parts"
        self.done_dir = f"{self.dir}/done"
        self._url = url

    def open(self, source: Mapping[str, Any], pipeline: str) -> dict[int, list[dict[str, Any]]]:
        """Start a journal or continue one made by the same source and pipeline.

        Returns the source blocks already written, each with its parts (path, rows).
        """
        job_file = f"{self.dir}/job.json"
        if self.fs.exists(job_file):
            with self.fs.open(job_file, "rb") as f:
                job = json.loads(f.read())
            changes = source_changes(job["source"], source)
            if job["pipeline"] != pipeline:
                changes.append("the pipeline changed (a stage, its function or its arguments)")
            if changes:
                raise PlanError(
                    f"write_*(resume=True): cannot resume the unfinished write in "
                    f"{self._url(self.dir)!r}: " + "; ".join(changes) + ". Restore what changed, "
                    "or start over: delete that directory (or write with resume=False)"
                )
            done = self._read_done()
            logger.info(
                "resuming the write in %s: %d of %d source blocks already written",
                self._url(self.dir),
                len(done),
                source["blocks"],
            )
            return done
        self.fs.makedirs(self.parts_dir, exist_ok=True)
        self.fs.makedirs(self.done_dir, exist_ok=True)
        self._put_json(job_file, {"version": 1, "source": source, "pipeline": pipeline})
        return {}

    def _read_done(self) -> dict[int, list[dict[str, Any]]]:
        done: dict[int, list[dict[str, Any]]] = {}
        if not self.fs.exists(self.done_dir):
            return done
        existing = (
            {p.rstrip("/") for p in self.fs.find(self.parts_dir)}
            if self.fs.exists(self.parts_dir)
            else set()
        )
        for path in self.fs.find(self.done_dir):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if not name.endswith(".json"):
                continue  # a temporary name: that entry was never written
            with self.fs.open(path, "rb") as f:
                entry = json.loads(f.read())
            parts = entry["parts"]
            if all(self.fs._strip_protocol(p["path"]).rstrip("/") in existing for p in parts):
                done[int(entry["block"])] = parts
            else:  # cannot happen unless someone deleted parts: write the block again
                logger.warning(
                    "resume: parts of source block %s are missing; writing it again", entry["block"]
                )
        return done

    def record(self, block: int, parts: Sequence[Mapping[str, Any]]) -> None:
        """Source block ``block`` is fully written, in ``parts``."""
        self._put_json(
            f"{self.done_dir}/{block:08d}.json",
            {"block": block, "parts": [{"path": p["path"], "rows": int(p["rows"])} for p in parts]},
        )

    def _put_json(self, path: str, obj: Any) -> None:
        temp = f"{path}.tmp"
        with self.fs.open(temp, "wb") as f:
            f.write(json.dumps(obj).encode())
        self.fs.mv(temp, path)

    def remove(self) -> None:
        """The write is committed: drop the journal and any orphaned part."""
        if self.fs.exists(self.dir):
            self.fs.rm(self.dir, recursive=True)

    def exists(self) -> bool:
        """Whether an unfinished resumable write is waiting here."""
        return bool(self.fs.exists(f"{self.dir}/job.json"))
