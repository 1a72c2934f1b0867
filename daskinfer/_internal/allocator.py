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
``keep_freed_memory`` goes further for those processes: freed memory stays for reuse.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
import threading

logger = logging.getLogger("daskinfer")

#: glibc's ``mallopt`` parameter numbers
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
M_ARENA_MAX = -8
#: free memory a predictor's process keeps at the top of a heap before giving it back
KEPT_FREE_BYTES = 2**30
#: the extra memory an arena asks for when it grows, and keeps when it could shrink: at
#: least the size of a thread arena's heap (64 MiB), so that glibc never unmaps one
KEPT_PAD_BYTES = 64 * 2**20
#: the largest mmap threshold glibc accepts on a 64-bit machine (``HEAP_MAX_SIZE / 2``)
MAX_MMAP_THRESHOLD = 32 * 2**20

_lock = threading.Lock()
_applied: int | None = None
_keeping = False


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


def keep_freed_memory() -> bool:
    """Let this process reuse the memory it frees instead of handing it back to the OS
    and faulting it in again; ``True`` if applied.

    A thread other than the main one allocates from an arena of its own, made of heaps
    of at most 64 MiB, and glibc unmaps such a heap as soon as all of it is free,
    whatever the trim threshold; larger blocks are mmaps of their own. A forward pass
    that allocates and frees tensors of tens of MiB on every call (MiniLM's attention
    over a batch of 256 rows: about 50 MiB a layer) faults them in and zeroes them
    again each time: measured in W3's predictor thread, 200,000-260,000 minor page
    faults and 0.5-0.7 s of system time in a call of about 4 s, in Dask's workers as in
    Ray Data's. Here no block gets an mmap of its own (``M_MMAP_MAX`` 0), a heap keeps
    up to ``KEPT_FREE_BYTES`` free at its top and at least ``KEPT_PAD_BYTES`` of pad,
    which also keeps glibc from unmapping a thread's heaps, and threads that start from
    now on (the predictor's) share the main heap (``M_ARENA_MAX`` 1). The pad alone
    kept a test loop of attention tensors from faulting, but not MiniLM (191,000 faults
    a call); one heap alone left which arena the predictor's thread got to chance (a
    test's second call faulted 73,746 times, its first 12). Together: 28,600 faults and
    0.08 s of system time a call, and 3.2-3.3 s of CPU against 4.0-4.7 s. The process
    keeps the memory of its largest call, and its new threads share one malloc lock.
    Once per process; a no-op returning ``False`` where the C library is not glibc.
    """
    global _keeping
    with _lock:
        if _keeping:
            return True
        libc = _libc()
        if libc is None:
            return False
        ok = all(
            libc.mallopt(param, ctypes.c_int(value))
            for param, value in (
                (M_TRIM_THRESHOLD, KEPT_FREE_BYTES),
                (M_TOP_PAD, KEPT_PAD_BYTES),
                (M_MMAP_MAX, 0),
                (M_ARENA_MAX, 1),
            )
        )
        if ok:
            _keeping = True
            logger.debug("malloc: freed memory kept for reuse")
        return ok


def mmapped_bytes() -> int | None:
    """Bytes this process holds in blocks that malloc got by ``mmap`` (glibc >= 2.33)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    return int(libc.mallinfo2().hblkhd)
