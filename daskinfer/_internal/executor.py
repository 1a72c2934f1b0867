"""The streaming executor: one client-side loop over futures.

The loop runs in a background thread. Each step it handles finished tasks and block
metadata (rows, bytes, reported by workers as Dask events), then gives every operator,
downstream first, the chance to submit work. Limits keep memory bounded:

- per operator, a cap on tasks in flight (actors x queue depth for a pool);
- per operator, its input buffer holds at most a few bundles' worth of rows, so a fast
  stage cannot run far ahead of a slow one;
- globally, reads are admitted only while the bytes of produced-but-unconsumed blocks
  stay under ``DataContext.max_inflight_bytes``.

Batch data moves worker to worker as Dask task dependencies; the client only holds
futures and the row counts it needs to cut exact batches.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import queue
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import dask
from distributed import Client, Future

from daskinfer import cluster
from daskinfer._internal import worker_fns
from daskinfer._internal.bundler import BlockRef, Bundler, Slice
from daskinfer._internal.plan import BlocksSource, DaskSource, LogicalPlan
from daskinfer._internal.planner import (
    ActorStageSpec,
    LimitSpec,
    PhysicalOp,
    RepartitionSpec,
    SourceSpec,
    TaskStageSpec,
    plan,
)
from daskinfer.context import DataContext
from daskinfer.exceptions import ActorLostError, DaskInferError, PlacementError, UserCodeError
from daskinfer.metrics import OperatorStats, RunStats

logger = logging.getLogger("daskinfer")

META_TOPIC = worker_fns.META_TOPIC
_META_PRIORITY = 1_000_000  # a metadata fallback task jumps the worker's queue
_routes_lock = threading.Lock()
_routes: weakref.WeakKeyDictionary[Client, dict[str, queue.Queue[Any]]] = weakref.WeakKeyDictionary()


def _route_meta(client: Client, run_id: str, events: queue.Queue[Any]) -> None:
    """Send this run's block-metadata events to ``events`` (one handler per client)."""
    with _routes_lock:
        routes = _routes.get(client)
        if routes is None:
            routes = _routes[client] = {}

            def handler(event: tuple[float, Mapping[str, Any]]) -> None:
                msg = event[1]
                target = routes.get(str(msg.get("run", "")))
                if target is not None:
                    target.put(("meta", msg))

            client.subscribe_topic(META_TOPIC, handler)
        routes[run_id] = events


def _unroute_meta(client: Client, run_id: str) -> None:
    with _routes_lock:
        routes = _routes.get(client)
        if routes is not None:
            routes.pop(run_id, None)


def _stage_slug(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()[:60] or "stage"


@dataclasses.dataclass(eq=False)
class _Task:
    key: str
    future: Future
    op: _Operator
    seq: int
    inputs: list[BlockRef]
    submitted: float
    rows_in: int
    actor: _ActorSlot | None = None
    meta_future: Future | None = None
    bundle: list[Slice] = dataclasses.field(default_factory=list)
    attempts: int = 0


@dataclasses.dataclass(eq=False)
class _ActorSlot:
    future: Future
    worker: str
    resources: dict[str, float]
    in_flight: int = 0
    idle_since: float = dataclasses.field(default_factory=time.monotonic)


class _Operator:
    """Client-side state of one physical operator. Never pickled."""

    barrier = False
    transforms_future: Any = None

    def __init__(self, ex: StreamingExecutor, index: int, name: str) -> None:
        self.ex = ex
        self.index = index
        self.name = name
        self.slug = _stage_slug(name)
        self.inputs = Bundler()
        self.inputs_done = False
        self.in_flight: dict[str, _Task] = {}
        self.next_seq = 0
        self.next_emit = 0
        self.reorder: dict[int, BlockRef | None] = {}
        self.finished = False
        self.stats = OperatorStats(name=name)
        self.seconds_per_row: float | None = None  # measured on the workers

    def observe(self, rows: int, seconds: float) -> None:
        """Fold one task's measured compute time into the per-row cost estimate."""
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
        by_time = self.ex.target_task_s / self.seconds_per_row
        by_bytes = self.ex.target_task_bytes / per_row_bytes
        return batch_size * max(1, int(min(by_time, by_bytes) // batch_size))

    def __reduce__(self) -> Any:
        raise TypeError(f"{type(self).__name__} lives on the client and must not be pickled")

    # --- capacity ---------------------------------------------------------------
    def max_in_flight(self) -> int:
        return max(2, 2 * self.ex.cpu_threads)

    def target_rows(self) -> int | None:
        """Rows per bundle, or None for whole blocks."""
        return None

    def wants_more_input(self) -> bool:
        """Whether the upstream operator may add more blocks to this one's input."""
        target = self.target_rows()
        if target is None:
            return len(self.inputs) < 2 * self.max_in_flight()
        return self.inputs.rows < target * max(2, self.max_in_flight())

    # --- work -------------------------------------------------------------------
    def add_input(self, ref: BlockRef) -> None:
        self.stats.blocks_in += 1
        self.stats.rows_in += ref.rows
        self.inputs.add(ref)

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

    def on_output(self, task: _Task, ref: BlockRef) -> None:
        """A task finished: release its inputs and emit its output in order."""
        self.stats.record_task(task.rows_in, ref.rows, ref.nbytes, time.monotonic() - task.submitted)
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
        for ref in self.reorder.values():
            if ref is not None:
                self.ex.release(ref)
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
        actor: _ActorSlot | None = None,
        retry_of: _Task | None = None,
    ) -> None:
        slices = [(start, stop) for _, start, stop in bundle]
        futures = [ref.future for ref, _, _ in bundle]
        if retry_of is None:
            for ref, _, _ in bundle:
                ref.uses += 1
            seq = self.next_seq
            self.next_seq += 1
        else:
            seq = retry_of.seq  # the retry keeps its place in the output order
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
            attempts=retry_of.attempts + 1 if retry_of is not None else 0,
        )

    def on_task_error(self, task: _Task) -> bool:
        """A task failed; return True if the operator recovered (e.g. resubmitted it)."""
        return False


class _SourceOperator(_Operator):
    def __init__(self, ex: StreamingExecutor, index: int, spec: SourceSpec) -> None:
        super().__init__(ex, index, spec.name)
        self.spec = spec
        self.inputs_done = True
        self._blocks: Iterator[Any]
        self._graph: dict[Any, Any] = {}
        self._deps: dict[Any, set[Any]] = {}
        self.transforms_future: Any = None
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

    def _subgraph(self, key: Any) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        stack = [key]
        while stack:
            k = stack.pop()
            if k in out:
                continue
            out[k] = self._graph[k]
            stack.extend(self._deps.get(k, ()))
        return out

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
            self.stats.record_task(rows, rows, nbytes, 0.0)
            self._emit(seq, ref)
            return True
        if isinstance(self.spec.source, BlocksSource):
            future, rows, nbytes = item
            ref = self.ex.new_ref(future, rows, nbytes)
            ref.exhausted = True
            ref.uses += 1
            self.ex.submit_task(
                self,
                seq,
                worker_fns.run_chain,
                (self.ex.run_id, self.transforms_future, [(0, rows)], future),
                inputs=[ref],
                rows_in=rows,
                workers=self.ex.cpu_workers,
                resources=None,
            )
            return True
        self.ex.submit_task(
            self,
            seq,
            worker_fns.run_source,
            (
                self.ex.run_id,
                worker_fns.SourcePartition(self._subgraph(item), item),
                self.transforms_future,
            ),
            inputs=[],
            rows_in=0,
            workers=self.ex.cpu_workers,
            resources=None,
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


class _TaskOperator(_Operator):
    def __init__(self, ex: StreamingExecutor, index: int, spec: TaskStageSpec) -> None:
        super().__init__(ex, index, spec.name)
        self.spec = spec
        self.resources = ex.effective_resources(spec.resources)
        self.transforms_future: Any = None
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
                    self.transforms_future,
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

    def max_in_flight(self) -> int:
        if self.spec.concurrency is not None:
            return self.spec.concurrency
        threads = self.ex.threads_of(self.ex.workers_for(self.resources))
        return max(2, 2 * threads)

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
            self.transforms_future,
            workers=self.ex.workers_for(self.resources),
            resources=self.resources or None,
        )
        return True


class _LimitOperator(_Operator):
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
            self.stats.record_task(ref.rows, ref.rows, ref.nbytes, 0.0)
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


class _RepartitionOperator(_Operator):
    barrier = True

    def __init__(self, ex: StreamingExecutor, index: int, spec: RepartitionSpec) -> None:
        super().__init__(ex, index, spec.name)
        self.n = spec.n
        self._sizes: list[int] | None = None

    def wants_more_input(self) -> bool:
        return True

    def can_dispatch(self) -> bool:
        return self.inputs_done and len(self.in_flight) < self.max_in_flight() and bool(len(self.inputs))

    def dispatch(self) -> bool:
        if self._sizes is None:
            total = self.inputs.rows
            base, extra = divmod(total, self.n)
            self._sizes = [base + (1 if i < extra else 0) for i in range(self.n)]
            self._sizes = [s for s in self._sizes if s > 0][::-1]
        if not self._sizes:
            return False
        bundle = self.inputs.take(self._sizes.pop())
        self.submit_bundle(
            worker_fns.run_chain, bundle, self.ex.run_id, (), workers=self.ex.cpu_workers, resources=None
        )
        return True


class _ActorPoolOperator(_Operator):
    """A pool of predictor actors fed by tasks pinned to each actor's worker."""

    def __init__(self, ex: StreamingExecutor, index: int, spec: ActorStageSpec) -> None:
        super().__init__(ex, index, spec.name)
        self.stage = spec.stage
        self.resources = ex.effective_resources(self.stage.resources)
        self.depth = self.stage.max_tasks_in_flight_per_actor or ex.ctx.max_tasks_in_flight_per_actor
        self.actors: list[_ActorSlot] = []
        self.transforms_future: Any = None
        self._last_scale = 0.0
        self.retries: collections.deque[_Task] = collections.deque()
        self._short_since: float | None = None

    def max_in_flight(self) -> int:
        return max(1, len(self.actors)) * self.depth

    def target_rows(self) -> int | None:
        size = self.stage.batch_size
        return None if size is None else self.sized_target(size)

    def start(self) -> None:
        for _ in range(self.stage.pool_min):
            self._add_actor()

    def _add_actor(self) -> bool:
        worker = self.ex.ledger.reserve(self.resources, cpu_only=not self._needs_special())
        if worker is None:
            return False
        key = f"daskinfer-{self.slug}-actor-{uuid.uuid4().hex}"
        future = self.ex.client.submit(
            worker_fns.PredictorHost,
            self.stage.actor_class,
            self.stage.ctor_args,
            self.stage.ctor_kwargs,
            self.name,
            actor=True,
            workers=[worker],
            allow_other_workers=False,
            key=key,
            pure=False,
        )
        self.actors.append(_ActorSlot(future, worker, dict(self.resources)))
        self.stats.actors_started += 1
        self.stats.max_actors = max(self.stats.max_actors, len(self.actors))
        self.stats.actor_events.append((time.monotonic() - self.ex.started, len(self.actors)))
        logger.debug("%s: actor %s on %s", self.name, key, worker)
        return True

    def _needs_special(self) -> bool:
        return any(k != cluster.CPU for k in self.resources)

    def _remove_actor(self, slot: _ActorSlot) -> None:
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
        return bool(self.retries) or super().next_bundle_ready()

    def _free_actor(self) -> _ActorSlot | None:
        best = min(self.actors, key=lambda a: a.in_flight, default=None)
        if best is None or best.in_flight >= self.depth:
            return None
        return best

    def dispatch(self) -> bool:
        actor = self._free_actor()
        if actor is None:
            return False
        retry_of = self.retries.popleft() if self.retries else None
        if retry_of is not None and retry_of.attempts >= self.ex.max_retries:
            raise ActorLostError(
                f"{self.name}: a batch lost its predictor actor {retry_of.attempts + 1} "
                f"times (max_retries={self.ex.max_retries}); workers keep dying, giving up"
            )
        bundle = retry_of.bundle if retry_of is not None else self.next_bundle()
        if not bundle:
            return False
        actor.in_flight += 1
        self.submit_bundle(
            worker_fns.run_actor_call,
            bundle,
            self.ex.run_id,
            actor.future,
            self.transforms_future,
            workers=[actor.worker],
            resources=self.resources or None,
            actor=actor,
            retry_of=retry_of,
        )
        return True

    def on_task_error(self, task: _Task) -> bool:
        """Supervise the pool: a call that failed because its actor is gone is retried.

        Dask actors have no resilience: when a worker dies its actors are marked erred
        and every call queued on them fails. The lost actor is dropped (a replacement is
        started by ``tick`` on a worker with room) and the batch goes back to the queue,
        keeping its place in the output order. A user exception is not retried.
        """
        slot = task.actor
        if slot is None or not self._actor_is_lost(slot, task):
            return False
        if task.attempts >= self.ex.max_retries:
            self.ex.error = ActorLostError(
                f"{self.name}: a batch was retried {task.attempts} times after losing "
                f"its predictor actor each time (last on worker {slot.worker}); giving up"
            )
            return True
        self._lose_actor(slot)
        self.stats.retries += 1
        self.retries.append(task)
        return True

    def _lose_actor(self, slot: _ActorSlot) -> None:
        """Drop a lost actor; its queued calls go back to the queue, in order."""
        if slot not in self.actors:
            return
        self.actors.remove(slot)
        self.ex.ledger.free(slot.worker, slot.resources)
        self.stats.actors_lost += 1
        self.stats.actor_events.append((time.monotonic() - self.ex.started, len(self.actors)))
        logger.warning(
            "%s: lost the actor on %s; replacing it and resubmitting its batches", self.name, slot.worker
        )
        # calls still waiting on the dead actor may never finish (a task pinned to a
        # worker that is gone stays unrunnable): cancel them and queue their batches
        for task in sorted(self.in_flight.values(), key=lambda t: t.seq):
            if task.actor is slot:
                self.in_flight.pop(task.key)
                self.ex.tasks.pop(task.key, None)
                task.future.cancel()
                self.stats.retries += 1
                self.retries.append(task)
        slot.in_flight = 0
        slot.future.release()
        self.ex.refresh_inventory_soon()

    def _actor_is_lost(self, slot: _ActorSlot, task: _Task) -> bool:
        exc = task.future.exception()
        if isinstance(exc, ActorLostError):
            return True
        if isinstance(exc, UserCodeError):
            return False  # the user's code raised: a real error, even if the worker died later
        if slot.future.status == "error":
            return not isinstance(slot.future.exception(), UserCodeError)
        return slot.worker not in cluster.worker_inventory(self.ex.client)

    def on_output(self, task: _Task, ref: BlockRef) -> None:
        if task.actor is not None:
            task.actor.in_flight -= 1
            if task.actor.in_flight == 0:
                task.actor.idle_since = time.monotonic()
        super().on_output(task, ref)

    def tick(self, now: float) -> None:
        if self.finished:
            return
        lo, hi = self.stage.pool_min, self.stage.pool_max
        for slot in list(self.actors):
            if slot.worker not in self.ex.inventory:
                self._lose_actor(slot)
        if len(self.actors) < lo:
            self._replace_lost_actors(now, lo)
        waiting = self.inputs.rows >= (self.target_rows() or 1) or (self.inputs_done and self.inputs.rows)
        if (
            waiting
            and len(self.actors) < hi
            and self._free_actor() is None
            and now - self._last_scale > 0.1
        ):
            if self._add_actor():
                self._last_scale = now
        if len(self.actors) > lo:
            for slot in list(self.actors):
                if (
                    len(self.actors) > lo
                    and slot.in_flight == 0
                    and now - slot.idle_since > self.ex.ctx.actor_idle_timeout_s
                ):
                    self._remove_actor(slot)

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
        for slot in list(self.actors):
            self._remove_actor(slot)


class _Ledger:
    """Which worker holds which actor's resources, so pools never double-book a GPU."""

    def __init__(self, ex: StreamingExecutor) -> None:
        self.ex = ex
        self.used: dict[str, dict[str, float]] = {}
        self.actor_count: dict[str, int] = {}

    def capacity(self, worker: str, needed: Mapping[str, float], cpu_only: bool) -> int:
        info = self.ex.inventory.get(worker)
        if info is None:
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
        return worker

    def free(self, worker: str, needed: Mapping[str, float]) -> None:
        used = self.used.get(worker, {})
        for k, v in needed.items():
            used[k] = used.get(k, 0) - v
        self.actor_count[worker] = self.actor_count.get(worker, 1) - 1


_DONE = object()


class StreamingExecutor:
    """Runs one logical plan on a cluster and yields its output blocks in order.

    Iterate over it to receive ``BlockRef`` objects; call ``consumed(ref)`` once each
    one's data has been fetched or is no longer needed, so that reads can continue.
    """

    def __init__(
        self,
        logical: LogicalPlan,
        client: Client,
        ctx: DataContext | None = None,
        *,
        output_cap: int = 8,
    ) -> None:
        self.client = client
        self.ctx = ctx or DataContext.get_current()
        self.preserve_order = self.ctx.preserve_order
        self.max_inflight_bytes = self.ctx.resolved_max_inflight_bytes()
        self.target_task_bytes = self.ctx.resolved_target_task_bytes()
        self.target_task_s = self.ctx.target_task_s
        self.output_cap = output_cap
        self.run_id = uuid.uuid4().hex[:12]
        self.events: queue.Queue[Any] = queue.Queue()
        self.output: queue.Queue[Any] = queue.Queue()
        self.tasks: dict[str, _Task] = {}
        self.metas: dict[str, Mapping[str, Any]] = {}
        self.live: dict[str, BlockRef] = {}
        self.live_bytes = 0
        self.outputs_pending = 0
        self.stats = RunStats(run_id=self.run_id)
        self.started = time.monotonic()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.max_retries = 3
        self.actor_wait_timeout_s = 60.0
        self._refresh_at = 0.0
        self._avg_block_bytes = 1 << 20
        self._counter = itertools.count()
        self.physical = plan(logical)
        self.inventory: dict[str, dict[str, Any]] = {}
        self.cpu_workers: list[str] | None = None
        self.cpu_threads = 1
        self.has_cpu_resource = False
        self._refresh_inventory(wait=True)
        self.ops = [self._make_op(i, spec) for i, spec in enumerate(self.physical)]
        self.stats.operators = [op.stats for op in self.ops]
        self.ledger = _Ledger(self)
        self._preflight()
        self._thread = threading.Thread(target=self._run, name=f"daskinfer-executor-{self.run_id}", daemon=True)
        self._thread.start()

    def __reduce__(self) -> Any:
        raise TypeError("StreamingExecutor lives on the client and must not be pickled")

    # --- setup ------------------------------------------------------------------
    def _make_op(self, i: int, spec: PhysicalOp) -> _Operator:
        if isinstance(spec, SourceSpec):
            return _SourceOperator(self, i, spec)
        if isinstance(spec, TaskStageSpec):
            return _TaskOperator(self, i, spec)
        if isinstance(spec, ActorStageSpec):
            return _ActorPoolOperator(self, i, spec)
        if isinstance(spec, LimitSpec):
            return _LimitOperator(self, i, spec)
        return _RepartitionOperator(self, i, spec)

    def _refresh_inventory(self, wait: bool = False) -> None:
        inventory = cluster.worker_inventory(self.client)
        if not inventory and wait:
            try:
                self.client.wait_for_workers(1, timeout=30)
            except (TimeoutError, OSError) as exc:
                raise PlacementError(
                    "the cluster has no workers (waited 30 s); start some with "
                    "`dask worker <scheduler-address>`"
                ) from exc
            inventory = cluster.worker_inventory(self.client)
        self.inventory = inventory
        self.has_cpu_resource = any(cluster.CPU in w["resources"] for w in inventory.values())
        special = {a for a, w in inventory.items() if any(k != cluster.CPU and v > 0 for k, v in w["resources"].items())}
        plain = sorted(set(inventory) - special)
        # CPU stages keep off workers that hold GPUs (or any special resource) whenever
        # CPU-only workers exist, so that accelerators' threads stay free for predictors
        self.cpu_workers = plain if (plain and special) else None
        pool = plain if self.cpu_workers else list(inventory)
        self.cpu_threads = max(1, sum(inventory[a]["nthreads"] for a in pool))

    def refresh_inventory_soon(self) -> None:
        """Re-read the workers at the next loop step (after a worker was lost)."""
        self._refresh_at = 0.0

    def effective_resources(self, resources: Mapping[str, float]) -> dict[str, float]:
        """Drop ``CPU`` when no worker declares it: every worker has CPUs to give."""
        out = {k: float(v) for k, v in resources.items() if v}
        if cluster.CPU in out and not self.has_cpu_resource:
            del out[cluster.CPU]
        return out

    def workers_for(self, resources: Mapping[str, float]) -> list[str] | None:
        if any(k != cluster.CPU for k in resources):
            return None  # Dask's resource matching picks the workers
        return self.cpu_workers

    def threads_of(self, workers: list[str] | None) -> int:
        pool = workers if workers is not None else list(self.inventory)
        return max(1, sum(self.inventory[a]["nthreads"] for a in pool if a in self.inventory))

    def _preflight(self) -> None:
        for op in self.ops:
            if isinstance(op, _TaskOperator) and op.resources:
                if not any(cluster.has_resources(w, op.resources) for w in self.inventory.values()):
                    raise PlacementError(self._missing_message(op.name, op.resources, 1, 0, "task"))
            if isinstance(op, _ActorPoolOperator):
                cpu_only = not op._needs_special()
                capacity = sum(self.ledger.capacity(w, op.resources, cpu_only) for w in self.inventory)
                if capacity < op.stage.pool_min:
                    raise PlacementError(
                        self._missing_message(op.name, op.resources, op.stage.pool_min, capacity)
                    )

    def _missing_message(
        self, name: str, needed: Mapping[str, float], count: int, capacity: int, unit: str = "actor"
    ) -> str:
        offered = sorted({k for w in self.inventory.values() for k in w["resources"]})
        wants = ", ".join(f"{k}={v:g}" for k, v in needed.items()) or "a worker thread"
        hint = (
            "Start GPU workers with `dask cuda worker <scheduler>` (dask-cuda gives each "
            'GPU=1), or `dask worker <scheduler> --resources "GPU=1"` on a GPU machine; '
            "or drop num_gpus to run on CPU."
            if cluster.GPU in needed
            else f'Start workers that offer it, e.g. `dask worker <scheduler> --resources "{wants.replace(", ", ",")}"`, '
            "or ask for less."
        )
        return (
            f"{name} needs {wants} per {unit} "
            f"x {count}, but the cluster's {len(self.inventory)} workers have room for "
            f"{capacity} (resources offered: {offered or 'none'}). {hint}"
        )

    # --- bookkeeping ------------------------------------------------------------
    def new_ref(self, future: Any, rows: int, nbytes: int, worker: str | None = None) -> BlockRef:
        ref = BlockRef(key=str(future.key), future=future, rows=rows, nbytes=nbytes, worker=worker)
        self.live[ref.key] = ref
        self.live_bytes += nbytes
        self.stats.max_live_blocks = max(self.stats.max_live_blocks, len(self.live))
        self.stats.max_live_bytes = max(self.stats.max_live_bytes, self.live_bytes)
        return ref

    def release(self, ref: BlockRef) -> None:
        if self.live.pop(ref.key, None) is not None:
            self.live_bytes -= ref.nbytes
        ref.future = None

    def maybe_release(self, ref: BlockRef) -> None:
        if ref.exhausted and ref.uses <= 0:
            self.release(ref)

    def deliver(self, op: _Operator, ref: BlockRef | None) -> None:
        """Hand an operator's output, in order, to the next operator or the consumer."""
        if ref is None:
            return
        op.stats.blocks_out += 1
        nxt = self.ops[op.index + 1] if op.index + 1 < len(self.ops) else None
        if ref.rows == 0:
            # empty blocks carry no rows, only columns: a task stage keeps one to run
            # if nothing else arrives, and the last stage keeps one for an empty result
            if nxt is not None:
                nxt.add_empty(ref)
            elif self._kept_empty is None:
                self._kept_empty = ref
            else:
                ref.exhausted = True
                self.maybe_release(ref)
            return
        if nxt is not None:
            nxt.add_input(ref)
            return
        self.outputs_pending += 1
        self.stats.rows_out += ref.rows
        self.output.put(ref)

    _kept_empty: BlockRef | None = None

    def downstream_has_room(self, op: _Operator) -> bool:
        nxt = self.ops[op.index + 1] if op.index + 1 < len(self.ops) else None
        if nxt is None:
            # tasks in flight are capped by the operator itself; this caps finished
            # blocks that wait for the consumer
            return self.outputs_pending < self.output_cap
        return nxt.wants_more_input() or (not nxt.in_flight and not nxt.next_bundle_ready())

    def budget_allows_read(self) -> bool:
        """Admit another read only while produced-but-unconsumed bytes fit the budget.

        Blocks held by a barrier (repartition) are exempt: it must see all its input.
        """
        in_flight = sum(len(op.in_flight) for op in self.ops)
        held = self.live_bytes - sum(r.nbytes for op in self.ops if op.barrier for r in op.inputs.blocks())
        if in_flight == 0 and held <= 0:
            return True  # always make progress, even when one block exceeds the budget
        return held + (in_flight + 1) * self._avg_block_bytes <= self.max_inflight_bytes

    def consumed(self, ref: BlockRef) -> None:
        """The consumer is done with an output block."""
        self.events.put(("consumed", ref))

    def stop_upstream(self, op: _Operator) -> None:
        for up in self.ops[: op.index]:
            up.cancel()
        op.inputs_done = True

    # --- submission ---------------------------------------------------------------
    def submit_task(
        self,
        op: _Operator,
        seq: int,
        fn: Callable[..., Any],
        args: Sequence[Any],
        *,
        inputs: list[BlockRef],
        rows_in: int,
        workers: list[str] | None,
        resources: Mapping[str, float] | None,
        actor: _ActorSlot | None = None,
        bundle: list[Slice] | None = None,
        attempts: int = 0,
    ) -> None:
        key = f"daskinfer-{op.slug}-{self.run_id}-{next(self._counter)}"
        future = self.client.submit(
            fn,
            *args,
            key=key,
            workers=workers,
            allow_other_workers=False,
            resources=dict(resources) if resources else None,
            priority=op.index,
            pure=False,
        )
        task = _Task(key, future, op, seq, inputs, time.monotonic(), rows_in, actor, None, bundle or [], attempts)
        op.in_flight[key] = task
        self.tasks[key] = task
        self.stats.tasks_submitted += 1
        future.add_done_callback(lambda f, q=self.events: q.put(("done", f.key)))

    # --- the loop -----------------------------------------------------------------
    def _start(self) -> None:
        _route_meta(self.client, self.run_id, self.events)
        for op in self.ops:
            transforms: Any = None
            if isinstance(op, _SourceOperator):
                transforms = op.spec.transforms
            elif isinstance(op, _TaskOperator):
                transforms = op.spec.transforms
            elif isinstance(op, _ActorPoolOperator):
                transforms = (op.stage.transform,)
            if transforms:
                # one copy per worker instead of one per task: user functions often
                # close over tokenizers and the like
                op.transforms_future = self.client.scatter(
                    [tuple(transforms)], broadcast=True, hash=False
                )[0]
            elif transforms is not None:
                op.transforms_future = ()
        for op in self.ops:
            if isinstance(op, _ActorPoolOperator):
                op.start()

    def _run(self) -> None:
        try:
            self._start()
            last_tick = time.monotonic()
            self._refresh_at = last_tick + 2.0
            while not self._stop.is_set():
                self._handle_events(timeout=0.05)
                if self.error is not None:
                    break
                self._schedule()
                now = time.monotonic()
                if now - last_tick > 0.05:
                    last_tick = now
                    for op in self.ops:
                        op.tick(now)
                if now > self._refresh_at:
                    self._refresh_at = now + 2.0
                    self._refresh_inventory()
                if self._finished():
                    break
        except BaseException as exc:  # reported to the consumer, never lost
            self.error = exc
        finally:
            self._shutdown()

    def _finished(self) -> bool:
        progressed = True
        while progressed:
            progressed = False
            for op in self.ops:
                if op.maybe_finish():
                    progressed = True
                    nxt = self.ops[op.index + 1] if op.index + 1 < len(self.ops) else None
                    if nxt is not None:
                        nxt.inputs_done = True
        return all(op.finished for op in self.ops)

    def _schedule(self) -> None:
        for op in reversed(self.ops):
            while not op.finished and op.can_dispatch():
                if not op.dispatch():
                    break

    def _handle_events(self, timeout: float) -> None:
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            kind = event[0]
            if kind == "done":
                self._on_done(event[1])
            elif kind == "meta":
                self._on_meta(event[1])
            elif kind == "consumed":
                ref = event[1]
                self.outputs_pending -= 1
                self.release(ref)
            if self.error is not None:
                return
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return

    def _on_meta(self, msg: Mapping[str, Any]) -> None:
        key = str(msg["key"])
        task = self.tasks.get(key)
        self.metas[key] = msg
        if task is not None and task.future.status == "finished":
            self._complete(task)

    def _on_done(self, key: str) -> None:
        task = self.tasks.get(key)
        if task is None:
            meta_owner = next((t for t in self.tasks.values() if t.meta_future is not None and t.meta_future.key == key), None)
            if meta_owner is not None and meta_owner.meta_future is not None:
                rows, nbytes = meta_owner.meta_future.result()
                self.metas[meta_owner.key] = {"rows": rows, "bytes": nbytes, "worker": None}
                self._complete(meta_owner)
            return
        status = task.future.status
        if status == "finished":
            if task.key in self.metas:
                self._complete(task)
            else:
                # the event normally arrives first; fall back to asking the worker
                task.meta_future = self.client.submit(
                    worker_fns.block_meta, task.future, priority=_META_PRIORITY, pure=False
                )
                task.meta_future.add_done_callback(lambda f, q=self.events: q.put(("done", f.key)))
        elif status == "error":
            self.tasks.pop(task.key, None)
            task.op.in_flight.pop(task.key, None)
            if task.actor is not None:
                task.actor.in_flight -= 1
            if not task.op.on_task_error(task):
                self._fail(task)
        elif status == "cancelled" and not self._stop.is_set() and not task.op.finished:
            self.error = DaskInferError(f"a task of stage {task.op.name} was cancelled ({task.key})")

    def _complete(self, task: _Task) -> None:
        if self.tasks.pop(task.key, None) is None:
            return
        meta = self.metas.pop(task.key)
        task.op.in_flight.pop(task.key, None)
        if meta.get("seconds") is not None:
            task.op.observe(task.rows_in or int(meta["rows"]), float(meta["seconds"]))
        ref = self.new_ref(task.future, int(meta["rows"]), int(meta["bytes"]), meta.get("worker"))
        n_blocks = self.stats.blocks_produced = self.stats.blocks_produced + 1
        self._avg_block_bytes += (max(ref.nbytes, 1) - self._avg_block_bytes) / min(n_blocks, 20)
        for inp in task.inputs:
            inp.uses -= 1
            self.maybe_release(inp)
        task.op.on_output(task, ref)

    def _fail(self, task: _Task) -> None:
        exc = task.future.exception()
        tb = task.future.traceback()
        if isinstance(exc, UserCodeError):
            cause = exc.__cause__
            err: BaseException = exc
            err.__cause__ = cause
        else:
            err = UserCodeError(
                f"stage {task.op.name} failed: {type(exc).__name__}: {exc}", task.op.name
            )
            err.__cause__ = exc.with_traceback(tb) if tb is not None else exc
        self.error = err

    def _shutdown(self) -> None:
        if self.error is not None or self._stop.is_set():
            for op in self.ops:
                if not op.finished:
                    op.cancel()
        elif self._kept_empty is not None:
            if self.stats.rows_out:
                self.release(self._kept_empty)
            else:
                self.outputs_pending += 1
                self.output.put(self._kept_empty)
        _unroute_meta(self.client, self.run_id)
        self.stats.wall_s = time.monotonic() - self.started
        self.output.put(_DONE if self.error is None else self.error)

    # --- consumer side ------------------------------------------------------------
    def __iter__(self) -> Iterator[BlockRef]:
        try:
            while True:
                ref = self.next_output(block=True)
                if ref is None:
                    return
                yield ref
        finally:
            self.close()

    def next_output(self, *, block: bool) -> BlockRef | None:
        """The next output block in order; ``None`` at the end (or, if not ``block``,
        when none is ready yet: check ``is_exhausted`` to tell the two apart)."""
        if self._exhausted:
            return None
        try:
            item = self.output.get(block=block)
        except queue.Empty:
            return None
        if item is _DONE:
            self._exhausted = True
            return None
        if isinstance(item, BaseException):
            self._exhausted = True
            raise item
        return item  # type: ignore[no-any-return]

    _exhausted = False

    @property
    def is_exhausted(self) -> bool:
        """Whether every output block has been handed out."""
        return self._exhausted

    def close(self) -> None:
        """Stop the run (if still going), wait for the loop, and drop every reference.

        Dropping the futures lets Dask free the blocks, the scattered transforms and the
        actors on the workers at once, rather than whenever this object is collected.
        """
        if self._thread.is_alive():
            self._stop.set()
            self.events.put(("wake",))
            self._thread.join()
        for op in self.ops:
            op.transforms_future = None
            if isinstance(op, _ActorPoolOperator):
                for slot in list(op.actors):
                    op._remove_actor(slot)
        for ref in list(self.live.values()):
            self.release(ref)
        self.tasks.clear()
        self.metas.clear()
        self._kept_empty = None
        # the operators and this object reference each other, and the physical plan
        # holds a materialized source's futures: drop them now rather than at the next
        # garbage collection, so the blocks leave the workers when the Dataset does
        self.physical = []
        self.ops = []


def execute(
    logical: LogicalPlan, client: Client | None = None, *, consumer_prefetch: int = 0
) -> StreamingExecutor:
    """Start running ``logical`` and return the executor to iterate over.

    ``consumer_prefetch`` is how many output blocks the consumer holds before it reports
    any consumed; the executor lets at least that many (plus a margin) wait for it.
    """
    ex = StreamingExecutor(logical, client or cluster.current_client(), output_cap=consumer_prefetch + 8)
    return ex
