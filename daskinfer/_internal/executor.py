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
import pickle
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from distributed import Client

from daskinfer import cluster
from daskinfer._internal import shipping, worker_fns
from daskinfer._internal.batching import concat_blocks
from daskinfer._internal.bundler import BlockRef, Slice
from daskinfer._internal.gc_freeze import RunFreeze
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
    task_priority,
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
from daskinfer._internal.progress import ProgressReporter, resolve_mode
from daskinfer._internal.transforms import MapBatchesTransform
from daskinfer.context import DataContext
from daskinfer.exceptions import (
    DaskInferError,
    ExecutionTimeoutError,
    PlacementError,
    UserCodeError,
)
from daskinfer.metrics import RunStats

_INVENTORY_EVERY_S = 2.0  # how often the executor re-reads the cluster's workers
PROGRESS_TOPIC = "daskinfer-progress"  # snapshots for the dashboard page and /metrics
_PUBLISH_EVERY_S = 1.0

logger = logging.getLogger("daskinfer")

META_TOPIC = worker_fns.META_TOPIC
_META_PRIORITY = 10**15  # a metadata fallback task jumps the worker's queue
_routes_lock = threading.Lock()
_routes: weakref.WeakKeyDictionary[Client, dict[str, queue.Queue[Any]]] = (
    weakref.WeakKeyDictionary()
)


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


def _transforms_of(op: Operator) -> tuple[Any, ...] | None:
    """The transforms an operator runs on workers (None for limit and repartition)."""
    if isinstance(op, (SourceOperator, TaskOperator)):
        return tuple(op.spec.transforms or ())
    if isinstance(op, ActorPoolOperator):
        return (op.stage.transform,)
    return None


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
        keep_origins_apart: bool = False,
    ) -> None:
        self.client = client
        self.ctx = ctx or DataContext.get_current()
        # a resumable write learns that a source block is complete from the order of
        # the outputs, so it keeps the order whatever the context says
        self.preserve_order = self.ctx.preserve_order or keep_origins_apart
        self.max_inflight_bytes = self.ctx.resolved_max_inflight_bytes()
        self.target_task_bytes = self.ctx.resolved_target_task_bytes()
        self.actor_mmap_threshold = self.ctx.resolved_actor_mmap_threshold()
        self.actor_keeps_freed_memory = self.ctx.resolved_actor_keeps_freed_memory()
        self.target_task_s = self.ctx.target_task_s
        self.max_pool_calls_per_s = self.ctx.resolved_max_pool_calls_per_s()
        self.output_cap = output_cap
        self.run_id = uuid.uuid4().hex[:12]
        self.events: queue.Queue[Any] = queue.Queue()
        self.output: queue.Queue[Any] = queue.Queue()
        self.tasks: dict[str, TaskRecord] = {}
        self._meta_owners: dict[str, TaskRecord] = {}  # fallback metadata task -> its task
        # keys of blocks released while the client still saw them pending (see close)
        self._released_pending: set[str] = set()
        self.live: dict[str, BlockRef] = {}
        self.live_bytes = 0
        self.outputs_pending = 0
        self.outputs_pending_bytes = 0
        self.stats = RunStats(run_id=self.run_id)
        self.started = time.monotonic()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.max_retries = self.ctx.max_retries
        self.actor_wait_timeout_s = 60.0
        self._inventory_wanted = threading.Event()
        self._loop_ended = threading.Event()
        self._inventory_reader = threading.Thread(
            target=self._read_inventory_in_background,
            name=f"daskinfer-inventory-{self.run_id}",
            daemon=True,
        )
        self._avg_block_bytes: float = 1 << 20
        self._counter = itertools.count()
        self._gc_freeze = RunFreeze()
        self.physical = plan(logical)
        self.inventory: dict[str, dict[str, Any]] = {}
        self.restarting: set[str] = set()  # workers restarted after a timeout
        self.cpu_workers: list[str] | None = None
        self.has_cpu_resource = False
        self._refresh_inventory(wait=True)
        cluster.warm_up_workers(client)
        self.ops = [self._make_op(i, spec) for i, spec in enumerate(self.physical)]
        self._has_actor_pools = any(isinstance(op, ActorPoolOperator) for op in self.ops)
        for op in self.ops:
            op.inputs.split_origins = keep_origins_apart
        self.stats.operators = [op.stats for op in self.ops]
        self.stats.pipeline = "->".join(op.name for op in self.ops)
        # on_error policies of the map stages, by the stage name their rows report
        self.error_policies: dict[str, tuple[str, float | None]] = {}
        self.stage_names: dict[str, list[str]] = {}
        for op in self.ops:
            for t in _transforms_of(op) or ():
                if isinstance(t, MapBatchesTransform) and t.on_error != "raise":
                    self.error_policies[t.stage] = (t.on_error, t.max_errored_rows)
                    self.stage_names.setdefault(op.name, []).append(t.stage)
                if (
                    isinstance(t, MapBatchesTransform)
                    and t.timeout_s
                    and (op.timeout_s is None or t.timeout_s < op.timeout_s)
                ):
                    op.timeout_s, op.timeout_stage, op.timeout_on_error = (
                        t.timeout_s,
                        t.stage,
                        t.on_error,
                    )
        self.errored_rows: dict[str, int] = {}
        self.progress = ProgressReporter(
            self.stats, resolve_mode(self.ctx), self.ctx.progress_interval_s
        )
        self._accounted_at = time.monotonic()
        self._published_at = 0.0
        self.ledger = Ledger(self)
        self._preflight()
        self._thread = threading.Thread(
            target=self._run, name=f"daskinfer-executor-{self.run_id}", daemon=True
        )
        self._thread.start()

    def __reduce__(self) -> Any:
        raise TypeError("StreamingExecutor lives on the client and must not be pickled")

    # --- setup ------------------------------------------------------------------
    def _make_op(self, i: int, spec: PhysicalOp) -> Operator:
        op: Operator
        if isinstance(spec, SourceSpec):
            op, kind = SourceOperator(self, i, spec), "source"
        elif isinstance(spec, TaskStageSpec):
            op, kind = TaskOperator(self, i, spec), "tasks"
        elif isinstance(spec, ActorStageSpec):
            op, kind = ActorPoolOperator(self, i, spec), "actors"
        elif isinstance(spec, LimitSpec):
            op, kind = LimitOperator(self, i, spec), "limit"
        else:
            op, kind = RepartitionOperator(self, i, spec), "repartition"
        op.stats.kind = kind
        return op

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
        self._apply_inventory(inventory)

    def _read_inventory_in_background(self) -> None:
        """Re-read the workers every two seconds (or when asked) off the executor's loop.

        Reading them is a round trip to the scheduler, whose answer grows with the
        cluster; the loop would dispatch nothing meanwhile. The loop applies each
        answer when it arrives (an ``inventory`` event).
        """
        while not self._loop_ended.is_set():
            self._inventory_wanted.wait(_INVENTORY_EVERY_S)
            self._inventory_wanted.clear()
            if self._loop_ended.is_set():
                return
            try:
                inventory = cluster.worker_inventory(self.client)
            except Exception as exc:  # noqa: BLE001  # the run may be ending; the next try tells
                logger.debug("could not read the workers: %s", exc)
                continue
            self.events.put(("inventory", inventory))

    def _apply_inventory(self, inventory: dict[str, dict[str, Any]]) -> None:
        self.inventory = inventory
        self.has_cpu_resource = any(cluster.CPU in w["resources"] for w in inventory.values())
        special = {
            a
            for a, w in inventory.items()
            if any(k != cluster.CPU and v > 0 for k, v in w["resources"].items())
        }
        plain = sorted(set(inventory) - special)
        # CPU stages keep off workers that hold GPUs (or any special resource) whenever
        # CPU-only workers exist, so that accelerators' threads stay free for predictors
        self.cpu_workers = plain if (plain and special) else None

    def refresh_inventory_soon(self) -> None:
        """Re-read the workers now (after a worker was lost); the loop gets them soon."""
        self._inventory_wanted.set()

    def effective_resources(self, resources: Mapping[str, float]) -> dict[str, float]:
        """Drop ``CPU`` when no worker declares it: every worker has CPUs to give."""
        out = {k: float(v) for k, v in resources.items() if v}
        if cluster.CPU in out and not self.has_cpu_resource:
            del out[cluster.CPU]
        return out

    def all_workers_offer(self, resources: Mapping[str, float]) -> bool:
        """Whether every worker known now offers ``resources``."""
        return all(cluster.has_resources(w, resources) for w in self.inventory.values())

    def workers_for(self, resources: Mapping[str, float]) -> list[str] | None:
        if any(k != cluster.CPU for k in resources):
            return None  # Dask's resource matching picks the workers
        return self.cpu_workers

    def least_loaded_cpu_worker(self, op: Operator) -> list[str] | None:
        """For a task without data inputs: the CPU worker with the fewest of ``op``'s tasks
        per thread, or None where Dask's own placement spreads such tasks.

        Dask sends a task to a worker that holds one of its dependencies; where a
        stage's transforms travel as a dependency (large ones, see ``shipping``), that
        one result on one worker is a read's only dependency, so, restricted to the CPU
        workers (which also keeps Dask's queuing of root tasks off), every read went to
        that worker and work stealing spread them slowly (measured: 25 of 26 reads
        queued on one of 13 workers). Without restrictions
        (no accelerator workers), Dask queues such tasks and hands them out as threads
        free up.
        """
        workers = self.cpu_workers
        if not workers:
            return None
        load = dict.fromkeys(workers, 0)
        for task in op.in_flight.values():
            if task.sent_to in load:
                load[task.sent_to] += 1
        threads = {a: self.inventory.get(a, {}).get("nthreads", 1) or 1 for a in workers}
        return [min(workers, key=lambda a: (load[a] / threads[a], load[a]))]

    def threads_of(self, workers: list[str] | None) -> int:
        pool = workers if workers is not None else list(self.inventory)
        return max(1, sum(self.inventory[a]["nthreads"] for a in pool if a in self.inventory))

    def task_threads_of(self, workers: list[str] | None) -> int:
        """Threads of ``workers`` (None: all) left to tasks by the CPU actors on them.

        A CPU actor's calls run on one of its worker's threads (see
        ``PredictorHost.call``); tasks sent beyond what the other threads run only wait
        in the worker's queue, where on a fresh pool they hold up its first calls. A
        worker counts at least one thread: whether its actors keep theirs busy (W6's
        sleep 50 ms a call) or not (W1's pool of 2 on 2 threads adds a column), its
        tasks must flow.
        """
        pool = workers if workers is not None else list(self.inventory)
        held = self.ledger.threads_held
        return sum(
            max(1, self.inventory[a]["nthreads"] - held.get(a, 0))
            for a in pool
            if a in self.inventory
        )

    def _preflight(self) -> None:
        for op in self.ops:
            if (
                isinstance(op, TaskOperator)
                and op.resources
                and not any(cluster.has_resources(w, op.resources) for w in self.inventory.values())
            ):
                raise PlacementError(self._missing_message(op.name, op.resources, 1, 0, "task"))
            if isinstance(op, ActorPoolOperator):
                cpu_only = not op._needs_special()
                capacity = sum(
                    self.ledger.capacity(w, op.resources, cpu_only) for w in self.inventory
                )
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
        if ref.future is not None and ref.future.status == "pending":
            self._released_pending.add(str(ref.future.key))
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
        self.stats.rows_out += ref.rows
        self._hand_to_consumer(ref)

    def _hand_to_consumer(self, ref: BlockRef) -> None:
        self.outputs_pending += 1
        self.outputs_pending_bytes += ref.nbytes
        self.output.put(ref)

    _kept_empty: BlockRef | None = None

    def downstream_has_room(self, op: Operator) -> bool:
        nxt = self.ops[op.index + 1] if op.index + 1 < len(self.ops) else None
        if nxt is None:
            # tasks in flight are capped by the operator itself; this caps finished
            # blocks that wait for the consumer: output_cap of them, and more while
            # they add up to less than one task's target bytes. The consumer fetches
            # a few hundred small blocks a second at most; by count alone, W6's 8
            # actors (one-batch calls at first, 160 blocks a second) all stood idle
            # at times while 17-37 blocks of 16 KiB waited for it
            return (
                self.outputs_pending < self.output_cap
                or self.outputs_pending_bytes < self.target_task_bytes
            )
        return nxt.wants_more_input() or (not nxt.in_flight and not nxt.next_bundle_ready())

    def budget_allows_read(self) -> bool:
        """Admit another read only while produced-but-unconsumed bytes fit the budget.

        Blocks held by a barrier (repartition) are exempt: it must see all its input.
        """
        in_flight = sum(len(op.in_flight) for op in self.ops)
        held = self.live_bytes - sum(
            r.nbytes for op in self.ops if op.barrier for r in op.inputs.blocks()
        )
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
        if workers is not None and resources and not self.all_workers_offer(resources):
            # the resources alone keep the task where it can run. With a list of workers
            # it would be loose (below), and Dask's work stealing moves a loose task to
            # any idle worker when none of its listed ones is idle, even one without the
            # resources; that worker's state machine then fails (KeyError) and the
            # worker restarts, losing its actors (measured: a 5 s stall in 1 of ~40
            # W2 runs, the accelerator worker stealing a CPU task)
            workers = None
        future = self.client.submit(
            fn,
            *args,
            key=key,
            workers=workers,
            # loose: CPU work prefers the CPU workers, but when all those it was sent to
            # died (a nanny-restarted worker has a new address), any worker may take it
            # rather than the task waiting forever in Dask's no-worker state
            allow_other_workers=workers is not None,
            resources=dict(resources) if resources else None,
            priority=task_priority(op.index, seq),
            pure=False,
        )
        now = time.monotonic()
        if op.stats.first_submit_s is None:
            op.stats.first_submit_s = now - self.started
            logger.info("%s started (run %s)", op.name, self.run_id)
        task = TaskRecord(
            key, future, op, seq, inputs, now, rows_in, actor, None, bundle or [], attempts
        )
        task.sent_to = workers[0] if workers is not None and len(workers) == 1 else None
        op.in_flight[key] = task
        self.tasks[key] = task
        self.stats.tasks_submitted += 1
        future.add_done_callback(lambda f, q=self.events: q.put(("done", f.key)))

    # --- the loop -----------------------------------------------------------------
    def _start(self) -> None:
        if self.ctx.freeze_gc:
            self._gc_freeze.hold()
        _route_meta(self.client, self.run_id, self.events)
        cluster.install_dashboard(self.client)
        for op in self.ops:
            transforms = _transforms_of(op)
            if not transforms:
                op.transforms_arg = None if transforms is None else ()
                continue
            shipped = shipping.ship(transforms, f"{self.run_id}-{op.slug}", op.name)
            if shipped.inline:
                # small: inside every task, so that placement follows the data and the
                # resources (see daskinfer/_internal/shipping.py)
                op.transforms_arg = shipped
            else:
                # one copy per worker instead of one per task (user functions often close
                # over tokenizers and the like): a task whose result is the transforms,
                # which workers fetch once as a dependency. Unlike scattered data, a task
                # result that a dead worker held is recomputed; and submitting does not
                # wait for a round trip, as a broadcast scatter does (one that can hang
                # when a worker dies during it)
                op.transforms_arg = self.client.submit(
                    shipping.unpickle,
                    shipped.payload,
                    key=f"daskinfer-transforms-{op.slug}-{self.run_id}",
                    pure=False,
                )
        for op in self.ops:
            if isinstance(op, ActorPoolOperator):
                op.start()

    def _run(self) -> None:
        try:
            self._start()
            last_tick = time.monotonic()
            self._inventory_reader.start()
            # the first reads go out now: the loop below waits for an event first, and
            # nothing has been submitted yet that could send one (every run started
            # 50 ms late, the wait's timeout)
            self._schedule()
            while not self._stop.is_set():
                self._handle_events(timeout=0.05)
                if self.error is not None:
                    break
                self._schedule()
                now = time.monotonic()
                self._account(now)
                if now - last_tick > 0.05:
                    last_tick = now
                    self._check_timeouts(now)
                    for op in self.ops:
                        op.tick(now)
                    self._report(now)
                if self._finished() and (self.outputs_pending <= 0 or not self._has_actor_pools):
                    # with actor pools, supervise until the consumer has fetched every
                    # output: a worker that dies holding one makes Dask recompute it,
                    # and the calls it depends on need a live actor of their pool
                    break
        except BaseException as exc:  # noqa: BLE001  # reported to the consumer, never lost
            self.error = exc
        finally:
            try:
                self._shutdown()
            finally:
                self._gc_freeze.release()
                self._loop_ended.set()
                self._inventory_wanted.set()  # the reader sees the end and stops

    def _finished(self) -> bool:
        progressed = True
        while progressed:
            progressed = False
            for op in self.ops:
                if op.maybe_finish():
                    progressed = True
                    self._stage_finished(op)
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
            elif kind == "inventory":
                self._apply_inventory(event[1])
            elif kind == "consumed":
                ref = event[1]
                self.outputs_pending -= 1
                self.outputs_pending_bytes -= ref.nbytes
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
        if msg.get("started"):
            if task is not None:  # a timed stage's task began running: the clock starts
                task.started_at = time.monotonic()
                task.started_worker = msg.get("worker")
            return
        if task is None:
            return  # already completed or given up on (a rerun by Dask reports again)
        # the report is the task's last act: its block is in its worker's memory (or,
        # should that worker die, Dask recomputes it for whatever depends on it), so the
        # task completes now instead of when Dask's own "done" reaches the client, 2-5 ms
        # later here, a delay every hop from one stage to the next used to pay
        self._complete(task, msg)

    def _on_done(self, key: str) -> None:
        task = self.tasks.get(key)
        if task is None:
            meta_owner = self._meta_owners.pop(key, None)
            if (
                meta_owner is not None
                and meta_owner.meta_future is not None
                and meta_owner.key in self.tasks  # not completed by its late event meanwhile
            ):
                self._complete(meta_owner, {**meta_owner.meta_future.result(), "worker": None})
            return
        status = task.future.status
        if status == "finished":
            # its report, which completes a task, normally arrives first; fall back to
            # asking the worker
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
                task.op.stats.errors += 1
                self._fail(task)
        elif status == "cancelled" and not self._stop.is_set() and not task.op.finished:
            self.error = DaskInferError(
                f"a task of stage {task.op.name} was cancelled ({task.key})"
            )

    def _complete(self, task: TaskRecord, meta: Mapping[str, Any]) -> None:
        """Hand a finished task's block, as ``meta`` (its report) describes it, on."""
        if self.tasks.pop(task.key, None) is None:
            return
        task.op.in_flight.pop(task.key, None)
        if meta.get("seconds") is not None:
            task.op.observe(task.rows_in or int(meta["rows"]), float(meta["seconds"]))
        self._fold_worker_figures(task.op, meta)
        ref = self.new_ref(task.future, int(meta["rows"]), int(meta["bytes"]), meta.get("worker"))
        ref.flat = bool(meta.get("flat"))
        if task.inputs:
            origins = {inp.origin for inp in task.inputs}
            ref.origin = origins.pop() if len(origins) == 1 else None
        else:  # a source block
            ref.origin = task.seq
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
                self._hand_to_consumer(self._kept_empty)
        _unroute_meta(self.client, self.run_id)
        self.stats.wall_s = time.monotonic() - self.started
        if self.error is not None:
            self.stats.state = "failed"
            self.stats.error = f"{type(self.error).__name__}: {self.error}"
        else:
            self.stats.state = "finished" if all(op.finished for op in self.ops) else "cancelled"
        try:
            live = self.live_state()
            self.progress.close(live)
            self._publish(live, wait=True)
        except Exception:  # figures must never hide the run's own outcome
            logger.debug("final progress report failed", exc_info=True)
        logger.info(
            "run %s %s: %d rows out in %.2f s",
            self.run_id,
            self.stats.state,
            self.stats.rows_out,
            self.stats.wall_s,
        )
        self.output.put(_DONE if self.error is None else self.error)

    # --- timeouts -------------------------------------------------------------------
    def _check_timeouts(self, now: float) -> None:
        for op in self.ops:
            if not op.timeout_s or op.finished:
                continue
            for task in list(op.in_flight.values()):
                if task.started_at is not None and now - task.started_at > op.timeout_s:
                    self._time_out(op, task)
                    if self.error is not None:
                        return

    def _time_out(self, op: Operator, task: TaskRecord) -> None:
        """A batch ran past ``timeout_s``: restart its worker, then retry or set it aside.

        A Python thread cannot be interrupted, so the worker process is restarted (by its
        nanny), which also frees whatever the stuck call holds (GPU memory); an actor on
        it is replaced like any lost actor.
        """
        assert op.timeout_s is not None
        op.stats.timeouts += 1
        worker = task.started_worker
        logger.warning(
            "%s: a batch of %d rows ran for more than timeout_s=%g on %s (attempt %d); "
            "restarting that worker",
            op.name,
            task.rows_in,
            op.timeout_s,
            worker,
            task.attempts + 1,
        )
        op.in_flight.pop(task.key, None)
        self.tasks.pop(task.key, None)
        task.future.cancel()
        if task.actor is not None:
            task.actor.in_flight -= 1
        if worker is not None:
            threading.Thread(target=self._restart_worker, args=(worker,), daemon=True).start()
        if isinstance(op, ActorPoolOperator) and task.actor is not None:
            op._lose_actor(task.actor, charge_first=False)  # the timed-out batch is the culprit
        if task.attempts < self.max_retries:
            op.retry(task)
            return
        message = (
            f"TimeoutError: the batch ran for more than timeout_s={op.timeout_s:g} s "
            f"on {task.attempts + 1} attempts"
        )
        if op.timeout_on_error == "raise":
            self.error = ExecutionTimeoutError(
                f"{op.name}: a batch of {task.rows_in} rows ran for more than "
                f"timeout_s={op.timeout_s:g} s on each of {task.attempts + 1} attempts "
                f"(max_retries={self.max_retries}); raise timeout_s, or pass "
                "on_error='skip' or 'quarantine' to set such batches aside"
            )
            return
        self._set_aside(op, task, message)

    def _set_aside(self, op: Operator, task: TaskRecord, message: str) -> None:
        """Count (and for quarantine, keep) the rows of a batch given up on."""
        blocks = self.client.gather([ref.future for ref, _, _ in task.bundle])
        rows = concat_blocks(
            [b.iloc[s:e] for b, (_, s, e) in zip(blocks, task.bundle, strict=True)]
        )
        stage = op.timeout_stage
        if op.timeout_on_error == "quarantine":
            bad = rows.reset_index(drop=True).copy()
            bad["_error"] = message
            bad["_traceback"] = ""
            bad["_stage"] = stage
            self.stats.quarantine.append(bad)
        op.stats.quarantined_rows += len(rows)
        self.errored_rows[stage] = self.errored_rows.get(stage, 0) + len(rows)
        self._check_error_limit(stage, rows_seen=None)
        for ref in task.inputs:
            ref.uses -= 1
            self.maybe_release(ref)
        op._emit(task.seq, None)  # nothing comes out for this batch; the order goes on

    def _restart_worker(self, worker: str) -> None:
        self.restarting.add(worker)  # no replacement actor goes there meanwhile
        try:
            self.client.restart_workers([worker], timeout=60)
            self.restarting.discard(worker)
        except Exception as exc:  # noqa: BLE001  # e.g. a worker without a nanny: nothing can stop the call
            if self.client.status != "running" or self._stop.is_set():
                return  # the run (or the client) ended meanwhile
            logger.warning(
                "could not restart worker %s after a timeout (%s: %s); its stuck call keeps "
                "its thread until it returns. Start workers with a nanny (the default)",
                worker,
                type(exc).__name__,
                exc,
            )
        self.refresh_inventory_soon()

    # --- figures --------------------------------------------------------------------
    def _fold_worker_figures(self, op: Operator, meta: Mapping[str, Any]) -> None:
        """Counters, OOM splits and GPU samples a predictor call reported."""
        counters = meta.get("counters")
        if counters:
            op.stats.add_counters(counters)
        splits = int(meta.get("oom_splits") or 0)
        if splits:
            op.stats.oom_splits += splits
            logger.info(
                "%s: a batch ran out of accelerator memory; split it %d time(s), this "
                "actor now takes at most %s rows per call",
                op.name,
                splits,
                meta.get("max_rows"),
            )
        errored = meta.get("errored_rows")
        if errored:
            self._count_errored_rows(op, errored, meta.get("quarantine"))
        gpu = meta.get("gpu_busy")
        if gpu:
            op.stats.gpu_busy_sum += float(gpu[0])
            op.stats.gpu_busy_samples += int(gpu[1])

    def _count_errored_rows(
        self, op: Operator, errored: Mapping[str, int], payload: bytes | None
    ) -> None:
        """Rows a task set aside (``on_error``): count them, keep quarantined ones, apply limits."""
        total = sum(int(v) for v in errored.values())
        op.stats.quarantined_rows += total
        if payload:
            self.stats.quarantine.append(pickle.loads(payload))
        for stage, count in errored.items():
            before = self.errored_rows.get(stage, 0)
            self.errored_rows[stage] = before + int(count)
            if before == 0:
                logger.warning(
                    "%s: rows failed and were set aside (on_error=%s); see stats() for the count",
                    stage,
                    self.error_policies.get(stage, ("?", None))[0],
                )
            self._check_error_limit(stage, rows_seen=None)

    def _check_error_limit(self, stage: str, rows_seen: int | None) -> None:
        """Fail the run when a stage set aside more rows than its ``max_errored_rows``.

        An absolute limit is checked as rows arrive; a fraction (< 1) once the stage has
        seen all its rows (``rows_seen``), since early batches say little about the rate.
        """
        _, limit = self.error_policies.get(stage, ("raise", None))
        count = self.errored_rows.get(stage, 0)
        if limit is None or not count:
            return
        if limit >= 1:
            exceeded = count > limit
        elif rows_seen is None:
            return
        else:
            exceeded = count > limit * rows_seen
        if exceeded and self.error is None:
            self.error = UserCodeError(
                f"stage {stage}: {count} rows failed, more than max_errored_rows={limit:g}"
                + (f" of {rows_seen} rows" if rows_seen is not None and limit < 1 else "")
                + "; fix the code or the data, or raise the limit",
                stage,
            )

    def _account(self, now: float) -> None:
        """Charge the time since the last step to each stage's state.

        Called right after scheduling, so a stage that still has room and input ready
        was held back by the stage after it (or the byte budget): backpressure. One with
        an idle slot (a task slot or an actor with nothing to do) and nothing ready was
        waiting for input.
        """
        dt = now - self._accounted_at
        self._accounted_at = now
        for op in self.ops:
            stats = op.stats
            stats.slots = max(stats.slots, op.slots())
            if op.finished or stats.first_submit_s is None:
                continue
            if op.next_bundle_ready():
                if op.has_room():
                    stats.blocked_output_s += dt
            elif not op.inputs_done and op.has_idle_slot():
                stats.wait_input_s += dt

    def _stage_finished(self, op: Operator) -> None:
        stats = op.stats
        stats.finished_s = time.monotonic() - self.started
        for stage in self.stage_names.get(op.name, ()):
            self._check_error_limit(stage, rows_seen=stats.rows_in or stats.rows_out)
        if stats.first_submit_s is None:
            return
        wall = stats.wall_s()
        logger.info(
            "%s finished: %d rows in %d tasks in %.2f s (%.0f rows/s); %.2f s in its code, "
            "%.2f s waiting for input, %.2f s blocked on output",
            op.name,
            stats.rows_out,
            stats.tasks,
            wall,
            stats.rows_per_s(),
            stats.compute_s,
            stats.wait_input_s,
            stats.blocked_output_s,
        )

    def live_state(self) -> dict[str, dict[str, Any]]:
        """What only the loop knows, per stage: batches in flight and queued, actors."""
        out: dict[str, dict[str, Any]] = {}
        for op in self.ops:
            state: dict[str, Any] = {"in_flight": len(op.in_flight), "queued": op.queued_batches()}
            expected = op.rows_expected()
            if expected is not None:
                state["rows_expected"] = expected
            if isinstance(op, ActorPoolOperator):
                state["actors_alive"] = len(op.actors)
                state["actors_busy"] = sum(1 for a in op.actors if a.in_flight)
                state["actor_workers"] = [a.worker for a in op.actors]
            out[op.name] = state
        return out

    def _report(self, now: float) -> None:
        live = self.live_state()
        self.progress.update(live)
        if now - self._published_at >= _PUBLISH_EVERY_S:
            self._published_at = now
            self._publish(live)

    def _publish(self, live: Mapping[str, Mapping[str, Any]], *, wait: bool = False) -> None:
        """Send a snapshot to the scheduler, where the dashboard page and /metrics read it.

        Fire and forget on the client's event loop while running, so that the loop never
        waits a round trip for it; the final snapshot is sent synchronously.
        """
        try:
            snapshot = self.stats.snapshot(live)
            if wait:
                self.client.log_event(PROGRESS_TOPIC, snapshot)
            else:
                assert self.client.loop is not None  # a running client has its loop
                self.client.loop.add_callback(
                    self.client.scheduler.log_event, topic=PROGRESS_TOPIC, msg=snapshot
                )
        except Exception:  # the scheduler may be going away; the run does not depend on it
            logger.debug("could not publish progress", exc_info=True)

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
            self._thread.join(timeout=60)
            if self._thread.is_alive():
                # stuck in a call into Dask that does not return (a scheduler gone);
                # the thread is a daemon: let it be rather than hang the caller
                logger.warning("run %s: the executor's loop did not stop within 60 s", self.run_id)
        for op in self.ops:
            op.transforms_arg = None
            if isinstance(op, ActorPoolOperator):
                for slot in list(op.actors):
                    op._remove_actor(slot)
        for ref in list(self.live.values()):
            self.release(ref)
        self.tasks.clear()
        self._meta_owners.clear()
        self._kept_empty = None
        self._settle_released()
        # the operators and this object reference each other, and the physical plan
        # holds a materialized source's futures: drop them now rather than at the next
        # garbage collection, so the blocks leave the workers when the Dataset does
        self.physical = []
        self.ops = []

    def _settle_released(self, timeout_s: float = 1.0) -> None:
        """Wait (briefly) until the client has seen every released block finish.

        The executor can learn that a task finished (its metadata) before the client
        has processed the task's own "finished" message; such a block may be released
        while its Future still reads pending, and Dask then keeps the Future alive for
        the done-callback until that message arrives, milliseconds later. If the
        script exits first (a job's last line is often its last call), closing the
        client cancels it, and the callback fails against an executor that the
        interpreter has already shut down: "RuntimeError: cannot schedule new futures
        after shutdown", printed at every such exit. A finished run waits for those
        messages here; a stopped one does not (its pending tasks may never finish).
        """
        keys, self._released_pending = self._released_pending, set()
        if not keys or not self._exhausted:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = self.client.futures
            if not any(k in states and states[k].status == "pending" for k in keys):
                return
            time.sleep(0.002)


def execute(
    logical: LogicalPlan,
    client: Client | None = None,
    *,
    consumer_prefetch: int = 0,
    keep_origins_apart: bool = False,
) -> StreamingExecutor:
    """Start running ``logical`` and return the executor to iterate over.

    ``consumer_prefetch`` is how many output blocks the consumer holds before it reports
    any consumed; the executor lets at least that many (plus a margin) wait for it.
    ``keep_origins_apart``: no batch mixes rows of two source blocks, and each output
    block says which source block it comes from (``BlockRef.origin``).
    """
    ex = StreamingExecutor(
        logical,
        client or cluster.current_client(),
        output_cap=consumer_prefetch + 8,
        keep_origins_apart=keep_origins_apart,
    )
    return ex
