"""A Dask worker preload that lowers the CPU priority of a worker that runs CPU stages.

A pipeline's latency-sensitive processes are few and need little CPU: the scheduler, the
client (daskinfer's executor loop and the consumer of ``iter_batches``) and the workers
that drive accelerators. CPU stages are the opposite: they burn every core they get, and
when they do, a message from the client to an actor waits for the CPU behind them (W2
measured about 50 ms from submission to start while two CPU workers burned both cores).
A worker started with this preload runs at a lower priority (a higher niceness), so the
kernel runs the others first whenever they are ready and gives the rest to the CPU
stages: a busy machine's throughput is unchanged, its feeding latency drops. Ray starts
its workers at niceness 15 for the same reason (its ``worker_niceness``).

The embedded cluster (``di.init()``) starts its CPU workers with it. For a cluster of
your own, on the CPU workers only (not on those with GPUs)::

    dask worker tcp://scheduler:8786 --preload daskinfer.worker_priority
    DASKINFER_WORKER_NICENESS=10 dask worker ... --preload daskinfer.worker_priority

A process can lower its own priority but not raise it back (without privileges), so the
worker keeps this niceness until it exits; one that restarts gets it again.
"""

from __future__ import annotations

import logging
import os
from typing import Any

__all__ = ["DEFAULT_NICENESS", "dask_setup", "lower_priority"]

DEFAULT_NICENESS = 15  # Ray's worker_niceness
_ENV = "DASKINFER_WORKER_NICENESS"

logger = logging.getLogger(__name__)


def lower_priority(niceness: int | None = None) -> int:
    """Raise this process's niceness to ``niceness`` (never lower it); return the new one.

    ``None`` reads ``DASKINFER_WORKER_NICENESS``, else ``DEFAULT_NICENESS``.
    """
    if niceness is None:
        niceness = _niceness_from_env()
    current = os.nice(0)
    if niceness > current:
        return os.nice(niceness - current)
    return current


def dask_setup(worker: Any) -> None:
    """Dask's preload hook: runs once in each worker process as it starts."""
    try:
        niceness = lower_priority()
    except (OSError, ValueError) as exc:  # a platform without nice, or a bad setting
        logger.warning("daskinfer.worker_priority: priority left as it was (%s)", exc)
        return
    logger.debug("daskinfer.worker_priority: worker %s at niceness %d", worker.name, niceness)


def _niceness_from_env() -> int:
    raw = os.environ.get(_ENV)
    if raw is None:
        return DEFAULT_NICENESS
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{_ENV}={raw!r}: use an integer from 0 to 19") from None
    if not 0 <= value <= 19:
        raise ValueError(f"{_ENV}={raw!r}: use an integer from 0 to 19")
    return value
