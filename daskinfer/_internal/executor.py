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

import itertools
import logging
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from distributed import Client

from daskinfer import cluster
from daskinfer._internal import worker_fns
from daskinfer._internal.bundler import BlockRef, Slice
from daskinfer._internal.operators import (
    ActorPoolOperator,
    ActorSlot,
    Ledger,
    LimitOperator,
    Operator,
    RepartitionOperator,
    SourceOperator,
    TaskOperator,
    TaskRecord,
)
from daskinfer._internal.plan import LogicalPlan
from daskinfer._internal.planner import (
    ActorStageSpec,
    LimitSpec,
    PhysicalOp,
    SourceSpec,
    TaskStageSpec,
    plan,
)
from daskinfer.context import DataContext
from daskinfer.exceptions import DaskInferError, PlacementError, UserCodeError
from daskinfer.metrics import RunStats

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
        self.tasks: dict[str, TaskRecord] = {}
        self.metas: dict[str, Mapping[str, Any]] = {}
        self._meta_owners: dict[str, TaskRecord] = {}  # fallback metadata task -> its task
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
        cluster.warm_up_workers(client)
        self.ops = [self._make_op(i, spec) for i, spec in enumerate(self.physical)]
        self.stats.operators = [op.stats for op in self.ops]
        self.ledger = Ledger(self)
        self._preflight()
        self._thread = threading.Thread(target=self._run, name=f"daskinfer-executor-{self.run_id}", daemon=True)
        self._thread.start()

    def __reduce__(self) -> Any:
        raise TypeError("StreamingExecutor lives on the client and must not be pickled")

    # --- setup ------------------------------------------------------------------
    def _make_op(self, i: int, spec: PhysicalOp) -> Operator:
        if isinstance(spec, SourceSpec):
            return SourceOperator(self, i, spec)
        if isinstance(spec, TaskStageSpec):
            return TaskOperator(self, i, spec)
        if isinstance(spec, ActorStageSpec):
            return ActorPoolOperator(self, i, spec)
        if isinstance(spec, LimitSpec):
            return LimitOperator(self, i, spec)
        return RepartitionOperator(self, i, spec)

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
            if isinstance(op, TaskOperator) and op.resources:
                if not any(cluster.has_resources(w, op.resources) for w in self.inventory.values()):
                    raise PlacementError(self._missing_message(op.name, op.resources, 1, 0, "task"))
            if isinstance(op, ActorPoolOperator):
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

    def deliver(self, op: Operator, ref: BlockRef | None) -> None:
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

    def downstream_has_room(self, op: Operator) -> bool:
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

    def stop_upstream(self, op: Operator) -> None:
        for up in self.ops[: op.index]:
            up.cancel()
        op.inputs_done = True

    # --- submission ---------------------------------------------------------------
    def submit_task(
        self,
        op: Operator,
        seq: int,
        fn: Callable[..., Any],
        args: Sequence[Any],
        *,
        inputs: list[BlockRef],
        rows_in: int,
        workers: list[str] | None,
        resources: Mapping[str, float] | None,
        actor: ActorSlot | None = None,
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
        task = TaskRecord(key, future, op, seq, inputs, time.monotonic(), rows_in, actor, None, bundle or [], attempts)
        op.in_flight[key] = task
        self.tasks[key] = task
        self.stats.tasks_submitted += 1
        future.add_done_callback(lambda f, q=self.events: q.put(("done", f.key)))

    # --- the loop -----------------------------------------------------------------
    def _start(self) -> None:
        _route_meta(self.client, self.run_id, self.events)
        for op in self.ops:
            transforms: Any = None
            if isinstance(op, SourceOperator) or isinstance(op, TaskOperator):
                transforms = op.spec.transforms
            elif isinstance(op, ActorPoolOperator):
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
            if isinstance(op, ActorPoolOperator):
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
            meta_owner = self._meta_owners.pop(key, None)
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
                self._meta_owners[str(task.meta_future.key)] = task
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

    def _complete(self, task: TaskRecord) -> None:
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

    def _fail(self, task: TaskRecord) -> None:
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
            if isinstance(op, ActorPoolOperator):
                for slot in list(op.actors):
                    op._remove_actor(slot)
        for ref in list(self.live.values()):
            self.release(ref)
        self.tasks.clear()
        self.metas.clear()
        self._meta_owners.clear()
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
