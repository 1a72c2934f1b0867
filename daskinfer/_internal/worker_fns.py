"""Plain top-level functions that run on Dask workers (picklable by reference).

Every task that produces a block reports the block's row count and size to the client
through a Dask event (``Worker.log_event``), so the client can plan exact batches and
bound memory without fetching data or running an extra task per block.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from dask.local import get_sync
from distributed import get_worker, secede

from daskinfer._internal.batching import block_nbytes, concat_blocks, slice_block
from daskinfer._internal.transforms import Transform, apply_chain, user_code_error
from daskinfer.exceptions import ActorLostError

Slices = Sequence[tuple[int, int]]

META_TOPIC = "daskinfer-block-meta"


class SourcePartition:
    """One partition's task graph, opaque to Dask so it travels as plain data."""

    def __init__(self, graph: Mapping[Any, Any], key: Any) -> None:
        self.graph = dict(graph)
        self.key = key


def _report(run_id: str, block: pd.DataFrame, started: float) -> pd.DataFrame:
    worker = get_worker()
    worker.log_event(
        META_TOPIC,
        {
            "run": run_id,
            "key": str(worker.get_current_task()),
            "rows": len(block),
            "bytes": block_nbytes(block),
            "worker": worker.address,
            "seconds": time.perf_counter() - started,
        },
    )
    return block


def _gather_slices(slices: Slices, blocks: Sequence[pd.DataFrame]) -> pd.DataFrame:
    return concat_blocks([slice_block(b, s, e) for b, (s, e) in zip(blocks, slices, strict=True)])


def run_source(
    topic: str, partition: SourcePartition, transforms: Sequence[Transform]
) -> pd.DataFrame:
    """Compute one partition of the source dask DataFrame, then fused transforms."""
    started = time.perf_counter()
    block = get_sync(partition.graph, partition.key)
    if not isinstance(block, pd.DataFrame):
        block = pd.DataFrame(block)
    block = block.reset_index(drop=True)
    return _report(topic, apply_chain(transforms, block), started)


def run_chain(
    topic: str, transforms: Sequence[Transform], slices: Slices, *blocks: pd.DataFrame
) -> pd.DataFrame:
    """Concatenate row ranges of input blocks and apply fused transforms."""
    started = time.perf_counter()
    return _report(topic, apply_chain(transforms, _gather_slices(slices, blocks)), started)


def block_meta(block: pd.DataFrame) -> tuple[int, int]:
    """Rows and bytes of a block: the fallback when an event did not arrive."""
    return len(block), block_nbytes(block)


class PredictorHost:
    """The object a Dask actor holds: the user's predictor, built once on its worker.

    Calls come from tasks pinned to this worker (see ``run_actor_call``), which find the
    host in the worker's actor table. A lock serialises calls into one predictor, since
    several task threads may hold batches for it at once.
    """

    def __init__(
        self,
        cls: type,
        ctor_args: Sequence[Any],
        ctor_kwargs: Mapping[str, Any],
        stage: str,
    ) -> None:
        self.stage = stage
        self.lock = threading.Lock()
        self.calls = 0
        try:
            self.instance = cls(*ctor_args, **ctor_kwargs)
        except Exception as exc:
            raise user_code_error(f"{stage} (constructor)", exc) from exc


def run_actor_call(
    topic: str,
    actor: Any,
    transforms: Sequence[Transform],
    slices: Slices,
    *blocks: pd.DataFrame,
) -> pd.DataFrame:
    """Run one bundle through the predictor that ``actor`` holds on this worker.

    The task is pinned to the actor's worker, so the batch arrived here as an ordinary
    Dask dependency and the output stays here as an ordinary result; calling the
    predictor directly avoids the actor RPC hop and its per-worker single thread.
    """
    worker = get_worker()
    host = worker.state.actors.get(actor.key)
    if host is None:
        raise ActorLostError(
            f"predictor actor {actor.key} is not on worker {worker.address}; "
            "the worker was probably restarted"
        )
    block = _gather_slices(slices, blocks)
    if not host.lock.acquire(blocking=False):
        # another call holds this predictor: leave the worker's thread pool while
        # waiting, so that the thread can run a call for another actor meanwhile
        secede()
        host.lock.acquire()
    try:
        started = time.perf_counter()  # the predictor's own time, not the wait for it
        host.calls += 1
        out = apply_chain(transforms, block, host.instance)
    finally:
        host.lock.release()
    return _report(topic, out, started)
