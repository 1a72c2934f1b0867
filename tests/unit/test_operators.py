"""Client-side operator decisions, with a stand-in for the executor (no Dask)."""

from __future__ import annotations

import types

import pytest

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


def actor_stage(
    seconds_per_batch: float, *, ctx: DataContext | None = None, rows_expected: int | None = None
) -> ActorPoolOperator:
    ctx = ctx or DataContext()
    upstream = types.SimpleNamespace(rows_expected=lambda: rows_expected)
    executor = types.SimpleNamespace(
        ctx=ctx,
        run_id="test",
        ops=[upstream],
        target_task_s=ctx.target_task_s,
        target_task_bytes=ctx.resolved_target_task_bytes(),
        max_pool_calls_per_s=ctx.resolved_max_pool_calls_per_s(),
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


def test_once_all_input_is_in_the_last_calls_share_what_is_left_evenly_between_actors():
    op = actor_stage(seconds_per_batch=0.02)
    second = ActorSlot(types.SimpleNamespace(status="finished", key="actor-2"), "worker-2", {})
    op.actors.append(second)
    give_call(op, 5 * BATCH)  # the first actor has 5 batches in its call
    queue_batches(op, 9)
    assert op.target_rows() == 5 * BATCH  # 100 ms of work a call
    # more input may come: full bundles, whatever the actors hold
    assert op._call_cap(second) is None
    op.inputs_done = True
    # 14 batches left in all, 7 each: the busy actor is topped up by 2
    assert op._call_cap(op.actors[0]) == 2 * BATCH
    op._call_cap_rows = op._call_cap(op.actors[0])
    bundle = op.next_bundle()
    assert bundle is not None and sum(stop - start for _, start, stop in bundle) == 2 * BATCH
    op._call_cap_rows = None
    # an actor already holding more than its share still gets a batch, not nothing
    give_call(op, 9 * BATCH)
    assert op._call_cap(op.actors[0]) == BATCH


def test_once_all_input_is_in_calls_shrink_as_it_runs_out():
    # guided: the rows not yet in any call over the places calls wait (actors x
    # depth), so that the last calls are single batches for whichever actor frees up
    # first; full bundles to the end left W6's 8 actors finishing 0.3-0.7 s apart
    op = actor_stage(seconds_per_batch=0.001)  # bundles of up to 100 batches
    op.actors.append(ActorSlot(types.SimpleNamespace(status="finished", key="a2"), "w2", {}))
    idle = op.actors[1]
    assert op.depth == 4
    queue_batches(op, 80)
    op.inputs_done = True
    assert op._call_cap(idle) == 10 * BATCH  # 80 over 2 actors x 4 calls
    op.inputs.take(70 * BATCH)
    assert op._call_cap(idle) == 2 * BATCH  # 10 left: ceil(10 / 8)
    op.inputs.take(8 * BATCH)
    assert op._call_cap(idle) == BATCH


def add_actors(op: ActorPoolOperator, n: int) -> None:
    for i in range(n):
        loaded = types.SimpleNamespace(status="finished", key=f"more-{i}")
        op.actors.append(ActorSlot(loaded, f"worker-{i}", {}))


def test_a_large_pool_makes_longer_calls_so_its_calls_per_second_stay_bounded():
    # 20 ms a batch: target_task_s (100 ms) alone is 5 batches a call, whatever the size
    # of the pool; 8 actors at 20 calls/s for the pool make calls of 0.4 s
    op = actor_stage(seconds_per_batch=0.02)
    assert op.target_rows() == 5 * BATCH
    add_actors(op, 1)
    assert op.target_rows() == 5 * BATCH  # 2 / 20 = 0.1 s: no more than target_task_s
    add_actors(op, 6)
    assert op.work_per_bundle_s() == pytest.approx(0.4)
    assert op.target_rows() == 20 * BATCH
    unbounded = DataContext(max_pool_calls_per_s=None)
    op = actor_stage(seconds_per_batch=0.02, ctx=unbounded)
    add_actors(op, 7)
    assert op.target_rows() == 5 * BATCH


def test_a_large_pool_grows_its_calls_from_its_floor_up_to_four_times_it():
    op = actor_stage(seconds_per_batch=0.02)
    add_actors(op, 7)  # calls of at least 0.4 s
    for slot in op.actors:
        slot.in_flight = 1
    queue_batches(op, 200)
    run_window(op, 0.0, 1.0, busy=0.5, actors=8)
    assert op.work_per_bundle_s() == pytest.approx(1.6)


def test_a_source_of_known_size_caps_the_lengthened_calls_of_a_large_pool_from_the_start():
    # W6's shape: 400 batches of 50 ms to come, 8 actors, calls of at least 0.4 s (8
    # batches). Guided from the first call: the rows not in a call over actors x 4
    op = actor_stage(seconds_per_batch=0.05, rows_expected=400 * BATCH)
    add_actors(op, 7)
    queue_batches(op, 20)
    assert not op.inputs_done
    assert op._call_cap(op.actors[1]) == 13 * BATCH  # ceil(400 / 32)
    assert op.target_rows() == 8 * BATCH  # the floor's calls are the smaller
    op.inputs.take(20 * BATCH)
    op.stats.rows_in = 360 * BATCH  # 40 still to come: ceil(40 / 32), small at the end
    assert op._call_cap(op.actors[1]) == 2 * BATCH
    unknown = actor_stage(seconds_per_batch=0.05)  # a total nobody knows: no cap yet
    add_actors(unknown, 7)
    queue_batches(unknown, 20)
    assert unknown._call_cap(unknown.actors[1]) is None
    # calls of target_task_s (2 actors: 0.1 s either way) keep full bundles until the
    # input is in: halving them from the start slowed W1's cheap pool by 20%
    small = actor_stage(seconds_per_batch=0.001, rows_expected=320 * BATCH)
    add_actors(small, 1)
    queue_batches(small, 20)
    assert small._call_cap(small.actors[1]) is None


def test_a_large_pool_on_a_short_job_gives_each_actor_one_call_not_depth_of_them():
    # W6 with 32 actors: 12.5 batches of 50 ms for each, against a floor of 1.6 s.
    # Calls split actors x depth ways were 1-5 batches, about 250 of them, and the
    # actors waited 0.1-0.25 s for each on a saturated client
    op = actor_stage(seconds_per_batch=0.05, rows_expected=400 * BATCH)
    add_actors(op, 31)
    queue_batches(op, 40)
    assert op._calls_left_each() == 1
    assert op._call_cap(op.actors[1]) == 13 * BATCH  # ceil(400 / 32)
    op.inputs.take(40 * BATCH)
    op.stats.rows_in = 360 * BATCH  # 40 still to come: ceil(40 / 32), not ceil(40 / 128)
    assert op._call_cap(op.actors[1]) == 2 * BATCH
    unbounded = actor_stage(
        seconds_per_batch=0.05,
        rows_expected=400 * BATCH,
        ctx=DataContext(max_pool_calls_per_s=None),
    )
    add_actors(unbounded, 31)
    assert unbounded._calls_left_each() == unbounded.depth
    longer = actor_stage(seconds_per_batch=0.05, rows_expected=2000 * BATCH)  # 3.1 s each
    add_actors(longer, 31)
    assert longer._calls_left_each() == longer.depth


@pytest.mark.parametrize("rate", [0, -1.0, "20", True])
def test_a_pool_call_rate_that_is_not_a_positive_number_is_refused(rate):
    with pytest.raises(ValueError, match=r"max_pool_calls_per_s.*got"):
        DataContext(max_pool_calls_per_s=rate).resolved_max_pool_calls_per_s()


def test_a_lone_actor_takes_what_is_left_in_full_bundles():
    # with nobody to even out with, smaller calls at the end would only add overhead
    op = actor_stage(seconds_per_batch=0.001)
    queue_batches(op, 80)
    op.inputs_done = True
    assert op._call_cap(op.actors[0]) == 80 * BATCH


def test_an_actor_holds_two_calls_until_one_was_measured_then_its_full_depth():
    # before any call has come back, bundles are one batch each: a full queue of those
    # per actor is the costliest way to start
    op = actor_stage(seconds_per_batch=0.02)
    op.seconds_per_row = None
    assert op.depth > 2
    give_call(op, BATCH)
    assert op._free_actor() is op.actors[0]
    give_call(op, BATCH)
    assert op._free_actor() is None
    queue_batches(op, 3)
    assert not op._actor_runs_short()  # no room for another call either
    op.observe(BATCH, 0.02)  # the first call came back
    assert op._free_actor() is op.actors[0]
    for _ in range(op.depth - 2):
        give_call(op, BATCH)
    assert op._free_actor() is None


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


def run_window(
    op: ActorPoolOperator, start: float, seconds: float, busy: float, actors: int = 1
) -> None:
    """Judge the pool over ``seconds`` in which its actors spent ``busy`` of the time in
    calls."""
    op._grow_bundles_if_overhead_bound(start)  # opens the window
    calls = 4 * actors
    per_call = seconds * busy * actors / calls
    for _ in range(calls):
        op.observe(round(per_call / 0.02 * BATCH), per_call)  # 20 ms a batch, as measured
    op.observe(0, 0.0)  # (a call with no rows adds nothing)
    op._grow_bundles_if_overhead_bound(start + seconds)


def test_a_fed_actor_that_idles_between_calls_gets_bigger_calls_up_to_a_limit():
    op = actor_stage(seconds_per_batch=0.02)
    op.seconds_per_row = None  # measured from the calls below: 20 ms a batch
    op.observe(BATCH, 0.02)
    give_call(op, 5 * BATCH)
    queue_batches(op, 40)
    assert op.target_rows() == 5 * BATCH  # DataContext.target_task_s: 100 ms of work
    # the actor had calls queued all along, yet spent 80% of its time in them: per-call
    # overhead of a quarter of a call's work, so calls grow until it would be 10%
    run_window(op, 0.0, 1.0, busy=0.8)
    assert op.task_s == pytest.approx(0.225)
    assert op.target_rows() == 11 * BATCH  # whole batches: 220 ms
    # not judged again until the call sent before the change has come back
    run_window(op, 1.0, 1.0, busy=0.5)
    assert op.task_s == pytest.approx(0.225)
    op.observe(BATCH, 0.02)  # that call
    # close to the mark: at least a doubling, but no more than 4x target_task_s
    run_window(op, 2.0, 1.0, busy=0.85)
    assert op.task_s == 0.4
    for k in range(3):
        op.observe(BATCH, 0.02)
        run_window(op, 3.0 + k, 1.0, busy=0.5)
    assert op.task_s == 0.4
    assert op.stats.bundle_growths == 2


def test_an_actor_idle_half_the_time_goes_to_the_largest_calls_at_once():
    # one window's figure says how far off the calls are: no doubling step by step
    op = actor_stage(seconds_per_batch=0.02)
    give_call(op, 5 * BATCH)
    queue_batches(op, 40)
    run_window(op, 0.0, 1.0, busy=0.5)
    assert op.task_s == 0.4 and op.stats.bundle_growths == 1
    assert op.target_rows() == 20 * BATCH


def test_a_busy_actor_or_one_short_of_input_keeps_its_call_size():
    busy = actor_stage(seconds_per_batch=0.02)
    give_call(busy, 5 * BATCH)
    queue_batches(busy, 40)
    run_window(busy, 0.0, 1.0, busy=0.95)
    assert busy.task_s == 0.1
    starved = actor_stage(seconds_per_batch=0.02)  # idles, but has nothing to run
    run_window(starved, 0.0, 1.0, busy=0.2)
    assert starved.task_s == 0.1
    queue_batches(starved, 40)  # input, but no call in flight yet: still not judged
    run_window(starved, 1.0, 1.0, busy=0.2)
    assert starved.task_s == 0.1
