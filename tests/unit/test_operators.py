"""Client-side operator decisions, with a stand-in for the executor (no Dask)."""

from __future__ import annotations

import types

from daskinfer._internal.bundler import BlockRef
from daskinfer._internal.executor import StreamingExecutor
from daskinfer._internal.operators import ActorPoolOperator, ActorSlot, Ledger, TaskRecord
from daskinfer._internal.plan import MapStage
from daskinfer._internal.planner import ActorStageSpec
from daskinfer._internal.transforms import MapBatchesTransform
from daskinfer.context import DataContext

BATCH = 100


class Predictor:
    def __call__(self, batch):
        return batch


def actor_stage(seconds_per_batch: float) -> ActorPoolOperator:
    ctx = DataContext()
    executor = types.SimpleNamespace(
        ctx=ctx,
        run_id="test",
        target_task_s=ctx.target_task_s,
        target_task_bytes=ctx.resolved_target_task_bytes(),
        effective_resources=lambda resources: dict(resources),
    )
    transform = MapBatchesTransform("Predictor", Predictor, BATCH, "numpy")
    stage = MapStage(
        "Predictor", transform, batch_size=BATCH, actor_class=Predictor, pool_min=1, pool_max=1
    )
    op = ActorPoolOperator(executor, 1, ActorStageSpec(stage, "Predictor"))
    op.seconds_per_row = seconds_per_batch / BATCH  # as if its first calls were measured
    loaded = types.SimpleNamespace(status="finished", key="actor")
    op.actors.append(ActorSlot(loaded, "worker", {}))
    return op


def give_call(op: ActorPoolOperator, rows: int) -> None:
    """Put a call of ``rows`` rows in flight on the pool's actor."""
    slot = op.actors[0]
    key = f"call-{len(op.in_flight)}"
    op.in_flight[key] = TaskRecord(key, None, op, len(op.in_flight), [], 0.0, rows, slot)
    slot.in_flight += 1


def queue_batches(op: ActorPoolOperator, n: int) -> None:
    for i in range(n):
        op.add_input(BlockRef(f"block-{i}", None, BATCH, BATCH * 8))


def test_an_actor_with_less_than_a_bundle_queued_gets_the_whole_batches_there_are():
    op = actor_stage(seconds_per_batch=0.02)
    assert op.target_rows() == 5 * BATCH  # 100 ms of work per bundle
    give_call(op, BATCH)  # busy, but with 20 ms of work left: it may run dry
    queue_batches(op, 3)
    assert op.next_bundle_ready()
    bundle = op.next_bundle()
    assert bundle is not None and sum(stop - start for _, start, stop in bundle) == 3 * BATCH


def test_an_actor_with_a_bundle_queued_waits_for_a_full_bundle():
    op = actor_stage(seconds_per_batch=0.02)
    give_call(op, 5 * BATCH)  # a full bundle's work queued: amortise the next call
    queue_batches(op, 3)
    assert not op.next_bundle_ready()
    assert op.next_bundle() is None
    queue_batches(op, 2)
    bundle = op.next_bundle()
    assert bundle is not None and sum(stop - start for _, start, stop in bundle) == 5 * BATCH


def test_an_actor_still_loading_gets_nothing_early():
    op = actor_stage(seconds_per_batch=0.02)
    op.actors[0].future.status = "pending"
    queue_batches(op, 3)
    assert not op.next_bundle_ready()


def test_an_actor_running_short_takes_its_share_not_what_the_pool_s_other_actors_need():
    op = actor_stage(seconds_per_batch=0.02)
    still_loading = types.SimpleNamespace(status="pending", key="actor-2")
    op.actors.append(ActorSlot(still_loading, "worker-2", {}))
    give_call(op, BATCH)
    queue_batches(op, 3)
    bundle = op.next_bundle()
    # two actors, three batches: two now (rounded up), one left for the other actor
    assert bundle is not None and sum(stop - start for _, start, stop in bundle) == 2 * BATCH
    assert op.inputs.rows == BATCH


def test_cpu_actors_take_their_threads_from_the_tasks_and_give_them_back():
    inventory = {
        "cpu-a": {"nthreads": 5, "resources": {"CPU": 5}},
        "cpu-b": {"nthreads": 5, "resources": {"CPU": 5}},
        "gpu": {"nthreads": 2, "resources": {"GPU": 1}},
    }
    executor = types.SimpleNamespace(inventory=inventory, restarting=set(), cpu_workers=None)
    executor.ledger = Ledger(executor)

    def task_threads(workers=None):
        return StreamingExecutor.task_threads_of(executor, workers)

    assert task_threads(["cpu-a", "cpu-b"]) == 10
    placed = [executor.ledger.reserve({"CPU": 1}, cpu_only=True) for _ in range(8)]
    assert sorted(placed) == ["cpu-a"] * 4 + ["cpu-b"] * 4
    # 4 of each worker's 5 threads run the actors' calls
    assert task_threads(["cpu-a", "cpu-b"]) == 2
    # an actor that holds an accelerator runs its calls off the worker's threads
    assert executor.ledger.reserve({"GPU": 1}, cpu_only=False) == "gpu"
    assert task_threads(["gpu"]) == 2
    # a worker whose threads all run actors still runs tasks on one of them
    executor.ledger.reserve({"CPU": 1}, cpu_only=True)
    executor.ledger.reserve({"CPU": 1}, cpu_only=True)
    assert task_threads(["cpu-a", "cpu-b"]) == 2
    for worker in placed:
        executor.ledger.free(worker, {"CPU": 1})
    assert task_threads(["cpu-a", "cpu-b"]) == 8  # one actor left on each
