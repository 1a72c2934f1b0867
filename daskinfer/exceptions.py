"""Exceptions raised by daskinfer.

The whole hierarchy::

    DaskInferError                      base class; never raised directly
    ├── PlanError(ValueError)           an invalid pipeline or argument, raised by the call
    │                                   that received it, before any work starts
    ├── PlacementError                  no worker offers the resources a stage asks for
    ├── UserCodeError                   a user's function or predictor raised; chained
    │                                   ("from") to the original, which keeps the worker's
    │                                   traceback; carries the stage name
    ├── ActorLostError                  the worker holding a predictor actor went away
    └── ExecutionTimeoutError(TimeoutError)

Every exception survives a pickle round trip, so it can travel between processes.
"""

from __future__ import annotations

__all__ = [
    "ActorLostError",
    "DaskInferError",
    "ExecutionTimeoutError",
    "PlacementError",
    "PlanError",
    "UserCodeError",
]


class DaskInferError(Exception):
    """Base class of every error daskinfer raises."""


class PlanError(DaskInferError, ValueError):
    """An invalid pipeline or argument, raised eagerly by the call that received it."""


class PlacementError(DaskInferError):
    """No worker of the cluster offers the resources that a stage asks for."""


class UserCodeError(DaskInferError):
    """A user's function or predictor raised an exception on a worker.

    The original exception is the ``__cause__`` and keeps its traceback from the
    worker; ``stage`` names the pipeline stage that ran it.
    """

    def __init__(self, message: str, stage: str = "") -> None:
        super().__init__(message)
        self.stage = stage

    def __reduce__(self) -> tuple[type[UserCodeError], tuple[str, str]]:
        return (type(self), (str(self), self.stage))


class ActorLostError(DaskInferError):
    """The worker that held a predictor actor left the cluster."""


class ExecutionTimeoutError(DaskInferError, TimeoutError):
    """A stage or a batch took longer than its time limit."""
