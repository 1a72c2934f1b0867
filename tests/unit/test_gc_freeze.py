"""The client's freeze of the garbage collector lasts exactly as long as its runs."""

from __future__ import annotations

import gc

import pytest

from daskinfer._internal.gc_freeze import RunFreeze


@pytest.fixture(autouse=True)
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_a_run_freezes_what_exists_and_unfreezes_at_its_end():
    run = RunFreeze()
    run.hold()
    assert gc.get_freeze_count() > 0
    run.hold()  # holding twice is one hold
    run.release()
    assert gc.get_freeze_count() == 0
    run.release()  # and releasing twice is harmless
    assert gc.get_freeze_count() == 0


def test_overlapping_runs_share_one_freeze_until_the_last_ends():
    first, second = RunFreeze(), RunFreeze()
    first.hold()
    second.hold()
    first.release()
    assert gc.get_freeze_count() > 0, "the second run is still going"
    second.release()
    assert gc.get_freeze_count() == 0


def test_a_freeze_made_by_the_user_is_left_alone():
    gc.freeze()
    before = gc.get_freeze_count()
    run = RunFreeze()
    run.hold()
    run.release()
    # (objects frozen may still be freed by reference counting; unfrozen, the count is 0)
    assert gc.get_freeze_count() > before // 2
