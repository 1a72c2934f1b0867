"""How a stage's transforms (the user's functions, wrapped) travel to the workers.

Small ones, the common case (a function, a closure over a few settings), travel inside
every task: the client pickles them once per run, and each worker process unpickles them
once per run and stage (``ShippedTransforms.load``). Large ones (a function that closes
over a tokenizer or a lookup table) travel as the result of one task, which every worker
fetches once as an ordinary dependency.

Why not always that dependency: Dask sends a task to a worker that holds one of its
dependencies (``decide_worker`` looks no further), and the transforms' result sits on one
worker. A task whose only other dependency is small, or which has none (a read), went to
that worker: a read fused with a stage that asks for a CPU went there every time, all
200 of W2's (eleventh session, docs/benchmarks.md), and the stage's own tasks leaned
towards it. Travelling inside the task, the transforms leave placement to the data and
the resources.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import cloudpickle

from daskinfer.exceptions import PlanError

#: the most pickled bytes that travel inside every task; beyond it, one dependency
INLINE_LIMIT_BYTES = 32 * 1024

# pickled size of each transform the planner asked about (it decides fusion on it)
_sizes: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

# on workers: the transforms of recent runs' stages, unpickled once each
_loaded: collections.OrderedDict[str, tuple[Any, ...]] = collections.OrderedDict()
_loaded_lock = threading.Lock()
_LOADED_KEPT = 32


@dataclasses.dataclass(frozen=True)
class ShippedTransforms:
    """A stage's transforms, pickled once, inside every task of the stage."""

    key: str  # the run and the stage, with a digest of the payload
    payload: bytes

    @property
    def inline(self) -> bool:
        """Whether they are small enough to travel inside every task."""
        return len(self.payload) <= INLINE_LIMIT_BYTES

    def load(self) -> tuple[Any, ...]:
        """The transforms, unpickled once per worker process (every task of the stage on
        a worker shares them, as with the dependency they replace)."""
        with _loaded_lock:
            hit = _loaded.get(self.key)
            if hit is not None:
                _loaded.move_to_end(self.key)
                return hit
            value = unpickle(self.payload)
            _loaded[self.key] = value
            while len(_loaded) > _LOADED_KEPT:
                _loaded.popitem(last=False)
            return value


def ship(transforms: Sequence[Any], key: str, stage: str) -> ShippedTransforms:
    """``transforms``, pickled once, for the tasks of ``stage``.

    Raises ``PlanError`` naming ``stage`` where they cannot be pickled, before any of
    the run's work: the error Dask would give at the first task names neither.
    """
    try:
        payload = cloudpickle.dumps(tuple(transforms), protocol=5)
    except Exception as exc:  # whatever pickling raises, the fix is the same
        raise PlanError(
            f"{stage}: its function cannot be pickled to send it to the workers "
            f"({type(exc).__name__}: {exc}). Create what it holds (a lock, a connection, "
            "a client, an open file) inside the function, or pass a class with "
            "concurrency= and build it in __init__: each actor does that once."
        ) from exc
    digest = hashlib.blake2b(payload, digest_size=8).hexdigest()
    return ShippedTransforms(f"{key}-{digest}", payload)


def unpickle(payload: bytes) -> tuple[Any, ...]:
    """A task whose result is the transforms: large ones travel as that one result,
    which each worker fetches once as a dependency."""
    return tuple(cloudpickle.loads(payload))


class _TooLarge(Exception):
    pass


class _BoundedSink:
    """A file that counts what is written to it and stops the pickler past the limit."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: Any) -> int:
        self.size += memoryview(data).nbytes
        if self.size > INLINE_LIMIT_BYTES:
            raise _TooLarge
        return memoryview(data).nbytes


def pickled_size(transform: Any) -> int:
    """Bytes ``transform`` pickles to, up to one more than the limit (cached per
    transform: the planner asks on every ``plan``, ``explain`` included).

    The pickler writes to a sink that stops it past the limit, so a function closing
    over a large model is not pickled whole just to learn that it is large. One more
    than the limit, too, where it cannot be pickled (``ship`` then raises, naming the
    stage).
    """
    size = _sizes.get(transform)
    if size is None:
        sink = _BoundedSink()
        try:
            cloudpickle.CloudPickler(sink, protocol=5).dump(transform)
            size = sink.size
        except Exception:  # noqa: BLE001  # too large, or reported by ship at the run's start
            size = INLINE_LIMIT_BYTES + 1
        _sizes[transform] = size
    return size


def travel_inline(transforms: Sequence[Any]) -> bool:
    """Whether ``transforms``, together, are small enough to travel inside every task."""
    return sum(pickled_size(t) for t in transforms) <= INLINE_LIMIT_BYTES


def unship(transforms: Any) -> Any:
    """What a worker function got as its transforms, as the tuple of them."""
    return transforms.load() if isinstance(transforms, ShippedTransforms) else transforms
