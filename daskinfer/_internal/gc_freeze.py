"""Keep Python's full garbage collections short while a pipeline runs.

A full (generation 2) collection walks every tracked object of the process. In a Dask
process that is hundreds of thousands of objects from the imports alone (distributed,
pandas, pyarrow; torch and transformers on accelerator workers), and one collection took
70-120 ms here, once or twice per process in a 4.5 s run of W2: a worker's burn, the
scheduler (in the client process for a local cluster) or a predictor's worker stood
still for that long. ``gc.freeze()`` moves the objects that exist now to a permanent
generation that collections skip; objects made afterwards are collected as before.

Workers freeze once, after start-up imports (``freeze_after_startup``): what exists then
lives as long as the process. The client freezes for the length of a run only
(``RunFreeze``) and unfreezes at its end, so that the user's own objects are never kept
from collection after the run.
"""

from __future__ import annotations

import gc
import threading

_lock = threading.Lock()
_runs = 0  # runs in this process that hold the freeze
_frozen_by_us = False


def freeze_after_startup() -> bool:
    """Collect, then freeze the objects of a freshly started process (once per process).

    Returns whether it froze: not if something in the process froze already (a second
    registration of the warm-up plugin, or the user's own ``gc.freeze()``).
    """
    if gc.get_freeze_count():
        return False
    gc.collect()
    gc.freeze()
    return True


class RunFreeze:
    """Hold the client process's objects frozen while at least one run is going.

    Nested or concurrent runs share one freeze; the last to end unfreezes. A process
    that was frozen before the first run (by the user) is left as it is.
    """

    def __init__(self) -> None:
        self._held = False

    def hold(self) -> None:
        global _runs, _frozen_by_us
        if self._held:
            return
        with _lock:
            if _runs == 0 and not gc.get_freeze_count():
                gc.freeze()
                _frozen_by_us = True
            _runs += 1
        self._held = True

    def release(self) -> None:
        global _runs, _frozen_by_us
        if not self._held:
            return
        self._held = False
        with _lock:
            _runs -= 1
            if _runs == 0 and _frozen_by_us:
                gc.unfreeze()
                _frozen_by_us = False
