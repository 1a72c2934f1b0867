"""Cut a stream of blocks into bundles of exact row counts (no Dask here)."""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any


@dataclasses.dataclass(eq=False)
class BlockRef:
    """Client-side handle of a block that lives on a worker.

    ``uses`` counts the in-flight tasks that read the block; ``exhausted`` says the
    consuming operator has handed out all its rows. The block can be released when
    both say it is no longer needed.
    """

    key: str
    future: Any
    rows: int
    nbytes: int
    worker: str | None = None
    uses: int = 0
    exhausted: bool = False
    # position of the source block all its rows come from (None: rows of several);
    # resumable writes keep source blocks apart to know when one is fully written
    origin: int | None = None
    # every column fixed-width (``batching.block_is_flat``), as its task reported
    flat: bool = False

    @property
    def bytes_per_row(self) -> float:
        """Average bytes per row (at least 1)."""
        return max(1.0, self.nbytes / self.rows) if self.rows else 1.0


Slice = tuple[BlockRef, int, int]


class Bundler:
    """FIFO of blocks from which bundles of an exact number of rows are taken."""

    def __init__(self) -> None:
        self._blocks: deque[BlockRef] = deque()
        self._offset = 0
        self.rows = 0
        # never put rows of two source blocks in one bundle (a bundle may then be short)
        self.split_origins = False

    def __len__(self) -> int:
        return len(self._blocks)

    def add(self, ref: BlockRef) -> None:
        """Queue a block (its row count must be known)."""
        self._blocks.append(ref)
        self.rows += ref.rows

    def blocks(self) -> list[BlockRef]:
        """The queued blocks, front first."""
        return list(self._blocks)

    def head(self) -> BlockRef | None:
        """The block at the front, if any."""
        return self._blocks[0] if self._blocks else None

    def take(self, n_rows: int) -> list[Slice]:
        """Take ``min(n_rows, self.rows)`` rows from the front, in order.

        With ``split_origins``, stop early at the end of the front block's source block.
        """
        slices: list[Slice] = []
        wanted = min(n_rows, self.rows)
        while wanted > 0:
            ref = self._blocks[0]
            if self.split_origins and slices and ref.origin != slices[0][0].origin:
                break
            start = self._offset
            stop = min(ref.rows, start + wanted)
            slices.append((ref, start, stop))
            wanted -= stop - start
            self.rows -= stop - start
            if stop == ref.rows:
                self._blocks.popleft()
                self._offset = 0
                ref.exhausted = True
            else:
                self._offset = stop
        return slices

    def take_block(self) -> list[Slice]:
        """Take the rest of the front block, whatever its size."""
        if not self._blocks:
            return []
        return self.take(self._blocks[0].rows - self._offset)

    def drain(self) -> list[BlockRef]:
        """Drop everything queued and return the blocks (for cancellation)."""
        blocks = list(self._blocks)
        self._blocks.clear()
        self._offset = 0
        self.rows = 0
        for ref in blocks:
            ref.exhausted = True
        return blocks
