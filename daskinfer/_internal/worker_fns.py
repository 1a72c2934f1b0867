"""Plain top-level functions that run on Dask workers (picklable by reference).

Every task that produces a block reports the block's row count and size to the client
through a Dask event (``Worker.log_event``), so the client can plan exact batches and
bound memory without fetching data or running an extra task per block.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np
import pandas as pd

import dask.core
from distributed import get_worker, secede
from distributed.utils import sync

from daskinfer._internal import allocator
from daskinfer._internal.batching import (
    block_is_flat,
    block_nbytes,
    column_to_numpy,
    concat_blocks,
    slice_block,
)
from daskinfer._internal.shipping import unship
from daskinfer._internal.transforms import (
    BatchLimits,
    ErroredRows,
    MapBatchesTransform,
    StagedBatch,
    Transform,
    apply_chain,
    prefetch_hook,
    user_code_error,
)
from daskinfer.exceptions import ActorLostError

Slices = Sequence[tuple[int, int]]
R = TypeVar("R")

META_TOPIC = "daskinfer-block-meta"


class SourcePartition:
    """One partition's task graph, opaque to Dask so it travels as plain data.

    ``external`` are keys its tasks read that are results already on the cluster; the
    task that computes the partition receives their values as its dependencies.
    """

    def __init__(self, graph: Mapping[Any, Any], key: Any, external: Sequence[Any] = ()) -> None:
        self.graph = dict(graph)
        self.key = key
        self.external = list(external)


def _report(
    run_id: str, block: pd.DataFrame, started: float, extra: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    worker = get_worker()
    msg = {
        "run": run_id,
        "key": str(worker.get_current_task()),
        "rows": len(block),
        "bytes": block_nbytes(block),
        "flat": block_is_flat(block),
        "worker": worker.address,
        "seconds": time.perf_counter() - started,
    }
    if extra:
        msg.update(extra)
    worker.log_event(META_TOPIC, msg)
    return block


def _announce_start(run_id: str, transforms: Sequence[Transform], key: str | None = None) -> None:
    """Tell the client when a timed stage's task starts running (it times it from here).

    ``key`` is the task's, where this runs off the task's own thread (a predictor's).
    """
    if any(getattr(t, "timeout_s", None) for t in transforms):
        worker = get_worker()
        worker.log_event(
            META_TOPIC,
            {
                "run": run_id,
                "key": key if key is not None else str(worker.get_current_task()),
                "started": True,
                "worker": worker.address,
            },
        )


def _gather_slices(slices: Slices, blocks: Sequence[pd.DataFrame]) -> pd.DataFrame:
    return concat_blocks([slice_block(b, s, e) for b, (s, e) in zip(blocks, slices, strict=True)])


def run_source(
    topic: str, partition: SourcePartition, transforms: Sequence[Transform], *external: Any
) -> pd.DataFrame:
    """Compute one partition of the source dask DataFrame, then fused transforms.

    ``external``: the values of ``partition.external``, in that order.
    """
    started = time.perf_counter()
    transforms = unship(transforms)
    graph = partition.graph
    if external:
        graph = {**graph, **dict(zip(partition.external, external, strict=True))}
    # dask's plain recursive getter: the local scheduler (get_sync) spends some 0.3 ms
    # per partition on its own bookkeeping, a tenth of a small read's task
    (block,) = dask.core.get(graph, [partition.key])
    if not isinstance(block, pd.DataFrame):
        block = pd.DataFrame(block)
    block = block.reset_index(drop=True)
    errors = ErroredRows()
    out = apply_chain(transforms, block, errors=errors)
    return _report(topic, out, started, errors.report())


def run_chain(
    topic: str, transforms: Sequence[Transform], slices: Slices, *blocks: pd.DataFrame
) -> pd.DataFrame:
    """Concatenate row ranges of input blocks and apply fused transforms."""
    started = time.perf_counter()
    transforms = unship(transforms)
    _announce_start(topic, transforms)
    errors = ErroredRows()
    out = apply_chain(transforms, _gather_slices(slices, blocks), errors=errors)
    return _report(topic, out, started, errors.report())


def block_meta(block: pd.DataFrame) -> dict[str, Any]:
    """What a task reports of its block: the fallback when the report did not arrive."""
    return {"rows": len(block), "bytes": block_nbytes(block), "flat": block_is_flat(block)}


class CallTurns:
    """Calls into one predictor, started one after another in the order they arrived.

    A call takes a ticket on arrival. It may hand its work to the predictor's thread once
    every call before it has started there (``wait_for_previous``): the thread runs
    work in the order handed, so calls run in ticket order, back to back, and at most one
    call waits queued behind the running one. A call that fails before it is handed over
    gives its turn up (``give_up``) so that later calls do not wait for it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._issued = 0
        self._started = 0  # tickets below this have started on the predictor (or gave up)
        self._given_up: set[int] = set()  # tickets that gave up before those ahead started

    def take(self) -> int:
        with self._cond:
            ticket = self._issued
            self._issued += 1
            return ticket

    def wait_for_previous(self, ticket: int) -> None:
        """Until every call before ``ticket`` has started (or given up)."""
        with self._cond:
            self._cond.wait_for(lambda: self._started >= ticket)

    def started(self, ticket: int) -> None:
        """``ticket``'s call starts on the predictor: the next in line may hand its work over."""
        self._advance(ticket)

    def give_up(self, ticket: int) -> None:
        """``ticket``'s call ended before it was handed over (it failed while waiting)."""
        with self._cond:
            if ticket > self._started:
                # calls before it have not all started: skip the ticket when they have
                self._given_up.add(ticket)
                return
        self._advance(ticket)

    def _advance(self, ticket: int) -> None:
        with self._cond:
            self._started = max(self._started, ticket + 1)
            while self._started in self._given_up:
                self._given_up.discard(self._started)
                self._started += 1
            self._cond.notify_all()


class PredictorThread:
    """One long-lived thread that runs whatever is handed to it, in the order handed.

    A predictor is built and called on one such thread, as a Ray actor's methods run on
    its one thread. Dask runs each task on a thread of its pool, and a task that leaves
    the pool (``secede``) ends its thread, so without this each call could come on a new
    thread, and thread-local state would not carry from one call to the next: CUDA's
    current device and stream, torch's grad mode, and the caches that libraries keep per
    thread. Measured on an H200: ResNet-50's calls, each on a fresh thread, spent 73 ms
    of CPU time, most of it in ``conv2d``; on one thread, 14 ms. torch caches cuDNN's
    execution plans per thread, which fits a cost that only convolutions paid.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, context, fn = job
            # the job's references go now: an idle thread must not keep its last batch
            del job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(context.run(fn))
                except BaseException as exc:  # noqa: BLE001  # handed back to the waiting caller
                    future.set_exception(exc)
            del future, context, fn

    def run(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """``fn(*args, **kwargs)`` on this thread; the caller waits for its result.

        The caller's context variables go along, so that ``distributed.get_worker()``
        works in the predictor as in a task.
        """
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    def submit(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> Future[R]:
        """Queue ``fn(*args, **kwargs)`` behind the work handed before; its future."""
        future: Future[R] = Future()
        call = functools.partial(fn, *args, **kwargs)
        self._jobs.put((future, contextvars.copy_context(), call))
        return future

    def close(self) -> None:
        """End the thread once the jobs handed before are done."""
        self._jobs.put(None)


class PredictorHost:
    """The object a Dask actor holds: the user's predictor, built once on its worker.

    Calls come from tasks pinned to this worker (see ``run_actor_call``), which find the
    host in the worker's actor table. Turns in arrival order (``CallTurns``) serialise
    calls into one predictor, since several task threads may hold batches for it at
    once. The predictor itself is built and called on a thread of its own (see
    ``PredictorThread``); on an accelerator, ``prefetch_batch`` runs for the next call
    on a second one while the current call runs.
    """

    def __init__(
        self,
        cls: type,
        ctor_args: Sequence[Any],
        ctor_kwargs: Mapping[str, Any],
        stage: str,
        pool_id: str = "",
        names: Sequence[str] = (),
        overlap_calls: bool = False,
        mmap_threshold: int | None = None,
        keep_freed_memory: bool = False,
    ) -> None:
        self.stage = stage
        self.pool_id = pool_id
        self.names = tuple(names)
        # an actor on an accelerator: let the worker prepare the next call while this
        # one runs (see ``run_actor_call``)
        self.overlap_calls = overlap_calls
        self.turns = CallTurns()
        self._arrivals = threading.Lock()
        self.in_progress = 0  # calls that arrived and have not returned
        self.calls = 0
        self.limits = BatchLimits()
        self._reported_oom_splits = 0
        if mmap_threshold is not None:
            # before the model loads, so that its buffers come from the same heap
            # (why: daskinfer/_internal/allocator.py)
            allocator.set_mmap_threshold(mmap_threshold)
        if keep_freed_memory:
            allocator.keep_freed_memory()
        self.thread = PredictorThread(f"daskinfer-predictor-{stage}")
        self.stager: PredictorThread | None = None
        try:
            self.instance = self.thread.run(cls, *ctor_args, **ctor_kwargs)
        except Exception as exc:
            self.thread.close()
            raise user_code_error(f"{stage} (constructor)", exc) from exc
        worker = get_worker()
        self.gpu_sampler = GpuSampler.for_worker(worker)
        # only now, with the model loaded, may calls be scheduled here: calls ask for a
        # worker resource named after their actor (see ``actor_resource``), which this
        # worker offers from this moment. A replacement for a lost actor also takes the
        # lost one's names, so that Dask can recompute, here, results that were lost
        # with the old worker
        if self.names:
            sync(worker.loop, worker.set_resources, **dict.fromkeys(self.names, ACTOR_CAPACITY))

    def __del__(self) -> None:
        # the actor is released (pool shrank or the run ended): stop sampling its GPU.
        # Its resource names stay offered: a result of this actor that must be recomputed
        # later then fails clearly here (no predictor) instead of waiting for a worker
        # that offers the name
        sampler = getattr(self, "gpu_sampler", None)
        if sampler is not None:
            sampler.close()
        for thread in (getattr(self, "thread", None), getattr(self, "stager", None)):
            if thread is not None:
                thread.close()

    def call(
        self,
        transform: Transform,
        columns: dict[str, Any] | None,
        work: Callable[[StagedBatch | None], R],
    ) -> R:
        """Run ``work(staged)`` on the predictor's thread, one call at a time.

        ``staged`` is the call's first batch, put through the predictor's
        ``prefetch_batch`` ahead of the call, or None.

        Calls run in the order they arrived. A call that arrives while another runs
        leaves the worker's thread pool (``secede``) and, once the call ahead has
        started, queues its work on the predictor's thread, which starts it the moment
        the call ahead returns: no hand-over between threads in between (each such
        wake-up waits for a core and the GIL; in W2 on two busy cores, 2-8 ms at every
        task boundary, and W6's sleeping CPU actors lost about 5 ms a call with a lock
        instead).

        On an actor that holds an accelerator (``overlap_calls``), every call leaves the
        thread pool first: the worker then starts the next queued call, which waits
        here, so the accelerator goes from one call to the next without waiting for
        Dask's per-task overhead (a few ms a task; measured: W2's predictor idled 0.3 s
        of 4.5 s between tasks), and the next in line puts its first batch (``columns``,
        when the rows came assembled) through ``prefetch_batch`` while the call ahead
        runs. One batch staged ahead hides a copy to the device; more would each hold
        device memory. A CPU actor's call that finds the predictor idle keeps its slot:
        the freed slot would run CPU work on the core the predictor uses.
        """
        with self._arrivals:
            ticket = self.turns.take()
            ahead = self.in_progress
            self.in_progress += 1
        try:
            if self.overlap_calls or ahead:
                secede()  # the call waits, and then runs, outside the thread pool
            try:
                self.turns.wait_for_previous(ticket)  # the call ahead runs now (or none does)
                staged = None
                if (
                    self.overlap_calls
                    and columns is not None
                    and isinstance(transform, MapBatchesTransform)
                ):
                    # a failure here is not final: the batch is staged again in the call,
                    # where its error is handled
                    with contextlib.suppress(Exception):
                        staged = self._stage(transform, columns)
                queued = self.thread.submit(self._in_turn, ticket, work, staged)
            except BaseException:
                self.turns.give_up(ticket)
                raise
            return queued.result()
        finally:
            with self._arrivals:
                self.in_progress -= 1

    def _in_turn(
        self, ticket: int, work: Callable[[StagedBatch | None], R], staged: StagedBatch | None
    ) -> R:
        self.turns.started(ticket)
        return work(staged)

    def _stage(self, transform: MapBatchesTransform, columns: dict[str, Any]) -> StagedBatch | None:
        """The call's first batch through ``prefetch_batch``, on the staging thread."""
        if prefetch_hook(self.instance) is None:
            return None
        if self.stager is None:
            # one long-lived thread, like the predictor's: the copy stream and pinned
            # buffers a hook uses stay with one thread
            self.stager = PredictorThread(f"daskinfer-stage-{self.stage}")
        return self.stager.run(transform.stage_first_batch, columns, self.instance, self.limits)

    def take_metrics(self) -> dict[str, Any]:
        """Figures since the last call: the predictor's own counters, OOM splits, GPU use.

        A predictor may define ``daskinfer_metrics() -> dict[str, float]`` returning
        counters accumulated since its previous call (the ready predictors report
        padding this way); they are summed per stage in ``Dataset.stats()``.
        """
        out: dict[str, Any] = {}
        report = getattr(self.instance, "daskinfer_metrics", None)
        if callable(report):
            try:
                counters = report()
            except Exception:  # noqa: BLE001  # figures must never fail a batch
                counters = None
            if isinstance(counters, Mapping) and counters:
                out["counters"] = {str(k): float(v) for k, v in counters.items()}
        splits = self.limits.oom_splits - self._reported_oom_splits
        if splits:
            self._reported_oom_splits = self.limits.oom_splits
            out["oom_splits"] = splits
            out["max_rows"] = self.limits.max_rows
        if self.gpu_sampler is not None:
            busy = self.gpu_sampler.take()
            if busy is not None:
                out["gpu_busy"] = busy
        return out


class GpuSampler:
    """Samples the worker's GPU utilisation with NVML in a background thread.

    NVML's utilisation is the share of the last sample period during which a kernel
    ran: the accelerator's real busy fraction, not a count of occupied slots.
    """

    def __init__(self, handle: Any, pynvml: Any, period_s: float = 0.2) -> None:
        self._handle = handle
        self._nvml = pynvml
        self._period_s = period_s
        self._lock = threading.Lock()
        self._sum = 0.0
        self._count = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name="daskinfer-gpu-sampler", daemon=True
        )
        self._thread.start()

    @classmethod
    def for_worker(cls, worker: Any) -> GpuSampler | None:
        """A sampler for the worker's GPU, or None on a worker without one (or NVML)."""
        if not worker.state.total_resources.get("GPU"):
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
            if visible.isdigit():
                handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible))
            else:
                handle = pynvml.nvmlDeviceGetHandleByUUID(visible)
        except Exception:  # noqa: BLE001  # no NVML here: the stats just carry no GPU figure
            return None
        return cls(handle, pynvml)

    def close(self) -> None:
        self._stopped.set()

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                busy = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu / 100.0
            except Exception:  # noqa: BLE001  # NVML gone: stop sampling
                return
            with self._lock:
                self._sum += busy
                self._count += 1
            self._stopped.wait(self._period_s)

    def take(self) -> tuple[float, int] | None:
        """(sum of samples, number of samples) since the last call."""
        with self._lock:
            if not self._count:
                return None
            out = (self._sum, self._count)
            self._sum, self._count = 0.0, 0
        return out


def schedule_unrunnable(dask_scheduler: Any, worker: str) -> int:
    """Run on the scheduler after a worker took new resources (a replacement actor's names).

    Dask's ``set_resources`` does not look again at tasks waiting for a worker with those
    resources (``no-worker``), as adding a worker does: results of a lost actor that
    must be recomputed would wait forever. Returns how many tasks it released.
    """
    ws = dask_scheduler.workers.get(worker)
    if ws is None:
        return 0
    recs = dask_scheduler.bulk_schedule_unrunnable_after_adding_worker(ws)
    if recs:
        dask_scheduler.transitions(recs, stimulus_id=f"daskinfer-actor-names-{time.time()}")
    return len(recs)


async def set_actor_names(dask_worker: Any, names: Sequence[str], quantity: float) -> None:
    """Offer (``ACTOR_CAPACITY``) or withdraw (0) actor names on this worker (``client.run``)."""
    await dask_worker.set_resources(**dict.fromkeys(names, quantity))


def actor_resource(actor_key: str) -> str:
    """The worker resource that routes calls to an actor (and to its replacements)."""
    return f"daskinfer-actor-{actor_key}"  # cluster.ACTOR_RESOURCE_PREFIX


# a worker offers an actor's resource in this quantity and each call asks for 1, so the
# resource routes calls without limiting how many are queued (the host's lock serialises)
ACTOR_CAPACITY = 1e9


def _find_host(worker: Any, actor_key: str, pool_id: str) -> PredictorHost | None:
    host = worker.state.actors.get(actor_key)
    if isinstance(host, PredictorHost):
        return host
    # a recomputation (or a call) addressed to a lost actor that this worker's actor
    # replaced: any predictor of the same pool gives the same result
    for candidate in list(worker.state.actors.values()):
        if isinstance(candidate, PredictorHost) and candidate.pool_id == pool_id:
            return candidate
    return None


class AssembledBatch:
    """A predictor's input, assembled on a CPU worker: its rows as contiguous arrays.

    Blocks keep N-D values (token ids, images) as object columns of per-row arrays;
    unpickling those is Python work per row, and on an accelerator's worker any Python
    running beside the predictor slows it (see ``run_actor_call``). A dict of
    contiguous arrays travels as raw buffers and arrives ready to call with.
    """

    __slots__ = ("columns",)

    def __init__(self, columns: dict[str, Any]) -> None:
        self.columns = columns


def assemble_batch(
    transforms: Sequence[Transform], slices: Slices, *blocks: pd.DataFrame
) -> AssembledBatch:
    """Cut, concatenate and convert one predictor call's rows (on a CPU worker, or in
    the call itself for blocks of fixed-width columns)."""
    first = unship(transforms)[0]
    assert isinstance(first, MapBatchesTransform)
    if len(blocks) > 1 and first.batch_format == "numpy":
        joined = _join_flat_columns(slices, blocks)
        if joined is not None:
            return AssembledBatch(joined)
    block = _gather_slices(slices, blocks)
    columns = first.prepare(block)
    assert columns is not None
    return AssembledBatch(columns)


def _join_flat_columns(slices: Slices, blocks: Sequence[pd.DataFrame]) -> dict[str, Any] | None:
    """The numpy columns of row ranges of flat blocks with one schema, joined with one copy
    per column (pandas' concat and the conversion after it would copy twice and cost more
    Python); None where the blocks differ in columns or dtypes, or hold objects."""
    head = blocks[0]
    if not block_is_flat(head):
        return None
    names, dtypes = list(head.columns), list(head.dtypes)
    if any(list(b.columns) != names or list(b.dtypes) != dtypes for b in blocks[1:]):
        return None
    return {
        str(name): np.concatenate(
            [column_to_numpy(b[name])[s:e] for b, (s, e) in zip(blocks, slices, strict=True)]
        )
        for name in names
    }


def run_actor_call(
    topic: str,
    actor_key: str,
    pool_id: str,
    assemble_here: bool,
    transforms: Sequence[Transform],
    slices: Slices | None,
    *blocks: pd.DataFrame | AssembledBatch,
) -> pd.DataFrame:
    """Run one bundle (or one ``AssembledBatch``) through the predictor of ``actor_key``.

    ``assemble_here``: the executor sent the rows of blocks of fixed-width columns to an
    accelerator's actor without an assembly task (see ``ActorPoolOperator.dispatch``);
    the call assembles them itself.

    The task asks for the actor's worker resource, so it runs where the actor lives: the
    batch arrives as an ordinary Dask dependency and the output stays here as an
    ordinary result; calling the predictor directly avoids the actor RPC hop and its
    per-worker single thread. The actor is not a dependency in Dask's graph, so when a
    worker dies, Dask recomputes the results it held from their inputs, on the worker
    of the actor that replaced the lost one.
    """
    worker = get_worker()
    transforms = unship(transforms)
    host = _find_host(worker, actor_key, pool_id)
    if host is None:
        raise ActorLostError(
            f"predictor actor {actor_key} is not on worker {worker.address}; "
            "the worker was probably restarted"
        )
    assembled: AssembledBatch | None = None
    if slices is None:
        assert isinstance(blocks[0], AssembledBatch)
        assembled = blocks[0]
    elif assemble_here:
        # cutting and joining blocks of fixed-width columns copies a few buffers, little
        # enough to do beside a running call, and done here, the next call's first
        # batch is staged ahead as an assembled one
        assembled = assemble_batch(transforms, slices, *blocks)
    key = str(worker.get_current_task())

    def in_turn(staged: StagedBatch | None) -> tuple[pd.DataFrame, float, dict[str, Any]]:
        # on the predictor's thread, in the call's turn
        started = time.perf_counter()  # the predictor's own time, not the wait for it
        # the batch is assembled and converted in the call's turn, not while the
        # previous call runs: torch releases the GIL around every operation and waits to
        # get it back while another thread runs Python (up to the 5 ms switch interval),
        # so a neighbour stacking images slowed a GPU's kernel launches several-fold
        # (measured: 3x per call here with 19 MB batches, 5-7x on an H200)
        if assembled is not None:
            block, prepared = None, assembled.columns
        else:
            assert slices is not None  # a bundle of blocks comes with its row ranges
            block, prepared = _gather_slices(slices, blocks), None
        _announce_start(topic, transforms, key)
        host.calls += 1
        errors = ErroredRows()
        out = apply_chain(transforms, block, host.instance, host.limits, errors, prepared, staged)
        return out, started, {**host.take_metrics(), **errors.report()}

    columns = assembled.columns if assembled is not None else None
    out, started, extra = host.call(transforms[0], columns, in_turn)
    return _report(topic, out, started, extra)
