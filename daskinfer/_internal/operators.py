"""Physical operators: the client-side state of each stage of a running plan.

An operator owns its input buffer (a ``Bundler``), its tasks in flight and, for an actor
pool, its actors. The ``StreamingExecutor`` (executor.py) calls ``can_dispatch``,
``dispatch``, ``on_output``, ``on_task_error`` and ``tick``; operators call back into it to
submit tasks and to hand blocks downstream. Operators live on the client and refuse to be
pickled; what runs on workers is in worker_fns.py.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import dask
from dask.task_spec import Alias
from distributed import Future

from daskinfer import cluster
from daskinfer._internal import worker_fns
from daskinfer._internal.bundler import BlockRef, Bundler, Slice
from daskinfer._internal.plan import BlocksSource, DaskSource
from daskinfer._internal.planner import (
    ActorStageSpec,
    LimitSpec,
    RepartitionSpec,
    SourceSpec,
    TaskStageSpec,
)
from daskinfer._internal.transforms import MapBatchesTransform
from daskinfer.exceptions import ActorLostError, PlacementError, UserCodeError
from daskinfer.metrics import OperatorStats

if TYPE_CHECKING:
    from daskinfer._internal.executor import StreamingExecutor

logger = logging.getLogger("daskinfer")


def _stage_slug(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()[:60] or "stage"


# a task's Dask priority: later stages first (they free memory), and within a stage the
# earlier batch first. Dask breaks ties between equal priorities last-in-first-out on a
# worker, so with one priority per stage the first batch could run last, and ordered
# output waited for it (measured: the first block of a read stage held back 3 s while
# 110 later ones finished, and a fast predictor starved meanwhile; benchmarks/feed_gap.py)
_STAGE_PRIORITY_SPAN = 10**9


def task_priority(stage_index: int, seq: int) -> int:
    """Dask priority of a stage's ``seq``-th task (higher runs first)."""
    return stage_index * _STAGE_PRIORITY_SPAN - seq


@dataclasses.dataclass(eq=False)
class TaskRecord:
    key: str
    future: Future
    op: Operator
    seq: int
    inputs: list[BlockRef]
    submitted: float
    rows_in: int
    actor: ActorSlot | None = None
    meta_future: Future | None = None
    bundle: list[Slice] = dataclasses.field(default_factory=list)
    attempts: int = 0
    started_at: float | None = None  # when it began running (timed stages only)
    started_worker: str | None = None
    sent_to: str | None = None  # the one worker it was placed on, if placed explicitly
    # whether running it again counts against max_retries: not for a batch that only
    # waited in a lost actor's queue behind the one that was running
    charged: bool = True


@dataclasses.dataclass(eq=False)
class ActorSlot:
    future: Future
    worker: str
    resources: dict[str, float]
    names: tuple[str, ...] = ()  # worker resources routing calls here (own + inherited)
    inherited: bool = False  # took over a lost actor's names: the scheduler needs a nudge
    in_flight: int = 0
    idle_since: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def key(self) -> str:
        return str(self.future.key)


class Operator:
    """Client-side state of one physical operator. Never pickled."""

    barrier = False
    # what the stage's tasks get as their transforms: a ShippedTransforms (inside each
    # task), a future of them (large ones), or () for none; set when the run starts
    transforms_arg: Any = None

    def __init__(self, ex: StreamingExecutor, index: int, name: str) -> None:
        self.ex = ex
        self.index = index
        self.name = name
        self.slug = _stage_slug(name)
        self.inputs = Bundler()
        self.inputs_done = False
        self.in_flight: dict[str, TaskRecord] = {}
        self.next_seq = 0
        self.next_emit = 0
        self.reorder: dict[int, BlockRef | None] = {}
        self.finished = False
        self.stats = OperatorStats(name=name)
        self.seconds_per_row: float | None = None  # measured on the workers
        # seconds of work a bundle aims for; an actor pool may raise it (see
        # ActorPoolOperator._grow_bundles_if_overhead_bound)
        self.task_s = ex.target_task_s
        # set by the executor for a stage with map_batches(timeout_s=...)
        self.timeout_s: float | None = None
        self.timeout_stage: str = name
        self.timeout_on_error = "raise"

    def observe(self, rows: int, seconds: float) -> None:
        """Fold one task's measured time in code into the stage's figures and the per-row
        cost estimate."""
        self.stats.compute_s += seconds
        self.stats.tasks_measured += 1
        if rows <= 0:
            return
        cost = max(seconds, 1e-6) / rows
        old = self.seconds_per_row
        self.seconds_per_row = cost if old is None else 0.7 * old + 0.3 * cost

    def sized_target(self, batch_size: int) -> int:
        """Rows per bundle: whole batches adding up to about ``target_task_s`` of work.

        Until a task has been measured, one batch. The bytes cap keeps bundles of cheap
        rows from growing without bound.
        """
        if self.seconds_per_row is None:
            return batch_size
        head = self.inputs.head()
        per_row_bytes = head.bytes_per_row if head is not None else 1.0
        by_time = self.work_per_bundle_s() / self.seconds_per_row
        by_bytes = self.ex.target_task_bytes / per_row_bytes
        return batch_size * max(1, int(min(by_time, by_bytes) // batch_size))

    def work_per_bundle_s(self) -> float:
        """Seconds of measured work a bundle aims for."""
        return self.task_s

    def __reduce__(self) -> Any:
        raise TypeError(f"{type(self).__name__} lives on the client and must not be pickled")

    # --- capacity ---------------------------------------------------------------
    def max_in_flight(self) -> int:
        return max(2, 2 * self.ex.task_threads_of(self.ex.cpu_workers))

    def target_rows(self) -> int | None:
        """Rows per bundle, or None for whole blocks."""
        return None

    def wants_more_input(self) -> bool:
        """Whether the upstream operator may add more blocks to this one's input.

        Enough queued input for the calls in flight, or, when more, for what this stage
        takes in while the stage before it runs one task (see ``rows_taken_meanwhile``).
        Memory stays bounded by ``DataContext.max_inflight_bytes`` either way.
        """
        target = self.target_rows()
        if target is None:
            return len(self.inputs) < 2 * self.max_in_flight()
        floor = target * max(2, self.max_in_flight())
        return self.inputs.rows < max(floor, self.rows_taken_meanwhile())

    def rows_taken_meanwhile(self) -> int:
        """Rows this stage can take in, at full speed, during two of the upstream
        stage's task latencies (submission to result); 0 until both were measured.

        By Little's law a queue that holds less runs dry between the upstream's waves
        of results: measured with W7's shape (reads of 236 ms, predictor calls of
        22 ms; benchmarks/feed_gap.py), a queue of four calls left the predictor
        waiting while reads stood blocked.
        """
        if self.index == 0:
            return 0
        up = self.ex.ops[self.index - 1].stats
        mine = self.stats
        if not up.tasks or mine.compute_s <= 0 or not mine.rows_out:
            return 0
        rows_per_s = mine.rows_out / (mine.compute_s / max(1, self.slots()))
        return int(rows_per_s * 2 * up.task_seconds / up.tasks)

    # --- work -------------------------------------------------------------------
    def add_input(self, ref: BlockRef) -> None:
        self.stats.blocks_in += 1
        self.stats.rows_in += ref.rows
        self.stats.bytes_in += ref.nbytes
        self.inputs.add(ref)

    # --- figures ----------------------------------------------------------------
    def slots(self) -> int:
        """Tasks (or actors) this stage can run at once: the unit of its busy fraction."""
        return self.ex.threads_of(None)

    def has_room(self) -> bool:
        """Whether the stage could start another task now (a slot is free)."""
        return len(self.in_flight) < self.max_in_flight()

    def has_idle_slot(self) -> bool:
        """Whether part of the stage sits idle now (fewer tasks than slots)."""
        return len(self.in_flight) < self.slots()

    def queued_batches(self) -> int:
        """Batches waiting in the input buffer (blocks, for whole-block stages)."""
        target = self.target_rows()
        if target is None:
            return len(self.inputs)
        return -(-self.inputs.rows // max(1, self.batch_rows() or target))

    def batch_rows(self) -> int | None:
        """The stage's ``batch_size`` (rows per call of the user's code), if it has one."""
        return getattr(getattr(self, "spec", None), "batch_size", None)

    def rows_expected(self) -> int | None:
        """Rows this stage will produce, where the plan tells (a source of known size)."""
        return None

    def add_empty(self, ref: BlockRef) -> None:
        """An empty block from upstream: nothing to process (task stages keep one)."""
        ref.exhausted = True
        self.ex.maybe_release(ref)

    def next_bundle(self) -> list[Slice] | None:
        if not self.inputs.rows and not len(self.inputs):
            return None
        target = self.target_rows()
        if target is None:
            return self.inputs.take_block()
        if self.inputs.rows >= target or (self.inputs_done and self.inputs.rows > 0):
            return self.inputs.take(target)
        return None

    def next_bundle_ready(self) -> bool:
        """Whether enough input is queued to form a bundle now."""
        target = self.target_rows()
        if target is None:
            return bool(len(self.inputs))
        return self.inputs.rows >= target or (self.inputs_done and self.inputs.rows > 0)

    def can_dispatch(self) -> bool:
        return len(self.in_flight) < self.max_in_flight() and self.ex.downstream_has_room(self)

    def dispatch(self) -> bool:
        raise NotImplementedError  # pragma: no cover

    def on_output(self, task: TaskRecord, ref: BlockRef) -> None:
        """A task finished: release its inputs and emit its output in order."""
        self.stats.record_task(ref.rows, ref.nbytes, time.monotonic() - task.submitted)
        self._emit(task.seq, ref)

    def _emit(self, seq: int, ref: BlockRef | None) -> None:
        if not self.ex.preserve_order:
            self.ex.deliver(self, ref)
            self.next_emit += 1
            return
        self.reorder[seq] = ref
        while self.next_emit in self.reorder:
            self.ex.deliver(self, self.reorder.pop(self.next_emit))
            self.next_emit += 1

    def maybe_finish(self) -> bool:
        if self.finished:
            return False
        if self.inputs_done and not len(self.inputs) and not self.in_flight and not self.reorder:
            self.finished = True
            self.on_finish()
            return True
        return False

    def on_finish(self) -> None:
        pass

    def cancel(self) -> None:
        for task in list(self.in_flight.values()):
            task.future.cancel()
            self.ex.tasks.pop(task.key, None)
            for ref in task.inputs:
                ref.uses -= 1
                self.ex.maybe_release(ref)
        self.in_flight.clear()
        for ref in self.inputs.drain():
            self.ex.maybe_release(ref)
        for held in self.reorder.values():
            if held is not None:
                self.ex.release(held)
        self.reorder.clear()
        self.inputs_done = True
        self.finished = True
        self.on_finish()

    def tick(self, now: float) -> None:
        """Periodic housekeeping (autoscaling)."""

    def submit_bundle(
        self,
        fn: Callable[..., Any],
        bundle: list[Slice],
        *args: Any,
        workers: list[str] | None,
        resources: Mapping[str, float] | None,
        actor: ActorSlot | None = None,
        retry_of: TaskRecord | None = None,
        assemble: bool = False,
    ) -> None:
        slices: list[tuple[int, int]] | None = [(start, stop) for _, start, stop in bundle]
        futures = [ref.future for ref, _, _ in bundle]
        if retry_of is None:
            for ref, _, _ in bundle:
                ref.uses += 1
            seq = self.next_seq
            self.next_seq += 1
        else:
            seq = retry_of.seq  # the retry keeps its place in the output order
        if assemble:
            # the bundle's rows arrive as one future: an AssembledBatch built from them
            # by a CPU task (see worker_fns.AssembledBatch)
            cpu = self.ex.cpu_workers
            assembled = self.ex.client.submit(
                worker_fns.assemble_batch,
                self.transforms_arg,
                slices,
                *futures,
                key=f"daskinfer-{self.slug}-batch-{self.ex.run_id}-{uuid.uuid4().hex[:12]}",
                workers=cpu,
                allow_other_workers=cpu is not None,
                priority=task_priority(self.index, seq),
                pure=False,
            )
            slices, futures = None, [assembled]
        self.ex.submit_task(
            self,
            seq,
            fn,
            (*args, slices, *futures),
            inputs=[ref for ref, _, _ in bundle],
            rows_in=sum(stop - start for _, start, stop in bundle),
            workers=workers,
            resources=resources,
            actor=actor,
            bundle=bundle,
            attempts=retry_of.attempts + int(retry_of.charged) if retry_of is not None else 0,
        )

    def on_task_error(self, task: TaskRecord) -> bool:
        """A task failed; return True if the operator recovered (e.g. resubmitted it)."""
        return False

    def retry(self, task: TaskRecord) -> None:
        """Run a task's batch again (it timed out); it keeps its place in the order."""
        raise NotImplementedError(f"{type(self).__name__} does not retry batches")


class SourceOperator(Operator):
    def __init__(self, ex: StreamingExecutor, index: int, spec: SourceSpec) -> None:
        super().__init__(ex, index, spec.name)
        self.spec = spec
        # what a fused stage asks for (a CPU); reads alone ask for nothing
        self.resources = ex.effective_resources(spec.resources)
        self.inputs_done = True
        self._blocks: Iterator[Any]
        self._graph: dict[Any, Any] = {}
        self._deps: dict[Any, set[Any]] = {}
        if isinstance(spec.source, BlocksSource):
            src = spec.source
            self._blocks = iter(zip(src.futures, src.rows, src.nbytes, strict=True))
            self._pending = len(src.futures)
        else:
            assert isinstance(spec.source, DaskSource)
            frame = spec.source.frame
            frame = frame.optimize() if hasattr(frame, "optimize") else dask.optimize(frame)[0]
            self._graph = dict(frame.__dask_graph__())
            self._deps = {k: set(v) for k, v in dask.core.get_deps(self._graph)[0].items()}
            keys = list(frame.__dask_keys__())
            self._blocks = iter(keys)
            self._pending = len(keys)

    def wants_more_input(self) -> bool:
        return False

    def slots(self) -> int:
        return self.ex.threads_of(self.ex.cpu_workers)

    def has_room(self) -> bool:
        return self._pending > 0 and len(self.in_flight) < self.max_in_flight()

    def next_bundle_ready(self) -> bool:
        return self._pending > 0

    def queued_batches(self) -> int:
        return self._pending  # partitions not yet read

    def rows_expected(self) -> int | None:
        if self.spec.transforms:
            return None  # a fused function may drop or add rows
        if isinstance(self.spec.source, BlocksSource):
            return sum(self.spec.source.rows)
        return self.spec.source.rows

    def _subgraph(self, key: Any) -> tuple[dict[Any, Any], list[Any]]:
        """The tasks that compute partition ``key``, and the keys they read that are not
        tasks of the graph but results already on the cluster: a frame built from
        futures, as ``to_dask()`` returns (``from_dask(ds.to_dask())``), or a persisted
        one, whose graph maps keys to the futures themselves (``from_dask(df.persist())``).
        """
        out: dict[Any, Any] = {}
        external: set[Any] = set()
        stack = [key]
        while stack:
            k = stack.pop()
            if k in out:
                continue
            node = self._graph[k]
            if isinstance(node, Future):
                # a result on the cluster: the task receives it as a dependency
                external.add(node.key)
                if node.key != k:
                    out[k] = Alias(k, node.key)
                continue
            out[k] = node
            stack.extend(self._deps.get(k, ()))
            for dep in getattr(node, "dependencies", ()):
                if dep not in self._graph:
                    external.add(dep)
        return out, sorted(external, key=str)

    def can_dispatch(self) -> bool:
        return (
            self._pending > 0
            and len(self.in_flight) < self.max_in_flight()
            and self.ex.downstream_has_room(self)
            and self.ex.budget_allows_read()
        )

    def dispatch(self) -> bool:
        item = next(self._blocks, None)
        if item is None:
            self._pending = 0
            return False
        self._pending -= 1
        seq = self.next_seq
        self.next_seq += 1
        if isinstance(self.spec.source, BlocksSource) and not self.spec.transforms:
            future, rows, nbytes = item
            ref = self.ex.new_ref(future, rows, nbytes)
            ref.origin = seq
            self.stats.record_task(rows, nbytes, 0.0)
            self._emit(seq, ref)
            return True
        if isinstance(self.spec.source, BlocksSource):
            future, rows, nbytes = item
            ref = self.ex.new_ref(future, rows, nbytes)
            ref.origin = seq
            ref.exhausted = True
            ref.uses += 1
            self.ex.submit_task(
                self,
                seq,
                worker_fns.run_chain,
                (self.ex.run_id, self.transforms_arg, [(0, rows)], future),
                inputs=[ref],
                rows_in=rows,
                workers=self.ex.cpu_workers,
                resources=self.resources or None,
            )
            return True
        graph, external = self._subgraph(item)
        self.ex.submit_task(
            self,
            seq,
            worker_fns.run_source,
            (
                self.ex.run_id,
                worker_fns.SourcePartition(graph, item, external),
                self.transforms_arg,
                # results on the cluster that the partition reads: Dask hands them to
                # the task as its dependencies
                *(Future(k, self.ex.client) for k in external),
            ),
            inputs=[],
            rows_in=0,
            # with resources where some workers offer none (an accelerator's), the
            # resources alone place it (see submit_task), among the workers that offer
            # them: the transforms travel inside the task, which then depends on nothing
            workers=self.ex.least_loaded_cpu_worker(self) or self.ex.cpu_workers,
            resources=self.resources or None,
        )
        return True

    def maybe_finish(self) -> bool:
        if self._pending == 0 and not self.in_flight and not self.reorder and not self.finished:
            self.finished = True
            return True
        return False

    def cancel(self) -> None:
        self._pending = 0
        super().cancel()


class TaskOperator(Operator):
    def __init__(self, ex: StreamingExecutor, index: int, spec: TaskStageSpec) -> None:
        super().__init__(ex, index, spec.name)
        self.spec = spec
        self.resources = ex.effective_resources(spec.resources)
        self.empty_example: BlockRef | None = None

    def add_empty(self, ref: BlockRef) -> None:
        # kept so that, if no rows ever arrive, the stage still runs once on an empty
        # block and an empty result carries the columns the stage would produce
        if self.empty_example is None:
            self.empty_example = ref
        else:
            super().add_empty(ref)

    def maybe_finish(self) -> bool:
        example = self.empty_example
        if example is not None and self.inputs_done and not self.in_flight and not len(self.inputs):
            self.empty_example = None
            if self.next_seq == 0:
                self.submit_bundle(
                    worker_fns.run_chain,
                    [(example, 0, 0)],
                    self.ex.run_id,
                    self.transforms_arg,
                    workers=self.ex.workers_for(self.resources),
                    resources=self.resources or None,
                )
                example.exhausted = True
                return False
            super().add_empty(example)
        return super().maybe_finish()

    def cancel(self) -> None:
        if self.empty_example is not None:
            super().add_empty(self.empty_example)
            self.empty_example = None
        super().cancel()

    def slots(self) -> int:
        threads = self.ex.threads_of(self.ex.workers_for(self.resources))
        return min(threads, self.spec.concurrency) if self.spec.concurrency else threads

    def max_in_flight(self) -> int:
        if self.spec.concurrency is not None:
            return self.spec.concurrency
        return max(2, 2 * self.ex.task_threads_of(self.ex.workers_for(self.resources)))

    def target_rows(self) -> int | None:
        size = self.spec.batch_size
        return None if size is None else self.sized_target(size)

    def next_bundle(self) -> list[Slice] | None:
        """A full-size bundle, or, while a worker slot is idle, the whole batches queued.

        Waiting for a full bundle (``target_task_bytes``) amortises task overhead when
        every slot is busy; when one is idle, waiting would only add latency.
        """
        bundle = super().next_bundle()
        size = self.spec.batch_size
        if bundle is not None or size is None:
            return bundle
        idle = len(self.in_flight) < self.ex.threads_of(self.ex.workers_for(self.resources))
        if idle and self.inputs.rows >= size:
            return self.inputs.take(self.inputs.rows // size * size)
        return None

    def next_bundle_ready(self) -> bool:
        size = self.spec.batch_size
        return super().next_bundle_ready() or (size is not None and self.inputs.rows >= size)

    def dispatch(self) -> bool:
        bundle = self.next_bundle()
        if not bundle:
            return False
        self.submit_bundle(
            worker_fns.run_chain,
            bundle,
            self.ex.run_id,
            self.transforms_arg,
            workers=self.ex.workers_for(self.resources),
            resources=self.resources or None,
        )
        return True

    def retry(self, task: TaskRecord) -> None:
        self.stats.retries += 1
        self.submit_bundle(
            worker_fns.run_chain,
            task.bundle,
            self.ex.run_id,
            self.transforms_arg,
            workers=self.ex.workers_for(self.resources),
            resources=self.resources or None,
            retry_of=task,
        )


class LimitOperator(Operator):
    def __init__(self, ex: StreamingExecutor, index: int, spec: LimitSpec) -> None:
        super().__init__(ex, index, spec.name)
        self.remaining = spec.n

    def wants_more_input(self) -> bool:
        return self.remaining > 0

    def add_empty(self, ref: BlockRef) -> None:
        self.ex.deliver(self, ref)  # columns pass through a limit unchanged

    def can_dispatch(self) -> bool:
        return bool(len(self.inputs)) and not self.in_flight

    def dispatch(self) -> bool:
        if self.remaining <= 0:
            for ref in self.inputs.drain():
                self.ex.maybe_release(ref)
            return False
        head = self.inputs.head()
        assert head is not None
        if head.rows <= self.remaining:
            (ref, _, _) = self.inputs.take_block()[0]
            self.remaining -= ref.rows
            seq = self.next_seq
            self.next_seq += 1
            self.stats.record_task(ref.rows, ref.nbytes, 0.0)
            ref.exhausted = False  # ownership passes downstream unchanged
            self._emit(seq, ref)
        else:
            bundle = self.inputs.take(self.remaining)
            self.remaining = 0
            self.submit_bundle(
                worker_fns.run_chain,
                bundle,
                self.ex.run_id,
                (),
                workers=self.ex.cpu_workers,
                resources=None,
            )
        if self.remaining <= 0:
            self.ex.stop_upstream(self)
        return True


class RepartitionOperator(Operator):
    barrier = True

    def __init__(self, ex: StreamingExecutor, index: int, spec: RepartitionSpec) -> None:
        super().__init__(ex, index, spec.name)
        self.n = spec.n
        self.shuffle = spec.shuffle
        self._sizes: list[int] | None = None
        # shuffle: per output block not yet submitted, its slices of the input blocks and
        # the futures of those slices (cut where each block lives), in output order
        self._exchange: collections.deque[tuple[list[Slice], list[Future]]] | None = None

    def wants_more_input(self) -> bool:
        return True

    def add_empty(self, ref: BlockRef) -> None:
        # no rows to re-cut, but its columns pass on: an empty result keeps them
        self.ex.deliver(self, ref)

    def can_dispatch(self) -> bool:
        pending = bool(self._exchange) if self._exchange is not None else bool(len(self.inputs))
        return self.inputs_done and len(self.in_flight) < self.max_in_flight() and pending

    def maybe_finish(self) -> bool:
        if self._exchange:
            return False  # output blocks wait to be submitted
        return super().maybe_finish()

    def cancel(self) -> None:
        for bundle, _ in self._exchange or ():
            for ref, _, _ in bundle:
                ref.uses -= 1
                self.ex.maybe_release(ref)
        self._exchange = collections.deque()  # the slices' futures go: Dask drops them
        super().cancel()

    def _cut_for_exchange(self) -> collections.deque[tuple[list[Slice], list[Future]]]:
        """Cut every input block into ``n`` slices, as Ray's shuffle map does.

        A slice is a task on the block's worker (a view of the block there), so each
        output task fetches only its rows of each block, not whole blocks. Every input
        block counts one use per output block that takes rows from it, and is released
        when the last of them is done.
        """
        outputs: list[tuple[list[Slice], list[Future]]] = [([], []) for _ in range(self.n)]
        while len(self.inputs):
            ((ref, _, _),) = self.inputs.take_block()
            size = -(-ref.rows // self.n)  # ceil: Ray's slice size
            for i in range(self.n):
                start, stop = i * size, min((i + 1) * size, ref.rows)
                if start >= stop:
                    break
                piece = self.ex.client.submit(
                    worker_fns.slice_block,
                    ref.future,
                    start,
                    stop,
                    key=f"daskinfer-{self.slug}-slice-{self.ex.run_id}-{uuid.uuid4().hex[:12]}",
                    priority=task_priority(self.index, i),
                    pure=False,
                )
                ref.uses += 1
                outputs[i][0].append((ref, start, stop))
                outputs[i][1].append(piece)
        return collections.deque(out for out in outputs if out[0])

    def _dispatch_exchange(self) -> bool:
        if self._exchange is None:
            self._exchange = self._cut_for_exchange()
        if not self._exchange:
            return False
        bundle, pieces = self._exchange.popleft()
        seq = self.next_seq
        self.next_seq += 1
        self.ex.submit_task(
            self,
            seq,
            worker_fns.run_chain,
            # each piece is the whole of its slice
            (self.ex.run_id, (), [(0, stop - start) for _, start, stop in bundle], *pieces),
            inputs=[ref for ref, _, _ in bundle],
            rows_in=sum(stop - start for _, start, stop in bundle),
            workers=self.ex.cpu_workers,
            resources=None,
            bundle=bundle,
        )
        return True

    def dispatch(self) -> bool:
        if self.shuffle:
            return self._dispatch_exchange()
        if self._sizes is None:
            total = self.inputs.rows
            base, extra = divmod(total, self.n)
            self._sizes = [base + (1 if i < extra else 0) for i in range(self.n)]
            self._sizes = [s for s in self._sizes if s > 0][::-1]
        if not self._sizes:
            return False
        bundle = self.inputs.take(self._sizes.pop())
        self.submit_bundle(
            worker_fns.run_chain,
            bundle,
            self.ex.run_id,
            (),
            workers=self.ex.cpu_workers,
            resources=None,
        )
        return True


# see ActorPoolOperator._grow_bundles_if_overhead_bound
_BUNDLE_WINDOW_S = 0.25
_BUSY_ENOUGH = 0.9
_MAX_BUNDLE_GROWTH = 4


def _growth_for(busy: float) -> float:
    """How much to grow an actor's calls, whose busy fraction was ``busy``, so that it
    reaches ``_BUSY_ENOUGH``: at least double.

    With a fixed cost ``o`` per call beside ``w`` of work, busy = w / (w + o), so
    o = w (1 - busy) / busy, and w' / (w' + o) >= B needs w' >= w B (1 - busy) /
    ((1 - B) busy): 9x at busy 0.5, 2.25x at 0.8 (B = 0.9).
    """
    if busy <= 0:
        return float("inf")
    need = _BUSY_ENOUGH * (1 - busy) / ((1 - _BUSY_ENOUGH) * busy)
    return max(2.0, need)


class ActorPoolOperator(Operator):
    """A pool of predictor actors fed by tasks pinned to each actor's worker."""

    def __init__(self, ex: StreamingExecutor, index: int, spec: ActorStageSpec) -> None:
        super().__init__(ex, index, spec.name)
        self.stage = spec.stage
        self.resources = ex.effective_resources(self.stage.resources)
        self.depth = (
            self.stage.max_tasks_in_flight_per_actor or ex.ctx.max_tasks_in_flight_per_actor
        )
        self.actors: list[ActorSlot] = []
        self._last_scale = 0.0
        self.retries: collections.deque[TaskRecord] = collections.deque()
        self._short_since: float | None = None
        self.pool_id = f"{ex.run_id}-{index}"
        self.assembles_on_cpu = self._assembles_on_cpu()
        # names of lost actors, handed to the next replacement: results Dask must
        # recompute for them then run on the replacement's worker
        self._orphaned_names: list[str] = []
        self.released = False  # the stage finished and gave its actors back
        # the window the actors' time in calls (stats.compute_s) is judged over
        self._window: tuple[float, float, int] | None = None  # start, compute_s, tasks
        # after a growth, the calls already sent (of the old size) must finish before
        # the pool is judged again
        self._judge_after_calls = 0
        # rows the call being dispatched may take (see _call_cap); None for no limit
        self._call_cap_rows: int | None = None

    def max_in_flight(self) -> int:
        return max(1, len(self.actors)) * self.depth

    def slots(self) -> int:
        return max(1, len(self.actors))

    def batch_rows(self) -> int | None:
        return self.stage.batch_size

    def has_room(self) -> bool:
        return self._free_actor() is not None

    def has_idle_slot(self) -> bool:
        return any(slot.in_flight == 0 for slot in self.actors)

    def queued_batches(self) -> int:
        return super().queued_batches() + len(self.retries)

    def target_rows(self) -> int | None:
        size = self.stage.batch_size
        if size is None:
            return None
        target = self.sized_target(size)
        return target if self._call_cap_rows is None else min(target, self._call_cap_rows)

    def work_per_bundle_s(self) -> float:
        """A call's work: ``target_task_s`` (or what the pool grew it to), and at least
        actors / ``DataContext.max_pool_calls_per_s``, so that the pool's calls per
        second, each a few Dask messages through the client's and the scheduler's one
        thread, stay bounded however many actors it has."""
        return max(self.task_s, self._pool_floor_s())

    def _pool_floor_s(self) -> float:
        rate = self.ex.max_pool_calls_per_s
        return len(self.actors) / rate if rate else 0.0

    def _size_lengthens_calls(self) -> bool:
        """Whether the pool's size, not ``target_task_s`` or its growth, sets how long
        its calls are (see ``work_per_bundle_s``)."""
        return self._pool_floor_s() > self.task_s

    def _calls_left_each(self) -> int:
        """How many calls each actor should still take: the guided cap divides the rows
        not yet in a call by actors x this.

        ``depth``, so that calls shrink as the input runs out and the last ones are
        small; but one where the pool's size lengthens its calls and the whole job gives
        each actor less than one call of the floor's length. No schedule of such a job
        keeps to the calls per second that the floor bounds, and the fewest calls that
        keep every actor busy then cost least. Measured on W6 with 32 actors (0.6 s of
        work each against a floor of 1.6 s): at ``depth`` 4, calls of 1-5 batches,
        about 250 in all, and each actor waited 0.1-0.25 s for every one of them on a
        client and scheduler that they kept saturated. Not for longer jobs: with 8
        actors (2.5 s each, a floor of 0.4 s), calls no smaller than the floor near the
        end made W6 slower (2.80-2.97 s against 2.78-2.82 s, 3 alternating pairs).
        """
        if self.seconds_per_row is None or not self._size_lengthens_calls():
            return self.depth
        total = self._rows_in_all()
        if total is None:
            return self.depth
        share_s = total * self.seconds_per_row / max(1, len(self.actors))
        return 1 if share_s < self._pool_floor_s() else self.depth

    def _rows_in_all(self) -> int | None:
        """Rows this stage gets in all, or None while that total is unknown."""
        if self.inputs_done:
            return self.stats.rows_in
        expected = self.ex.ops[self.index - 1].rows_expected() if self.index else None
        return None if expected is None else max(expected, self.stats.rows_in)

    def _rows_not_in_a_call(self) -> int | None:
        """Rows this stage has yet to put in a call (queued, and still to come from
        upstream), or None while that total is unknown."""
        total = self._rows_in_all()
        return None if total is None else self.inputs.rows + total - self.stats.rows_in

    def _call_cap(self, actor: ActorSlot) -> int | None:
        """The most rows the next call to ``actor`` may take, in whole batches, at least
        one, or None for no limit.

        With several actors, a call takes at most the rows not yet in any call over
        actors x the calls each should still take (guided self-scheduling; see
        ``_calls_left_each``) once all input has arrived, and from
        the start where the stage knows how many rows it will get (a source of known
        size) and the pool's size lengthens its calls. Once all input has arrived, a
        call also takes at most what tops ``actor`` up to an even share of the work
        left (queued and in its calls).

        Full-size bundles at the end give the first actors to ask all that is left and
        the rest nothing, and the job ends when the most loaded one does: measured on
        W6 (8 actors, calls of 0.2-0.4 s), the actors' last calls ended 0.1-0.4 s apart.
        Topping up alone still let each actor hold up to ``depth`` full bundles when the
        input ran out, and they ended a median 0.19-0.26 s apart (two rounds of 21
        runs); with calls that shrink as the queue does (guided self-scheduling),
        0.07-0.08 s. The shrinking calls cost calls: W6's wall did not change beyond
        noise.
        """
        size = self.stage.batch_size
        if size is None or self.retries or not self.actors:
            return None
        caps = []
        # guided: calls shrink as the input runs out, and the last ones, a batch each,
        # go to whichever actor frees up first. Where the pool's size lengthens its
        # calls (work_per_bundle_s), a known total caps them from the start: W6's 8
        # actors with calls of 0.8 s each held up to depth x 0.8 s when the input ran
        # out, and their last calls ended up to 1.1 s apart. Not for calls of
        # target_task_s: W1's pool of 2 (cheap rows, calls capped by bytes) ran 20%
        # slower with its calls halved from the start
        lengthened = self._size_lengthens_calls()
        not_in_a_call = self._rows_not_in_a_call() if self.inputs_done or lengthened else None
        if len(self.actors) > 1 and not_in_a_call is not None:
            calls = len(self.actors) * self._calls_left_each()
            caps.append(-(-not_in_a_call // calls))
        if self.inputs_done:
            left, mine = self.inputs.rows, 0
            for task in self.in_flight.values():
                left += task.rows_in
                if task.actor is actor:
                    mine += task.rows_in
            caps.append(-(-left // len(self.actors)) - mine)
        if not caps:
            return None
        return max(1, -(-min(caps) // size)) * size

    def start(self) -> None:
        for _ in range(max(self.stage.pool_initial, self.stage.pool_min)):
            self._add_actor()

    def _add_actor(self) -> bool:
        worker = self.ex.ledger.reserve(self.resources, cpu_only=not self._needs_special())
        if worker is None:
            return False
        key = f"daskinfer-{self.slug}-actor-{uuid.uuid4().hex}"
        names = (worker_fns.actor_resource(key), *self._orphaned_names)
        inherited = bool(self._orphaned_names)
        self._orphaned_names = []
        future = self.ex.client.submit(
            worker_fns.PredictorHost,
            self.stage.actor_class,
            self.stage.ctor_args,
            self.stage.ctor_kwargs,
            self.name,
            self.pool_id,
            names,
            self._needs_special(),  # overlap_calls: the actor holds an accelerator
            self.ex.actor_mmap_threshold,
            self.ex.actor_keeps_freed_memory,
            actor=True,
            workers=[worker],
            allow_other_workers=False,
            key=key,
            pure=False,
        )
        # wake the executor's loop when the model is loaded (or failed to load)
        future.add_done_callback(lambda f, q=self.ex.events: q.put(("wake",)))
        self.actors.append(ActorSlot(future, worker, dict(self.resources), names, inherited))
        self.stats.actors_started += 1
        self.stats.max_actors = max(self.stats.max_actors, len(self.actors))
        self.stats.actor_events.append((time.monotonic() - self.ex.started, len(self.actors)))
        logger.debug("%s: actor %s on %s", self.name, key, worker)
        return True

    def _needs_special(self) -> bool:
        return any(k != cluster.CPU for k in self.resources)

    def _remove_actor(self, slot: ActorSlot) -> None:
        self.actors.remove(slot)
        self.ex.ledger.free(slot.worker, slot.resources)
        slot.future.release()
        self.stats.actors_released += 1
        self.stats.actor_events.append((time.monotonic() - self.ex.started, len(self.actors)))

    def can_dispatch(self) -> bool:
        if self._free_actor() is None:
            return False
        return bool(self.retries) or self.ex.downstream_has_room(self)

    def next_bundle_ready(self) -> bool:
        return bool(self.retries) or super().next_bundle_ready() or self._short_bundle_ready()

    def _short_bundle_ready(self) -> bool:
        size = self.stage.batch_size
        return size is not None and self.inputs.rows >= size and self._actor_runs_short()

    def _actor_runs_short(self) -> bool:
        """Whether a loaded actor with room has less than one full bundle queued.

        Such an actor may run dry before a full bundle could form and reach it: the next
        bundle takes a round trip through the client and, for accelerator actors, an
        assembly task on a CPU worker that may be busy.
        """
        target = self.target_rows() or 0
        # one pass over the calls in flight (this runs on every scheduling step)
        queued: dict[ActorSlot, int] = {}
        for task in self.in_flight.values():
            if task.actor is not None:
                queued[task.actor] = queued.get(task.actor, 0) + task.rows_in
        return any(
            slot.future.status == "finished"
            and slot.in_flight < self._depth_now()
            and queued.get(slot, 0) < target
            for slot in self.actors
        )

    def next_bundle(self) -> list[Slice] | None:
        """A full-size bundle, or, for an actor about to run dry, the whole batches queued.

        As for task stages: waiting for a full bundle amortises the per-call overhead
        while every actor has work queued, but an actor with less than a bundle's work
        left should get what there is. Waiting until it is idle (as before) cost W2 a
        gap of about 110 ms at the first bundle that grew past one batch.
        """
        bundle = super().next_bundle()
        if bundle is None and self._short_bundle_ready():
            size = self.stage.batch_size
            assert size is not None
            # a fair share of what is there: the pool's other actors (those still
            # loading too) want theirs, and one actor taking it all would leave them idle
            share = -(-(self.inputs.rows // size) // max(1, len(self.actors)))
            return self.inputs.take(share * size)
        return bundle

    def _loading(self) -> bool:
        """Whether an actor of the pool is still loading its model."""
        return any(a.future.status == "pending" for a in self.actors)

    def _free_actor(self) -> ActorSlot | None:
        # only an actor whose model is loaded: its worker offers the actor's resource
        # from then on, and a call submitted before would wait in Dask's no-worker
        # state, which a worker's new resource does not end
        ready = (a for a in self.actors if a.future.status == "finished")
        best = min(ready, key=lambda a: a.in_flight, default=None)
        if best is None or best.in_flight >= self._depth_now():
            return None
        return best

    def _depth_now(self) -> int:
        """Calls an actor may have in flight: two until a call has been measured.

        Until then a bundle is one batch (``sized_target``), and a full queue of them
        per actor is the costliest way to start: W6's 8 actors at depth 4 began with 32
        one-batch calls, each costing the client, scheduler and worker their messages,
        on a machine already saturated by them. Two keep an actor from idling between
        its first calls.
        """
        return self.depth if self.seconds_per_row is not None else min(self.depth, 2)

    def dispatch(self) -> bool:
        actor = self._free_actor()
        if actor is None:
            return False
        retry_of = self.retries.popleft() if self.retries else None
        if retry_of is not None and retry_of.charged and retry_of.attempts >= self.ex.max_retries:
            raise ActorLostError(
                f"{self.name}: a batch lost its predictor actor {retry_of.attempts + 1} "
                f"times (max_retries={self.ex.max_retries}); workers keep dying, giving up"
            )
        bundle: list[Slice] | None
        if retry_of is not None:
            bundle = retry_of.bundle
        else:
            self._call_cap_rows = self._call_cap(actor)
            try:
                bundle = self.next_bundle()
            finally:
                self._call_cap_rows = None
        if not bundle:
            return False
        actor.in_flight += 1
        # rows of fixed-width columns need no assembly task: the call cuts and joins
        # them itself, one copy per column, and saves a round trip and a wait behind
        # whatever the CPU workers run (W2 on two cores: 20-35 ms before each of its
        # first calls, and 50-120 ms gaps once calls grew to several blocks)
        flat_blocks = all(ref.flat for ref, _, _ in bundle)
        self.submit_bundle(
            worker_fns.run_actor_call,
            bundle,
            self.ex.run_id,
            actor.key,
            self.pool_id,
            self.assembles_on_cpu and flat_blocks,  # the call assembles its rows
            self.transforms_arg,
            workers=None,
            # routes the call to the actor's worker (and, if that worker dies before
            # the result is used, the recomputation to the actor that replaces it)
            resources={worker_fns.actor_resource(actor.key): 1},
            actor=actor,
            retry_of=retry_of,
            assemble=self.assembles_on_cpu and not flat_blocks,
        )
        return True

    def _assembles_on_cpu(self) -> bool:
        """Whether calls get their rows assembled by a CPU task (see AssembledBatch).

        For actors holding an accelerator, whose worker should run nothing but the
        predictor: torch gives up the GIL at every operation, and any Python that runs
        beside it in the process (unpickling per-row arrays, concatenating, stacking)
        holds up the next kernel launch. Only for the numpy batch format, which is what
        the assembly produces.
        """
        transform = self.stage.transform
        return (
            self._needs_special()
            and isinstance(transform, MapBatchesTransform)
            and transform.batch_format == "numpy"
        )

    def on_task_error(self, task: TaskRecord) -> bool:
        """Supervise the pool: a call that failed because its actor is gone is retried.

        Dask actors have no resilience: when a worker dies its actors are marked erred
        and every call queued on them fails. The lost actor is dropped (a replacement is
        started by ``tick`` on a worker with room) and the batch goes back to the queue,
        keeping its place in the output order. A user exception is not retried.
        """
        slot = task.actor
        if slot is None or not self._actor_is_lost(slot, task):
            return False
        if slot in self.actors and self._actor_is_healthy(slot):
            # the call ran where its actor was not (a stale resource on a restarted
            # worker): the actor itself is fine, only the batch goes round again
            if task.attempts >= self.ex.max_retries:
                self.ex.error = ActorLostError(
                    f"{self.name}: a batch found no predictor on its worker "
                    f"{task.attempts + 1} times; giving up"
                )
                return True
            self.stats.retries += 1
            self.retries.append(task)
            return True
        if task.attempts >= self.ex.max_retries:
            self.ex.error = ActorLostError(
                f"{self.name}: a batch was retried {task.attempts} times after losing "
                f"its predictor actor each time (last on worker {slot.worker}); giving up"
            )
            return True
        self._lose_actor(slot, charge_first=False)  # this failed call is the culprit
        self.stats.retries += 1
        self.retries.append(task)
        return True

    def retry(self, task: TaskRecord) -> None:
        self.stats.retries += 1
        self.retries.append(task)

    def _nudge_scheduler(self, worker: str) -> None:
        try:
            released = self.ex.client.run_on_scheduler(
                worker_fns.schedule_unrunnable, worker=worker
            )
        except Exception as exc:  # noqa: BLE001  # the run may be ending; the next replacement nudges again
            logger.debug("could not reschedule waiting recomputations: %s", exc)
            return
        if released:
            logger.info(
                "%s: %d lost results are being recomputed on %s", self.name, released, worker
            )

    def _actor_is_healthy(self, slot: ActorSlot) -> bool:
        return (
            slot.worker in cluster.worker_inventory(self.ex.client)
            and slot.future.status == "finished"
        )

    def _lose_actor(self, slot: ActorSlot, *, charge_first: bool = True) -> None:
        """Drop a lost actor; its queued calls go back to the queue, in order.

        Only the first of them (the one that was running, calls being served in order)
        counts as a failed attempt, and not even that one when the caller already
        charged the culprit (``charge_first=False``).
        """
        if slot not in self.actors:
            return
        self.actors.remove(slot)
        self._orphaned_names.extend(slot.names)
        self.ex.ledger.free(slot.worker, slot.resources)
        self.stats.actors_lost += 1
        self.stats.actor_events.append((time.monotonic() - self.ex.started, len(self.actors)))
        logger.warning(
            "%s: lost the actor on %s; replacing it and resubmitting its batches",
            self.name,
            slot.worker,
        )
        # calls still waiting on the dead actor may never finish (a task pinned to a
        # worker that is gone stays unrunnable): cancel them and queue their batches
        charge = charge_first
        for task in sorted(self.in_flight.values(), key=lambda t: t.seq):
            if task.actor is slot:
                self.in_flight.pop(task.key)
                self.ex.tasks.pop(task.key, None)
                task.future.cancel()
                task.charged, charge = charge, False
                self.stats.retries += 1
                self.retries.append(task)
        slot.in_flight = 0
        slot.future.release()
        self.ex.refresh_inventory_soon()

    def _actor_is_lost(self, slot: ActorSlot, task: TaskRecord) -> bool:
        exc = task.future.exception()
        if isinstance(exc, ActorLostError):
            return True
        if isinstance(exc, UserCodeError):
            return False  # the user's code raised: a real error, even if the worker died later
        if slot.future.status == "error":
            return not isinstance(slot.future.exception(), UserCodeError)
        return slot.worker not in cluster.worker_inventory(self.ex.client)

    def on_output(self, task: TaskRecord, ref: BlockRef) -> None:
        if task.actor is not None:
            task.actor.in_flight -= 1
            if task.actor.in_flight == 0:
                task.actor.idle_since = time.monotonic()
        super().on_output(task, ref)

    def tick(self, now: float) -> None:
        if self.released:
            return
        lo, hi = self.stage.pool_min, self.stage.pool_max
        self._supervise(now, lo)
        if self.finished:
            return
        self._grow_bundles_if_overhead_bound(now)
        waiting = self.inputs.rows >= (self.target_rows() or 1) or (
            self.inputs_done and self.inputs.rows
        )
        if (
            waiting
            and (hi is None or len(self.actors) < hi)
            and self._free_actor() is None
            and not self._loading()  # one loading
            and now - self._last_scale > 0.1
            and self._add_actor()
        ):
            self._last_scale = now
        if len(self.actors) > lo:
            for slot in list(self.actors):
                if (
                    len(self.actors) > lo
                    and slot.in_flight == 0
                    and now - slot.idle_since > self.ex.ctx.actor_idle_timeout_s
                ):
                    self._remove_actor(slot)
                    # its results stay on its worker; if that worker dies, Dask recomputes
                    # them wherever the names are offered: on a live actor of the pool
                    self._orphaned_names.extend(slot.names)
                    self._move_names(slot.names, old_worker=slot.worker)

    def _grow_bundles_if_overhead_bound(self, now: float) -> None:
        """Grow the work per call while fed actors spend too little of their time in it.

        Every call costs the client, the scheduler and the worker a few Dask messages,
        whatever its size. When they cannot keep up (many short calls, few cores), the
        calls queued for an actor wait in that machinery, and the actor idles between
        them although it has work. Measured: W6's 8 actors of 50 ms batches on 2 cores,
        100 ms of work per call, took 3.9 s where their pace allows 2.6; at 200 ms a call,
        2.9 s. Judged over windows of ``_BUNDLE_WINDOW_S`` in which every actor was loaded
        and had calls queued (an actor short of input is starved, not slowed), and up to
        ``_MAX_BUNDLE_GROWTH`` times what a call starts with (``target_task_s``, or the
        pool's floor, see ``work_per_bundle_s``): bigger bundles cost
        memory and make the stage's last calls end further apart. One window's busy
        fraction sets the growth (see ``_growth_for``): each window costs a fraction of
        a second of a job that may last a few seconds.
        """
        limit = max(self.ex.target_task_s, self._pool_floor_s()) * _MAX_BUNDLE_GROWTH
        ready = [a for a in self.actors if a.future.status == "finished"]
        fed = (
            self.seconds_per_row is not None
            and ready
            and len(ready) == len(self.actors)
            and all(a.in_flight > 0 for a in ready)
            and (
                self.inputs.rows >= (self.target_rows() or 1)
                or all(a.in_flight >= self.depth for a in ready)
            )
        )
        stats = self.stats
        call_s = self.work_per_bundle_s()
        if not fed or call_s >= limit or stats.tasks_measured < self._judge_after_calls:
            self._window = None
            return
        if self._window is None:
            self._window = (now, stats.compute_s, stats.tasks_measured)
            return
        start, busy_at_start, calls_at_start = self._window
        calls = stats.tasks_measured - calls_at_start
        if now - start < _BUNDLE_WINDOW_S or calls < 2 * len(ready):
            return
        busy = (stats.compute_s - busy_at_start) / (len(ready) * (now - start))
        self._window = None
        if busy < _BUSY_ENOUGH:
            self.task_s = min(call_s * _growth_for(busy), limit)
            self._judge_after_calls = stats.tasks_measured + sum(a.in_flight for a in ready)
            stats.bundle_growths += 1
            logger.info(
                "%s: actors busy %.0f%% of the time although fed; bundles now aim for "
                "%.2f s of work per call",
                self.name,
                100 * busy,
                self.task_s,
            )

    def _supervise(self, now: float, lo: int) -> None:
        """Replace lost actors and re-home their names (also once the stage finished:
        a result of this stage that a dead worker held is recomputed on an actor until
        the run ends)."""
        for slot in list(self.actors):
            if slot.worker not in self.ex.inventory:
                self._lose_actor(slot)
            elif slot.future.status == "error":
                exc = slot.future.exception()
                if isinstance(exc, UserCodeError):
                    raise exc  # the predictor's constructor failed: no retry helps
                self._lose_actor(slot)  # its worker died while the model loaded
            elif slot.inherited and slot.future.status == "finished":
                # the replacement is up and offers the lost actor's names: let the
                # scheduler place the recomputations that waited for them
                slot.inherited = False
                threading.Thread(
                    target=self._nudge_scheduler, args=(slot.worker,), daemon=True
                ).start()
        if len(self.actors) < lo:
            self._replace_lost_actors(now, lo)
        if self._orphaned_names and not self._loading():
            # lost actors' names and no replacement on the way to take them (the pool
            # is still at its minimum, or the stage finished): a live actor adopts them
            ready = [a for a in self.actors if a.future.status == "finished"]
            if ready:
                adopter = min(ready, key=lambda a: a.in_flight)
                adopter.names = (*adopter.names, *self._orphaned_names)
                self._move_names(tuple(self._orphaned_names), new_worker=adopter.worker)
                self._orphaned_names = []
            elif not self.actors:
                self._add_actor()

    def _move_names(
        self,
        names: tuple[str, ...],
        *,
        old_worker: str | None = None,
        new_worker: str | None = None,
    ) -> None:
        def move() -> None:
            try:
                if old_worker is not None:
                    self.ex.client.run(
                        worker_fns.set_actor_names,
                        names,
                        0,
                        workers=[old_worker],
                        on_error="ignore",
                    )
                if new_worker is not None:
                    self.ex.client.run(
                        worker_fns.set_actor_names,
                        names,
                        worker_fns.ACTOR_CAPACITY,
                        workers=[new_worker],
                        on_error="ignore",
                    )
                    self._nudge_scheduler(new_worker)
            except Exception as exc:  # noqa: BLE001  # the run or the client ended meanwhile
                logger.debug("could not move actor names: %s", exc)

        threading.Thread(target=move, daemon=True, name="daskinfer-actor-names").start()

    def _replace_lost_actors(self, now: float, lo: int) -> None:
        while len(self.actors) < lo and self._add_actor():
            pass
        if len(self.actors) >= lo:
            self._short_since = None
            return
        if self.actors:
            return  # the pool runs on fewer actors until a worker has room again
        self._short_since = self._short_since or now
        waited = now - self._short_since
        if waited > self.ex.actor_wait_timeout_s:
            raise PlacementError(
                f"{self.name} lost its actors and no worker has had room for a new one "
                f"for {waited:.0f} s: {self.ex._missing_message(self.name, self.resources, lo, 0)}"
            )

    def maybe_finish(self) -> bool:
        return not self.retries and super().maybe_finish()

    def cancel(self) -> None:
        for task in self.retries:
            for ref, _, _ in task.bundle:
                ref.uses -= 1
                self.ex.maybe_release(ref)
        self.retries.clear()
        super().cancel()

    def on_finish(self) -> None:
        # the last pool's actors stay until the run ends (``StreamingExecutor.close``):
        # while later stages and the consumer still read its results, a worker that
        # dies with some of them makes Dask recompute them, which needs a predictor.
        # A pool followed by another pool frees its workers for that one.
        if any(isinstance(op, ActorPoolOperator) for op in self.ex.ops[self.index + 1 :]):
            self.released = True
            for slot in list(self.actors):
                self._remove_actor(slot)


class Ledger:
    """Which worker holds which actor's resources, so pools never double-book a GPU."""

    def __init__(self, ex: StreamingExecutor) -> None:
        self.ex = ex
        self.used: dict[str, dict[str, float]] = {}
        self.actor_count: dict[str, int] = {}
        # CPU actors per worker: each runs its calls on one of the worker's threads
        # (see ``PredictorHost.call``), which the stages' tasks then cannot use
        self.threads_held: dict[str, int] = {}

    def capacity(self, worker: str, needed: Mapping[str, float], cpu_only: bool) -> int:
        info = self.ex.inventory.get(worker)
        if info is None or worker in self.ex.restarting:
            return 0
        if cpu_only and self.ex.cpu_workers is not None and worker not in self.ex.cpu_workers:
            return 0
        offered = info["resources"]
        used = self.used.get(worker, {})
        slots = info["nthreads"] - self.actor_count.get(worker, 0) if not needed else 1 << 30
        for k, v in needed.items():
            if v > 0:
                slots = min(slots, int((offered.get(k, 0) - used.get(k, 0)) // v + 1e-9))
        return max(0, slots)

    def reserve(self, needed: Mapping[str, float], cpu_only: bool) -> str | None:
        candidates = [w for w in self.ex.inventory if self.capacity(w, needed, cpu_only) > 0]
        if not candidates:
            return None
        worker = min(candidates, key=lambda w: (self.actor_count.get(w, 0), w))
        used = self.used.setdefault(worker, {})
        for k, v in needed.items():
            used[k] = used.get(k, 0) + v
        self.actor_count[worker] = self.actor_count.get(worker, 0) + 1
        if _holds_a_thread(needed):
            self.threads_held[worker] = self.threads_held.get(worker, 0) + 1
        return worker

    def free(self, worker: str, needed: Mapping[str, float]) -> None:
        used = self.used.get(worker, {})
        for k, v in needed.items():
            used[k] = used.get(k, 0) - v
        self.actor_count[worker] = self.actor_count.get(worker, 1) - 1
        if _holds_a_thread(needed):
            self.threads_held[worker] = self.threads_held.get(worker, 1) - 1


def _holds_a_thread(needed: Mapping[str, float]) -> bool:
    """Whether an actor asking for ``needed`` runs its calls on a worker thread.

    An actor that holds an accelerator (any resource but CPU) does not: its calls
    leave the worker's thread pool (see ``PredictorHost.call``).
    """
    return all(k == cluster.CPU for k in needed)
