"""Compute strategies for ``map_batches``: tasks (functions) or an actor pool (classes)."""

from __future__ import annotations

import dataclasses

from daskinfer.exceptions import PlanError

__all__ = ["ActorPoolStrategy", "TaskPoolStrategy"]


@dataclasses.dataclass(frozen=True)
class ActorPoolStrategy:
    """Run a callable class in a pool of Dask actors, each built once on its worker.

    Parameters
    ----------
    size
        A fixed pool of ``size`` actors. Mutually exclusive with ``min_size``/``max_size``.
    min_size, max_size
        An autoscaling pool: it starts with ``initial_size`` actors (``min_size`` unless
        given), adds one while batches wait for a free actor (up to ``max_size``, and only
        where a worker has room), and releases actors that stay idle
        (``DataContext.actor_idle_timeout_s``), down to ``min_size``. As in Ray Data,
        ``min_size`` defaults to 1 and ``max_size=None`` sets no maximum: the pool grows
        as far as the workers that offer its resources have room.
    initial_size
        Actors to start with, between ``min_size`` and ``max_size``.
    max_tasks_in_flight_per_actor
        Batches queued or running per actor; defaults to the DataContext's setting.

    Examples
    --------
    >>> ActorPoolStrategy(size=2)
    ActorPoolStrategy(size=2, min_size=2, max_size=2, initial_size=2, max_tasks_in_flight_per_actor=None)
    >>> ActorPoolStrategy(min_size=1, max_size=4).max_size
    4
    >>> ActorPoolStrategy(min_size=2).max_size is None  # no maximum
    True
    """

    size: int | None = None
    min_size: int | None = None
    max_size: int | None = None
    initial_size: int | None = None
    max_tasks_in_flight_per_actor: int | None = None

    def __post_init__(self) -> None:
        size, lo, hi, initial = self.size, self.min_size, self.max_size, self.initial_size
        for name, value in (
            ("size", size),
            ("min_size", lo),
            ("max_size", hi),
            ("initial_size", initial),
        ):
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise PlanError(
                    f"ActorPoolStrategy({name}={value!r}): {name} must be an integer >= 1"
                )
        if size is not None:
            if (lo is not None and lo != size) or (hi is not None and hi != size):
                raise PlanError(
                    f"ActorPoolStrategy(size={size}, min_size={lo}, max_size={hi}): "
                    "give either size or min_size/max_size, not both"
                )
            lo = hi = size
        elif lo is None and hi is None:
            raise PlanError(
                "ActorPoolStrategy() needs a size: ActorPoolStrategy(size=n) or "
                "ActorPoolStrategy(min_size=m, max_size=n)"
            )
        lo = lo if lo is not None else 1
        if hi is not None and lo > hi:
            raise PlanError(
                f"ActorPoolStrategy(min_size={lo}, max_size={hi}): min_size must not "
                "exceed max_size"
            )
        initial = initial if initial is not None else lo
        if initial < lo or (hi is not None and initial > hi):
            raise PlanError(
                f"ActorPoolStrategy(initial_size={initial}): it must lie between min_size "
                f"({lo}) and max_size ({'no maximum' if hi is None else hi})"
            )
        depth = self.max_tasks_in_flight_per_actor
        if depth is not None and (not isinstance(depth, int) or depth < 1):
            raise PlanError(
                f"ActorPoolStrategy(max_tasks_in_flight_per_actor={depth!r}) must be an "
                "integer >= 1"
            )
        object.__setattr__(self, "min_size", lo)
        object.__setattr__(self, "max_size", hi)
        object.__setattr__(self, "initial_size", initial)


@dataclasses.dataclass(frozen=True)
class TaskPoolStrategy:
    """Run a function as Dask tasks, at most ``size`` at a time when given."""

    size: int | None = None

    def __post_init__(self) -> None:
        if self.size is not None and (not isinstance(self.size, int) or self.size < 1):
            raise PlanError(f"TaskPoolStrategy(size={self.size!r}) must be an integer >= 1")
