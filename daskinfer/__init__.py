"""daskinfer: offline batch inference on Dask, with Ray Data's API.

>>> import daskinfer as di
>>> ds = di.from_items([{"x": 1}, {"x": 2}]).map_batches(lambda b: {"y": b["x"] * 10})
>>> ds.take_all()  # doctest: +SKIP
[{'y': 10}, {'y': 20}]
"""

from __future__ import annotations

from daskinfer.cluster import current_client, init, shutdown
from daskinfer.compute import ActorPoolStrategy, TaskPoolStrategy
from daskinfer.context import DataContext
from daskinfer.dataset import Dataset
from daskinfer.exceptions import (
    ActorLostError,
    DaskInferError,
    ExecutionTimeoutError,
    PlacementError,
    PlanError,
    UserCodeError,
)
from daskinfer.grouped import GroupedData
from daskinfer.io.readers import (
    from_arrow,
    from_dask,
    from_huggingface,
    from_items,
    from_numpy,
    from_pandas,
    from_torch,
    range,
    range_tensor,
    read_binary_files,
    read_csv,
    read_images,
    read_json,
    read_numpy,
    read_parquet,
    read_sql,
    read_text,
)
from daskinfer.metrics import OperatorStats, RunStats

__version__ = "0.1.0"

__all__ = [
    "ActorLostError",
    "ActorPoolStrategy",
    "DaskInferError",
    "DataContext",
    "Dataset",
    "ExecutionTimeoutError",
    "GroupedData",
    "OperatorStats",
    "PlacementError",
    "PlanError",
    "RunStats",
    "TaskPoolStrategy",
    "UserCodeError",
    "__version__",
    "current_client",
    "from_arrow",
    "from_dask",
    "from_huggingface",
    "from_items",
    "from_numpy",
    "from_pandas",
    "from_torch",
    "init",
    "range",
    "range_tensor",
    "read_binary_files",
    "read_csv",
    "read_images",
    "read_json",
    "read_numpy",
    "read_parquet",
    "read_sql",
    "read_text",
    "shutdown",
]
