from __future__ import annotations

import contextvars
import threading

import pytest

from daskinfer._internal.worker_fns import PredictorThread

where = contextvars.ContextVar("where", default="unset")


def test_jobs_run_in_order_on_one_thread_with_the_callers_context():
    runner = PredictorThread("daskinfer-predictor-test")
    try:
        where.set("caller")
        seen = [runner.run(lambda i=i: (i, threading.get_ident(), where.get())) for i in range(5)]
        assert [s[0] for s in seen] == list(range(5))
        assert len({s[1] for s in seen}) == 1
        assert seen[0][1] != threading.get_ident()
        assert {s[2] for s in seen} == {"caller"}
        # from its own thread (a predictor calling back into the host), run is a plain call
        assert runner.run(lambda: runner.run(lambda: threading.get_ident())) == seen[0][1]
    finally:
        runner.close()


def test_an_exception_reaches_the_caller_and_the_thread_goes_on():
    runner = PredictorThread("daskinfer-predictor-test")
    try:
        with pytest.raises(ZeroDivisionError):
            runner.run(lambda: 1 / 0)
        assert runner.run(lambda x, y=0: x + y, 2, y=3) == 5
    finally:
        runner.close()


def test_close_ends_the_thread():
    runner = PredictorThread("daskinfer-predictor-test")
    runner.close()
    runner._thread.join(timeout=5)
    assert not runner._thread.is_alive()
