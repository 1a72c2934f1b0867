"""The consumer's shuffle buffer of ``iter_batches(local_shuffle_buffer_size=...)``.

As Ray Data's ``ShufflingBatcher``: blocks are added as they arrive; a batch is drawn
only while the buffer holds at least ``min_rows`` rows (``local_shuffle_buffer_size``,
raised to ``batch_size``), and once no more blocks come the rest is drained. Every row
comes out exactly once; every batch but the last holds ``batch_size`` rows.

Drawing ``batch_size`` rows at random out of the buffer for each batch would copy the
buffer once per batch. Instead, as Ray does, the buffered rows are permuted once into a
"generation" and batches are consecutive slices of it; rows that arrive meanwhile wait
until the generation is down to half the buffer (or to less than a batch), then join
what is left of it in a new permutation. Each row is so copied about twice, and a batch
still mixes rows from across the buffer.

The draws depend only on the seed and on the rows, in their order: not on timing, nor
on where the blocks are cut (the executor sizes blocks by how fast the stages run, so
two runs cut the same rows differently). Rows are taken in, and the buffer decides
whether to draw, a batch's worth of rows at a time, wherever the block boundaries fall.
With the same seed and the rows in the same order (``preserve_order``, the default),
the batches are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import numpy as np
import pandas as pd

from daskinfer._internal.batching import concat_blocks, join_column_pieces

T = TypeVar("T")


class Rows(Generic[T]):
    """How to measure, join, permute and slice one kind of rows (numpy dict or pandas)."""

    def __init__(
        self,
        length: Callable[[T], int],
        concat: Callable[[Sequence[T]], T],
        take: Callable[[T, np.ndarray], T],
        cut: Callable[[T, int, int], T],
    ) -> None:
        self.length = length
        self.concat = concat
        self.take = take
        self.cut = cut


def _numpy_length(batch: dict[str, np.ndarray]) -> int:
    return len(next(iter(batch.values()))) if batch else 0


NUMPY_ROWS: Rows[dict[str, np.ndarray]] = Rows(
    _numpy_length,
    lambda pieces: (
        pieces[0]
        if len(pieces) == 1
        else {k: join_column_pieces([p[k] for p in pieces]) for k in pieces[0]}
    ),
    lambda batch, order: {k: v[order] for k, v in batch.items()},
    lambda batch, start, stop: {k: v[start:stop] for k, v in batch.items()},
)

PANDAS_ROWS: Rows[pd.DataFrame] = Rows(
    len,
    lambda pieces: concat_blocks(list(pieces)),
    lambda block, order: block.take(order).reset_index(drop=True),
    lambda block, start, stop: block.iloc[start:stop].reset_index(drop=True),
)


class LocalShuffleBuffer(Generic[T]):
    """Shuffled batches of ``batch_size`` rows out of the blocks added (see the module)."""

    def __init__(self, rows: Rows[T], batch_size: int, min_rows: int, seed: int | None) -> None:
        self._rows = rows
        self._batch_size = batch_size
        # Ray raises a buffer smaller than a batch to one batch: a batch is never short
        # of rows while more may come
        self._min_rows = max(min_rows, batch_size)
        self._rng = np.random.default_rng(seed)
        self._waiting: list[T] = []  # added since the last permutation
        self._waiting_rows = 0
        self._generation: T | None = None  # permuted rows, handed out from _head on
        self._generation_rows = 0
        self._head = 0
        self._intake = 0  # rows taken in since the buffer last decided whether to draw

    def _left(self) -> int:
        return self._generation_rows - self._head

    def add(self, piece: T) -> Iterator[T]:
        """Add rows; yield the batches that the buffer now holds enough rows for."""
        n = self._rows.length(piece)
        start = 0
        while start < n:
            # up to the end of this batch's worth of intake, or of the piece
            stop = min(n, start + self._batch_size - self._intake)
            self._waiting.append(
                piece if (start, stop) == (0, n) else self._rows.cut(piece, start, stop)
            )
            self._waiting_rows += stop - start
            self._intake += stop - start
            start = stop
            if self._intake == self._batch_size:
                self._intake = 0
                while self._left() + self._waiting_rows >= self._min_rows:
                    yield self._next(self._batch_size, done=False)

    def drain(self, drop_last: bool) -> Iterator[T]:
        """The rows still buffered, in batches; the last one short (or dropped)."""
        while self._left() + self._waiting_rows:
            if self._left() + self._waiting_rows < self._batch_size and drop_last:
                return
            yield self._next(self._batch_size, done=True)

    def _next(self, n: int, *, done: bool) -> T:
        left = self._left()
        if self._waiting and (done or left < n or left <= self._min_rows // 2):
            self._permute()
            left = self._left()
        assert self._generation is not None
        take = min(n, left)
        batch = self._rows.cut(self._generation, self._head, self._head + take)
        self._head += take
        return batch

    def _permute(self) -> None:
        """A new generation: what is left of this one and the rows waiting, permuted."""
        pieces = list(self._waiting)
        if self._generation is not None and self._left():
            rest = self._rows.cut(self._generation, self._head, self._generation_rows)
            pieces.insert(0, rest)
        everything = self._rows.concat(pieces)
        total = self._rows.length(everything)
        self._generation = self._rows.take(everything, self._rng.permutation(total))
        self._generation_rows = total
        self._head = 0
        self._waiting, self._waiting_rows = [], 0


def shuffled_batches(
    pieces: Iterator[Any],
    rows: Rows[Any],
    batch_size: int,
    min_rows: int,
    seed: int | None,
    drop_last: bool,
) -> Iterator[Any]:
    """Batches of the rows of ``pieces``, shuffled through a ``LocalShuffleBuffer``."""
    buffer = LocalShuffleBuffer(rows, batch_size, min_rows, seed)
    for piece in pieces:
        yield from buffer.add(piece)
    yield from buffer.drain(drop_last)
