"""``random_sample``: keep each row with a given probability, in place, on the workers."""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import numpy as np
import pandas as pd

from daskinfer._internal.tensor import TensorDtype
from daskinfer._internal.transforms import Transform


@dataclasses.dataclass(frozen=True, eq=False)
class SampleTransform(Transform):
    """Keep each row of a block with probability ``fraction``; rows keep their order.

    With a ``seed``, a block's draws come from the seed and the block's own contents,
    so running the same pipeline over the same data again keeps the same rows (as Ray
    Data's ``seed=`` does, where the seed and the task index pick the draws), while two
    blocks never share one stream of draws. Without one, every run draws afresh.
    """

    stage: str
    fraction: float
    seed: int | None = None

    def apply(self, block: pd.DataFrame, instance: Any = None) -> pd.DataFrame:
        if not len(block):
            return block
        if self.seed is None:
            rng = np.random.default_rng()
        else:
            rng = np.random.default_rng([self.seed, _block_digest(block), len(block)])
        keep = rng.random(len(block)) < self.fraction
        return block.iloc[np.flatnonzero(keep)]


def _block_digest(block: pd.DataFrame) -> int:
    """A 32-bit digest of a block's values, for the columns that can be hashed cheaply."""
    digest = 0
    for name in block.columns:
        col = block[name]
        if isinstance(col.dtype, TensorDtype):
            data = np.ascontiguousarray(col.array.values)  # type: ignore[attr-defined]
            digest = zlib.crc32(data.tobytes(), digest)
            continue
        try:
            hashes = pd.util.hash_pandas_object(col, index=False).to_numpy()
        except TypeError:  # values pandas cannot hash (arrays, dicts): leave them out
            continue
        digest = zlib.crc32(hashes.tobytes(), digest)
    return digest
