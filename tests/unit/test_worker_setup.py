"""What the warm-up plugin does to each worker's interpreter as it joins."""

from __future__ import annotations

import sys
import types

import pytest

from daskinfer import DataContext
from daskinfer.cluster import WarmupPlugin


def _cpu_worker():
    return types.SimpleNamespace(state=types.SimpleNamespace(total_resources={"CPU": 1}))


@pytest.fixture
def restore_switch_interval():
    saved = sys.getswitchinterval()
    yield
    sys.setswitchinterval(saved)


def test_the_plugin_sets_the_switch_interval_it_was_given(restore_switch_interval):
    WarmupPlugin(freeze_gc=False, switch_interval_s=0.002).setup(_cpu_worker())
    assert sys.getswitchinterval() == pytest.approx(0.002)


def test_none_leaves_the_interpreter_as_it_started(restore_switch_interval):
    sys.setswitchinterval(0.004)
    WarmupPlugin(freeze_gc=False, switch_interval_s=None).setup(_cpu_worker())
    assert sys.getswitchinterval() == pytest.approx(0.004)


@pytest.mark.parametrize("bad", [0, -0.001, "1ms", True])
def test_a_switch_interval_that_is_not_a_positive_number_is_refused_with_the_fix(bad):
    with pytest.raises(ValueError, match=r"worker_switch_interval_s=.*positive number"):
        DataContext(worker_switch_interval_s=bad).resolved_worker_switch_interval_s()


def test_the_default_is_one_millisecond():
    assert DataContext().resolved_worker_switch_interval_s() == 0.001
    assert DataContext(worker_switch_interval_s=None).resolved_worker_switch_interval_s() is None
