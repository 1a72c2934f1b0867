"""Token-aware sub-batching: cut a batch of texts into sub-batches by token budget.

A transformer's cost grows with rows x padded width, and a batch padded to its longest
row wastes the difference. With long-tailed lengths (most texts short, a few very long)
fixed batches in input order pad nearly every batch to a long row. Sorting the rows of
the batch a predictor receives by length and cutting sub-batches of at most
``max_tokens`` (rows x longest length) keeps short rows with short rows; the outputs are
put back in input order afterwards. Only the batch at hand is sorted (a bounded window),
so nothing waits for rows that have not arrived yet.

Pure numpy, no model: unit-testable, and shared by every Hugging Face text predictor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


def plan_sub_batches(lengths: Sequence[int], max_tokens: int | None) -> list[np.ndarray]:
    """Row indices of each sub-batch, so that rows x longest length <= ``max_tokens``.

    With ``max_tokens=None`` the whole batch is one sub-batch, in input order. Otherwise
    the rows are sorted by length (stable, so equal lengths keep input order) and cut
    greedily: a sub-batch grows while ``(rows + 1) * max(length)`` stays within the
    budget. A row longer than the budget on its own gets a sub-batch of one (callers
    prevent this by requiring ``max_tokens >= max_length``).

    >>> [s.tolist() for s in plan_sub_batches([3, 10, 2, 9], max_tokens=20)]
    [[2, 0], [3, 1]]
    """
    n = len(lengths)
    if n == 0:
        return []
    if max_tokens is None:
        return [np.arange(n)]
    lens = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lens, kind="stable")
    out: list[np.ndarray] = []
    start = 0
    for i in range(1, n + 1):
        # rows start..i-1 so far; the sorted order makes lens[order[i]] the new maximum
        if i == n or (i - start + 1) * max(int(lens[order[i]]), 1) > max_tokens:
            out.append(order[start:i])
            start = i
    return out


def padded_tokens(lengths: np.ndarray, sizes: Sequence[int]) -> int:
    """Tokens computed by consecutive chunks of ``sizes`` rows, each padded to its longest."""
    total, start = 0, 0
    for size in sizes:
        chunk = lengths[start : start + size]
        if len(chunk):
            total += len(chunk) * int(chunk.max())
        start += size
    return total


@dataclasses.dataclass
class TokenCounters:
    """Padding counters accumulated over calls, read and reset by ``take``.

    ``tokens_real``: real (unpadded) tokens. ``tokens_padded``: tokens the model actually
    computed, padding included. ``tokens_padded_in_order``: what the same number of
    sub-batches with the same row counts, cut from the batch in input order, would have
    computed: the "before" of token-aware batching, equal to ``tokens_padded`` without it.
    """

    tokens_real: int = 0
    tokens_padded: int = 0
    tokens_padded_in_order: int = 0

    def add(self, lengths: np.ndarray, sub_batches: Sequence[np.ndarray]) -> None:
        """Count one batch cut into ``sub_batches`` (row indices into ``lengths``)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        self.tokens_real += int(lengths.sum())
        self.tokens_padded += sum(len(s) * int(lengths[s].max()) for s in sub_batches if len(s))
        self.tokens_padded_in_order += padded_tokens(lengths, [len(s) for s in sub_batches])

    def take(self) -> dict[str, float]:
        """The counters since the previous ``take``, then zero them."""
        out = {k: float(v) for k, v in dataclasses.asdict(self).items()}
        self.tokens_real = self.tokens_padded = self.tokens_padded_in_order = 0
        return out
