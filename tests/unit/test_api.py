"""Always-on checks: the public API, exception pickling, light imports."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

import daskinfer as di
from daskinfer import exceptions


def test_all_names_exist_and_are_sorted():
    for name in di.__all__:
        assert hasattr(di, name), name
    assert list(di.__all__) == sorted(di.__all__)


def test_every_exception_is_exported_and_pickles():
    for name in exceptions.__all__:
        assert getattr(di, name) is getattr(exceptions, name)
    errors = [
        di.PlanError("bad plan"),
        di.PlacementError("no GPU"),
        di.UserCodeError("boom", "MapBatches(f)"),
        di.ActorLostError("gone"),
        di.ExecutionTimeoutError("slow"),
    ]
    for err in errors:
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)
        assert isinstance(back, di.DaskInferError)
    assert pickle.loads(pickle.dumps(errors[2])).stage == "MapBatches(f)"
    assert isinstance(di.PlanError("x"), ValueError)
    assert isinstance(di.ExecutionTimeoutError("x"), TimeoutError)


def test_import_loads_no_heavy_library():
    code = (
        "import sys, daskinfer; "
        "heavy = [m for m in ('torch', 'transformers', 'dask_cuda', 'tensorflow', 'cupy') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_client_side_objects_refuse_pickling():
    from daskinfer._internal.executor import StreamingExecutor
    from daskinfer._internal.operators import Operator

    for cls in (StreamingExecutor, Operator):
        obj = cls.__new__(cls)
        with pytest.raises(TypeError, match="must not be pickled"):
            pickle.dumps(obj)


def test_readme_carries_the_ci_test_command():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    ci = (root / ".ci" / "run").read_text()
    command = ci.split("TEST_COMMAND='")[1].split("'\n")[0]
    assert command in (root / "README.md").read_text()
