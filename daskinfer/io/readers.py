"""Create Datasets: the readers and sources, gathered for ``daskinfer``'s namespace.

- ``memory``: data the driver holds or generates (pandas, Arrow, numpy, Python objects,
  dask, ``range``, torch and Hugging Face datasets);
- ``files``: files on any fsspec URL (Parquet, CSV, JSON, text, binary, images, numpy);
- ``sql``: a query read on the workers;
- ``_source``: what they share (the Dataset over a dask frame, block counts).
"""

from __future__ import annotations

from daskinfer.io._source import keep_object_columns
from daskinfer.io.files import (
    IMAGE_EXTENSIONS,
    expand_paths,
    parquet_frame,
    read_binary_files,
    read_csv,
    read_images,
    read_json,
    read_numpy,
    read_parquet,
    read_text,
)
from daskinfer.io.memory import (
    from_arrow,
    from_dask,
    from_huggingface,
    from_items,
    from_numpy,
    from_pandas,
    from_torch,
    range,
    range_tensor,
)
from daskinfer.io.sql import SQL_DEFAULT_SHARDS, read_sql

__all__ = [
    "IMAGE_EXTENSIONS",
    "SQL_DEFAULT_SHARDS",
    "expand_paths",
    "from_arrow",
    "from_dask",
    "from_huggingface",
    "from_items",
    "from_numpy",
    "from_pandas",
    "from_torch",
    "keep_object_columns",
    "parquet_frame",
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
]
