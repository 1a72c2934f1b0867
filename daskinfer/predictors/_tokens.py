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

#: what one extra forward pass costs, in padded tokens: kernel launches, Python, the
#: pooling. It stops the planner from splitting a batch into many tiny passes to save a
#: little padding. A rough figure for a small encoder on CPU; the cut is not sensitive to it.
SUB_BATCH_OVERHEAD_TOKENS = 256


def plan_sub_batches(
    lengths: Sequence[int] | np.ndarray,
    max_tokens: int | None,
    *,
    overhead_tokens: int = SUB_BATCH_OVERHEAD_TOKENS,
) -> list[np.ndarray]:
    """Row indices of each sub-batch, so that rows x longest length <= ``max_tokens``.

    With ``max_tokens=None`` the whole batch is one sub-batch, in input order. Otherwise
    the rows are sorted by length (stable, so equal lengths keep input order) and cut
    into runs of that order: among the cuts that keep every sub-batch within the budget,
    the one that computes the fewest tokens, counting ``overhead_tokens`` per sub-batch
    (a dynamic programme over the sorted lengths). Cutting greedily by budget alone
    would let a long row drag many short ones up to its width. A row longer than the
    budget on its own gets a sub-batch of one (callers prevent this by requiring
    ``max_tokens >= max_length``).

    >>> [s.tolist() for s in plan_sub_batches([3, 100, 2, 90], max_tokens=200, overhead_tokens=10)]
    [[2, 0], [3, 1]]
    """
    n = len(lengths)
    if n == 0:
        return []
    if max_tokens is None:
        return [np.arange(n)]
    lens = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lens, kind="stable")
    width = np.maximum(lens[order], 1)
    # best[j]: least cost of sub-batching the j shortest rows; cut[j]: where the last
    # sub-batch of that solution starts. A sub-batch of sorted rows i..j-1 is padded to
    # width[j-1] and fits when (j - i) * width[j-1] <= max_tokens.
    best = np.zeros(n + 1, dtype=np.float64)
    cut = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        w = int(width[j - 1])
        first = max(0, j - max(1, max_tokens // w))
        starts = np.arange(first, j)
        costs = best[first:j] + (j - starts) * w + overhead_tokens
        k = int(np.argmin(costs))
        best[j], cut[j] = costs[k], first + k
    out: list[np.ndarray] = []
    j = n
    while j > 0:
        out.append(order[cut[j] : j])
        j = int(cut[j])
    return out[::-1]


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
