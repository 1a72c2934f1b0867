from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import daskinfer as di
from daskinfer._internal.planner import ActorStageSpec, SourceSpec, TaskStageSpec, plan


class Model:
    def __init__(self):
        raise AssertionError("the constructor must never run during planning")

    def __call__(self, batch):
        return batch


def _ds():
    return di.from_pandas(pd.DataFrame({"a": range(10)}))


def test_whole_block_stages_fuse_and_batched_stages_do_not():
    ds = (
        _ds()
        .map(lambda r: r)
        .filter(lambda r: True)
        .map_batches(lambda b: b, batch_size=4)
        .select_columns(["a"])
        .map_batches(Model, concurrency=2, batch_size=2)
        .map_batches(lambda b: b, batch_size=None)
    )
    ops = plan(ds._plan)
    assert [type(o) for o in ops] == [SourceSpec, TaskStageSpec, ActorStageSpec, TaskStageSpec]
    assert len(ops[0].transforms) == 2  # map + filter fused into the read
    assert len(ops[1].transforms) == 2  # map_batches + select_columns
    assert "->" in ds.explain().splitlines()[3] or "Map" in ds.explain()


def test_gpu_task_stage_does_not_fuse_with_cpu_stage():
    ds = _ds().map_batches(lambda b: b, batch_size=None, num_gpus=1)
    ops = plan(ds._plan)
    assert isinstance(ops[1], TaskStageSpec) and dict(ops[1].resources) == {"GPU": 1.0}
    # nor a stage that asks for nothing after it: it would run on the accelerator's worker
    ops = plan(ds.map(lambda r: r)._plan)
    assert [type(o) for o in ops] == [SourceSpec, TaskStageSpec, TaskStageSpec]


def test_a_stage_that_asks_for_nothing_fuses_into_a_task_stage_that_asks_for_cpus():
    ds = _ds().map_batches(lambda b: b, batch_size=4, num_cpus=1).map(lambda r: r)
    ops = plan(ds._plan)
    assert [type(o) for o in ops] == [SourceSpec, TaskStageSpec]
    assert len(ops[1].transforms) == 2 and dict(ops[1].resources) == {"CPU": 1.0}
    # but a stage that asks for other CPUs keeps its own tasks
    other = _ds().map_batches(lambda b: b, batch_size=4, num_cpus=1).map(lambda r: r, num_cpus=2)
    assert [type(o) for o in plan(other._plan)] == [SourceSpec, TaskStageSpec, TaskStageSpec]


def _batched(ds, **kwargs):
    return ds.map_batches(lambda b: b, batch_size=4, **kwargs)


def test_a_batched_stage_fuses_into_reads_that_are_one_of_its_batches_each():
    # range(12) in 3 blocks of 4 rows: each block is one batch of 4, so the reads run
    # the stage and its batches are the same
    ds = _batched(di.range(12, override_num_blocks=3)).filter(lambda r: True)
    ops = plan(ds._plan)
    assert [type(o) for o in ops] == [SourceSpec]
    assert len(ops[0].transforms) == 2
    assert ops[0].name == "Range[12]->MapBatches(<lambda>)->Filter(<lambda>)"
    # a block other than the last is shorter than a batch: its batches span blocks
    short_first = plan(_batched(di.range(11, override_num_blocks=3))._plan)  # 3, 4, 4 rows
    assert [type(o) for o in short_first] == [SourceSpec, TaskStageSpec]
    assert [type(o) for o in plan(_batched(di.range(10, override_num_blocks=4))._plan)] == [
        SourceSpec,  # 2, 3, 2, 3 rows: blocks shorter than a batch, re-cut into batches
        TaskStageSpec,
    ]


def _closing_over(table):
    def look_up(batch):
        batch["x"] = table[: len(batch["id"])]
        return batch

    return look_up


def test_a_stage_that_asks_for_cpus_fuses_into_the_reads_and_they_ask_for_them():
    # as Ray fuses a read with map_batches(num_cpus=1): one task a block, not a read, a
    # transfer and a task; the fused task asks Dask for the stage's CPU
    ds = _batched(di.range(12, override_num_blocks=3), num_cpus=1).map_batches(
        lambda b: b, batch_size=None, num_cpus=1
    )
    ops = plan(ds._plan)
    assert [type(o) for o in ops] == [SourceSpec]
    assert len(ops[0].transforms) == 2
    assert dict(ops[0].resources) == {"CPU": 1}
    assert "workers with {'CPU': 1.0}" in ds.explain()
    # a stage that asks for nothing still fuses after one that asked for a CPU, and the
    # reads without any such stage ask for nothing
    ds = _batched(di.range(12, override_num_blocks=3), num_cpus=1).map(lambda r: r)
    assert [type(o) for o in plan(ds._plan)] == [SourceSpec]
    assert dict(plan(di.range(12).map(lambda r: r)._plan)[0].resources) == {}
    # but not a large function after reads that ask for a CPU: it would travel as a
    # dependency held by one worker, and every read would go there
    big = _batched(di.range(12, override_num_blocks=3), num_cpus=1).map_batches(
        _closing_over(np.zeros(200_000)), batch_size=None
    )
    assert [type(o) for o in plan(big._plan)] == [SourceSpec, TaskStageSpec]


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda: _batched(di.range(16, override_num_blocks=2)), "two batches per block"),
        (lambda: _batched(di.range(12, override_num_blocks=3).map(lambda r: r)), "rows changed"),
        # a read on an accelerator's worker would take the threads that feed it
        (lambda: _batched(di.range(12, override_num_blocks=3), num_gpus=1), "a GPU"),
        # a large function travels as a dependency, which would pull every read (asking
        # for a CPU, so not pinned to a worker) to the one worker holding it
        (
            lambda: di.range(12, override_num_blocks=3).map_batches(
                _closing_over(np.zeros(200_000)), batch_size=4, num_cpus=1
            ),
            "a large function",
        ),
        (
            lambda: _batched(
                di.range(12, override_num_blocks=3).map_batches(
                    lambda b: b, batch_size=None, num_cpus=1
                ),
                num_cpus=2,
            ),
            "another number of CPUs",
        ),
        (lambda: _batched(di.range(12, override_num_blocks=3), concurrency=2), "concurrency"),
        (lambda: _batched(_ds()), "block rows unknown"),
    ],
)
def test_a_batched_stage_keeps_its_own_tasks_otherwise(make, why):
    ops = plan(make()._plan)
    assert isinstance(ops[-1], TaskStageSpec), why
    assert not any(getattr(t, "batch_size", None) for t in ops[0].transforms), (
        f"{why}: the reads must not run the batched stage"
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"batch_size": "big"}, "batch_size='big'"),
        ({"batch_format": "arrow"}, "batch_format='arrow'"),
        ({"num_gpus": -1}, "num_gpus=-1"),
        ({"resources": ["GPU"]}, "resources="),
        ({"fn_kwargs": [1]}, "fn_kwargs"),
        ({"compute": di.ActorPoolStrategy(size=1)}, "needs a callable class"),
        ({"concurrency": (1, 2)}, r"\(min, max\) pool applies to callable classes"),
    ],
)
def test_map_batches_validates_before_work(kwargs, match):
    with pytest.raises(di.PlanError, match=match):
        _ds().map_batches(lambda b: b, **kwargs)


def test_class_without_pool_is_refused_with_the_fix():
    with pytest.raises(di.PlanError, match=r"ActorPoolStrategy\(size=2\) or concurrency=2"):
        _ds().map_batches(Model)
    with pytest.raises(di.PlanError, match="must be a function or a callable class, not int"):
        _ds().map_batches(42)  # type: ignore[arg-type]


def test_pool_strategy_validation():
    with pytest.raises(di.PlanError, match="min_size must not exceed max_size"):
        di.ActorPoolStrategy(min_size=3, max_size=2)
    with pytest.raises(di.PlanError, match="size=0"):
        di.ActorPoolStrategy(size=0)
    with pytest.raises(di.PlanError, match="needs a size"):
        di.ActorPoolStrategy()
    assert di.ActorPoolStrategy(size=3).min_size == 3
    # as in Ray Data: min_size defaults to 1, max_size=None is no maximum
    assert di.ActorPoolStrategy(max_size=3).min_size == 1
    assert di.ActorPoolStrategy(min_size=3).max_size is None
    assert di.ActorPoolStrategy(min_size=1, max_size=4, initial_size=3).initial_size == 3
    with pytest.raises(
        di.PlanError, match=r"initial_size=5.*between min_size \(1\) and max_size \(4\)"
    ):
        di.ActorPoolStrategy(min_size=1, max_size=4, initial_size=5)
    with pytest.raises(di.PlanError, match="initial_size=1"):
        di.ActorPoolStrategy(min_size=2, initial_size=1)
    with pytest.raises(di.PlanError, match="disagree"):
        _ds().map_batches(Model, compute=di.ActorPoolStrategy(size=2), concurrency=3)


def test_projection_of_a_missing_column_fails_eagerly():
    with pytest.raises(di.PlanError, match=r"columns \['nope'\] do not exist"):
        _ds().select_columns(["nope"])
    with pytest.raises(di.PlanError, match="do not exist"):
        _ds().rename_columns({"b": "c"})
    assert _ds().add_column("b", lambda df: df["a"]).select_columns(["b"]).columns() == ["b"]
