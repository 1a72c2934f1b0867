"""How a stage's transforms travel to the workers (daskinfer/_internal/shipping.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from daskinfer._internal import shipping
from daskinfer.exceptions import PlanError


def _add(n):
    def add(batch):
        return {"x": batch["x"] + n}

    return add


def test_small_transforms_travel_inside_the_task_and_load_once_per_process():
    shipped = shipping.ship((_add(1), _add(2)), "run-stage", "MapBatches(add)")
    assert shipped.inline and len(shipped.payload) <= shipping.INLINE_LIMIT_BYTES
    # a copy, as a worker gets it
    import pickle

    arrived = pickle.loads(pickle.dumps(shipped))
    first = shipping.unship(arrived)
    assert [int(f({"x": np.array([10])})["x"][0]) for f in first] == [11, 12]
    # every task of the stage on this worker shares one copy, as it shared the result
    # of the dependency this replaces
    assert shipping.unship(pickle.loads(pickle.dumps(shipped))) is first
    # another run (or stage) gets its own
    assert (
        shipping.unship(shipping.ship((_add(1), _add(2)), "run2-stage", "MapBatches(add)"))
        is not first
    )


def test_large_transforms_do_not_travel_inside_the_task():
    table = np.arange(100_000, dtype=np.float64)  # 800 KB in the closure

    def look_up(batch):
        return {"x": table[batch["x"]]}

    shipped = shipping.ship((look_up,), "run-stage", "MapBatches(look_up)")
    assert not shipped.inline
    # they travel as one task's result instead
    (loaded,) = shipping.unpickle(shipped.payload)
    assert loaded({"x": np.array([3])})["x"][0] == 3.0
    assert not shipping.travel_inline((look_up,))
    assert shipping.travel_inline((_add(1), _add(2)))
    # together: each of these is under the limit, the two are over it
    half = np.arange(2_500, dtype=np.float64)  # 20 KB

    def first(batch):
        return {"x": half[batch["x"]]}

    def second(batch):
        return {"x": half[batch["x"]] + 1}

    assert shipping.travel_inline((first,)) and shipping.travel_inline((second,))
    assert not shipping.travel_inline((first, second))


def test_unpicklable_transforms_are_not_shipped_inline():
    lock = threading.Lock()

    def locked(batch):
        with lock:
            return batch

    assert not shipping.travel_inline((locked,))
    with pytest.raises(PlanError, match=r"MapBatches\(locked\): its function cannot be pickled"):
        shipping.ship((locked,), "run-stage", "MapBatches(locked)")


def test_a_tuple_of_transforms_passes_through():
    fns = (_add(1),)
    assert shipping.unship(fns) is fns
    assert shipping.unship(()) == ()
