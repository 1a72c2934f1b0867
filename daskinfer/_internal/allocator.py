"""glibc's malloc in a process that hosts a predictor.

Dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536`` (the config key
``distributed.nanny.pre-spawn-environ``), so that freed memory goes back to the OS. Setting
any such parameter also switches off glibc's dynamic mmap threshold, which then stays at
128 KiB: every larger allocation becomes its own ``mmap`` and every free its own
``munmap``, and the pages are faulted in and zeroed again on the next use. A model's forward
pass allocates and frees intermediate tensors of a few MiB on every call, so in a worker it
runs measurably slower than in a plain process (all-MiniLM-L6-v2 on one CPU thread: 74
against 86 rows/s; ``docs/benchmarks.md``). Raising the mmap threshold in the processes that
host predictors gives the speed back and keeps Dask's trimming of the heap's top.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
import threading

logger = logging.getLogger("daskinfer")

#: glibc's ``M_MMAP_THRESHOLD`` parameter number for ``mallopt``
M_MMAP_THRESHOLD = -3
#: the largest mmap threshold glibc accepts on a 64-bit machine (``HEAP_MAX_SIZE / 2``)
MAX_MMAP_THRESHOLD = 32 * 2**20

_lock = threading.Lock()
_applied: int | None = None


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2``."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 - absent outside glibc (musl has no mallopt)
    except (OSError, AttributeError):
        return None
    if hasattr(libc, "mallinfo2"):  # glibc >= 2.33
        libc.mallinfo2.restype = _MallInfo2
    return libc


def set_mmap_threshold(nbytes: int) -> bool:
    """Serve allocations below ``nbytes`` from the heap in this process; ``True`` if applied.

    Once per process and value (a worker may host several actors). A no-op returning
    ``False`` where the C library is not glibc.
    """
    global _applied
    with _lock:
        if _applied == nbytes:
            return True
        libc = _libc()
        if libc is None:
            return False
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(nbytes)))
        if ok:
            _applied = nbytes
            logger.debug("malloc: mmap threshold set to %d bytes", nbytes)
        return ok


def mmapped_bytes() -> int | None:
    """Bytes this process holds in blocks that malloc got by ``mmap`` (glibc >= 2.33)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    return int(libc.mallinfo2().hblkhd)
