"""DataContext: process-wide execution settings, in the spirit of Ray Data's.

>>> import daskinfer as di
>>> ctx = di.DataContext.get_current()
>>> ctx.preserve_order
True
"""

from __future__ import annotations

import dataclasses
import threading
from typing import ClassVar

from dask.utils import parse_bytes

from daskinfer._internal.allocator import MAX_MMAP_THRESHOLD

__all__ = ["DataContext"]


@dataclasses.dataclass
class DataContext:
    """Settings that every execution in this process reads when it starts.

    Attributes
    ----------
    preserve_order
        Yield and write rows in input order (default ``True``; Ray Data's default is
        ``False``). Ordering only buffers references to blocks, never data, and it lets
        ``batch_size`` be exact across block boundaries. ``False`` lets a fast block
        overtake a slow one.
    max_inflight_bytes
        Upper bound on the bytes of blocks that are produced but not yet consumed,
        summed over all stages. Reads stop being admitted when it is reached. Accepts
        a number or a string such as ``"512 MiB"``.
    target_task_bytes
        Upper bound on a task's (or actor call's) bundle of input, in bytes. Also how
        far finished output may run ahead of a slow consumer: beyond what it prefetches
        plus 8 blocks, the last stage keeps going while the blocks waiting for it add up
        to less than this.
    target_task_s
        How much work a task's (or actor call's) bundle aims for, from the time its
        first tasks took per row: enough to amortise the few milliseconds a Dask task
        costs, little enough that results stream to the next stage steadily. Bundles are
        always whole batches; before anything is measured, one batch. An actor pool
        whose fed actors idle between calls (per-call overhead) grows its calls past
        this, up to 4x.
    max_pool_calls_per_s
        The most calls per second an actor pool aims to make, whatever its size: a pool
        of N actors sizes each call to at least N / this seconds of work (and to
        ``target_task_s``). Every call costs the client and the scheduler a few Dask
        messages (1-2 ms of CPU each, docs/scaling.md), and each of them is one Python
        thread, so short calls from many actors saturate them and the actors wait: W6's
        8 actors of 50 ms batches on 2 cores, with all else shared, spent 5.2 s of CPU
        in 3.3 s at 0.1 s a call, 3.2 s in 2.8 s at 0.4 s. Bigger calls are no slower to
        finish: as the input runs out, calls shrink to single batches. ``None`` sizes
        calls by ``target_task_s`` alone.
    max_tasks_in_flight_per_actor
        How many calls each predictor actor has queued or running; the next batch is
        already on the actor's worker when the current one finishes. At most two until
        the pool's first call has been measured.
    actor_idle_timeout_s
        An autoscaling pool (``min_size < max_size``) releases an actor that had no
        work for this long, down to ``min_size``.
    enable_progress_bars
        Progress while a pipeline runs: one bar per stage in a terminal or notebook,
        a summary line every ``progress_interval_s`` elsewhere (logs, CI). ``False``
        turns it off, as does the environment variable ``DASKINFER_PROGRESS=0``.
    progress_interval_s
        Seconds between summary lines in non-interactive output.
    max_retries
        How many times one batch is tried again after its predictor actor was lost or it
        ran past its stage's ``timeout_s``, before the job fails (or, for a timeout, the
        batch's rows are set aside, with ``on_error="skip"``/``"quarantine"``).
    actor_mmap_threshold
        In a worker process that hosts a predictor actor, allocations below this size
        come from malloc's heap instead of a fresh ``mmap`` each (glibc on Linux; at most
        ``"32 MiB"``). Dask's workers start with a setting that makes every allocation
        over 128 KiB an ``mmap``, which slows a model's forward pass by about 13%: it
        allocates and frees intermediate tensors of a few MiB on every call. ``None``
        leaves the allocator as the worker started.
    actor_keeps_freed_memory
        A worker process that hosts a predictor actor keeps the memory it frees for
        reuse (glibc on Linux). Otherwise the tensors of tens of MiB that a forward pass
        allocates and frees on every call (a transformer's attention over a batch) go
        back to the OS and are faulted in and zeroed again on the next call: about 13%
        of the CPU time of a MiniLM call on CPU. The process then keeps the memory of its
        largest call, and threads started after the predictor's share one malloc heap.
        ``False`` leaves that to the worker's defaults.
    freeze_gc
        Keep Python's full garbage collections short (``gc.freeze``): workers freeze the
        objects of their start-up imports once, the client process freezes its objects
        for the length of each run. A full collection then walks only what was made
        since, instead of every object of pandas, distributed or torch: one took
        70-120 ms here, a stall of that worker, or of a local cluster's scheduler, that
        happened once or twice per process in a 4.5 s run. ``False`` leaves the
        collector alone (for workers, set it before the first run).
    """

    preserve_order: bool = True
    max_inflight_bytes: int | str = "1 GiB"
    target_task_bytes: int | str = "8 MiB"
    target_task_s: float = 0.1
    max_pool_calls_per_s: float | None = 20.0
    max_tasks_in_flight_per_actor: int = 4
    actor_idle_timeout_s: float = 5.0
    enable_progress_bars: bool = True
    progress_interval_s: float = 10.0
    max_retries: int = 3
    actor_mmap_threshold: int | str | None = "32 MiB"
    actor_keeps_freed_memory: bool = True
    freeze_gc: bool = True

    _current: ClassVar[DataContext | None] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __setattr__(self, name: str, value: object) -> None:
        # a plain dataclass would take any name: a Ray Data setting or a typo would be
        # kept and do nothing, and a port would run with behaviour it did not ask for
        if name not in _SETTINGS:
            raise AttributeError(_unknown_setting(name))
        object.__setattr__(self, name, value)

    @property
    def execution_options(self) -> ExecutionOptions:
        """Ray Data's ``ctx.execution_options``: its ``preserve_order`` is this context's."""
        return ExecutionOptions(self)

    @classmethod
    def get_current(cls) -> DataContext:
        """Return this process's context, creating it with defaults on first use."""
        with cls._lock:
            if cls._current is None:
                cls._current = cls()
            return cls._current

    def resolved_max_inflight_bytes(self) -> int:
        """``max_inflight_bytes`` in bytes."""
        return _as_bytes(self.max_inflight_bytes, "max_inflight_bytes")

    def resolved_target_task_bytes(self) -> int:
        """``target_task_bytes`` in bytes."""
        return _as_bytes(self.target_task_bytes, "target_task_bytes")

    def resolved_max_pool_calls_per_s(self) -> float | None:
        """``max_pool_calls_per_s``, checked."""
        rate = self.max_pool_calls_per_s
        if rate is None:
            return None
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0:
            raise ValueError(
                f"DataContext.max_pool_calls_per_s must be a positive number of calls per "
                f"second, or None to size calls by target_task_s alone; got {rate!r}"
            )
        return float(rate)

    def resolved_actor_keeps_freed_memory(self) -> bool:
        """``actor_keeps_freed_memory``, checked."""
        if not isinstance(self.actor_keeps_freed_memory, bool):
            raise TypeError(
                "DataContext.actor_keeps_freed_memory must be True or False, got "
                f"{self.actor_keeps_freed_memory!r}"
            )
        return self.actor_keeps_freed_memory

    def resolved_actor_mmap_threshold(self) -> int | None:
        """``actor_mmap_threshold`` in bytes, or ``None``."""
        if self.actor_mmap_threshold is None:
            return None
        nbytes = _as_bytes(self.actor_mmap_threshold, "actor_mmap_threshold")
        if nbytes > MAX_MMAP_THRESHOLD:
            raise ValueError(
                f"DataContext.actor_mmap_threshold={self.actor_mmap_threshold!r} is over glibc's "
                f'limit of 32 MiB; use at most "32 MiB", or None to leave the allocator alone'
            )
        return nbytes


def _as_bytes(value: int | str, name: str) -> int:
    nbytes = parse_bytes(value) if isinstance(value, str) else int(value)
    if nbytes <= 0:
        raise ValueError(f"DataContext.{name} must be positive, got {value!r}")
    return nbytes


# Ray Data settings a port may carry over, and what does their job here
_RAY_SETTINGS = {
    "max_errored_blocks": "map_batches(on_error='skip' or 'quarantine', max_errored_rows=n)",
    "target_max_block_size": "target_task_bytes, or npartitions= on the readers",
    "target_min_block_size": "target_task_bytes, or npartitions= on the readers",
    "enable_operator_progress_bars": "enable_progress_bars",
    "use_push_based_shuffle": "nothing (daskinfer does not shuffle)",
    "actor_prefetcher_enabled": "max_tasks_in_flight_per_actor",
    "op_resource_reservation_enabled": "max_inflight_bytes",
    "wait_for_min_actors_s": "nothing (the pool's min_size is started before any work)",
}


def _unknown_setting(name: str) -> str:
    known = ", ".join(sorted(_SETTINGS))
    if name in _RAY_SETTINGS:
        return (
            f"DataContext has no setting {name!r}: it is Ray Data's; here use "
            f"{_RAY_SETTINGS[name]}. Settings: {known}"
        )
    return f"DataContext has no setting {name!r}; settings: {known}"


class ExecutionOptions:
    """The part of Ray Data's ``DataContext.execution_options`` that daskinfer has."""

    _ctx: DataContext

    def __init__(self, ctx: DataContext) -> None:
        object.__setattr__(self, "_ctx", ctx)

    @property
    def preserve_order(self) -> bool:
        return self._ctx.preserve_order

    @preserve_order.setter
    def preserve_order(self, value: bool) -> None:
        self._ctx.preserve_order = value

    def __setattr__(self, name: str, value: object) -> None:
        if name != "preserve_order":
            raise AttributeError(
                f"execution_options.{name} has no equivalent in daskinfer; only "
                "preserve_order does (DataContext.preserve_order). Resource limits are "
                "the workers' resources and DataContext.max_inflight_bytes"
            )
        object.__setattr__(self, name, value)


_SETTINGS = frozenset(field.name for field in dataclasses.fields(DataContext))
