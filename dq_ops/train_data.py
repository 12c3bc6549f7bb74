"""What evaluation training reads, and in which order: image sources and the streamed epoch order.

Sources (:class:`ImageRows`): N uint8 images of one shape, read by position in batches, so
training and testing never need a whole split in memory. :class:`ArrayRows` wraps an in-memory
array (the library API); :class:`ZarrRows` reads a Zarr array of the store chunk by chunk,
optionally through a row map (a subset's sorted ``indices`` into its dataset split).

Epoch order (:func:`epoch_windows`), a block shuffle with a shuffle window of ``window_rows``
rows (the most training images held in memory at once):

- ``n ≤ window_rows``: one window, ``torch.randperm(n)``: the exact uniform permutation, and
  the whole training part is read once and kept (the order and results do not depend on the
  window size).
- ``n > window_rows``: the positions ``0..n-1`` are cut into consecutive blocks of
  ``b = ceil(window_rows / BLOCKS_PER_WINDOW)`` positions; the blocks are permuted, taken
  ``⌊window_rows / b⌋`` at a time as windows, and each window's positions are permuted.
  Every position is visited exactly once per epoch, each window is read once per epoch (its
  blocks are contiguous position ranges: few chunks to decode), and a batch mixes up to
  ``BLOCKS_PER_WINDOW`` stretches of the data drawn from anywhere in it. The order depends on
  ``window_rows``, which then belongs in the key of any stored result.

All permutations of an epoch are drawn from ``generator`` at its start, so the sequence of draws
(and with it the augmentation that follows) depends only on the seed.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
import torch
import zarr

# Blocks per window in the streamed order: more blocks mix a window from more places in the
# data (class-sorted storage gives purer blocks); fewer make each block a longer contiguous read.
BLOCKS_PER_WINDOW = 64


class ImageRows(ABC):
    """N uint8 images of one shape ((N, H, W) or (N, H, W, C)), read by position."""

    @property
    @abstractmethod
    def shape(self) -> tuple[int, ...]:
        """(N, H, W) or (N, H, W, C), as stored."""

    @property
    @abstractmethod
    def dtype(self) -> np.dtype: ...

    @abstractmethod
    def read(self, positions: np.ndarray) -> np.ndarray:
        """The images at ``positions`` (ascending is cheapest), in that order, as stored."""

    def __len__(self) -> int:
        return self.shape[0]


class ArrayRows(ImageRows):
    """Images already in memory."""

    def __init__(self, images: np.ndarray):
        self.images = np.asarray(images)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.images.shape

    @property
    def dtype(self) -> np.dtype:
        return self.images.dtype

    def read(self, positions: np.ndarray) -> np.ndarray:
        return self.images[positions]


class ZarrRows(ImageRows):
    """Rows of a Zarr array, or the rows ``rows[p]`` of it (a subset's indices) when given.

    A read of a contiguous range of rows is one slice; any other is an orthogonal selection:
    both decode only the chunks they touch.
    """

    def __init__(self, array: zarr.Array, rows: np.ndarray | None = None):
        self.array = array
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        n = self.array.shape[0] if self.rows is None else len(self.rows)
        return (n, *self.array.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    def read(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        rows = positions if self.rows is None else self.rows[positions]
        if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all():
            return np.asarray(self.array[int(rows[0]):int(rows[-1]) + 1])
        return np.asarray(self.array.get_orthogonal_selection((rows,)))


def window_rows(image_bytes: int, window_mb: float, batch_size: int) -> int:
    """Rows of ``image_bytes`` each that fit in ``window_mb`` MiB; at least one batch."""
    return max(batch_size, math.floor(window_mb * 2**20 / max(1, image_bytes)))


def epoch_windows(n: int, window_rows: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's order of positions ``0..n-1``, as consecutive windows of at most ``window_rows``
    (see the module docstring); concatenated, they are a permutation of ``0..n-1``."""
    if n <= window_rows:
        return [torch.randperm(n, generator=generator)]
    block = math.ceil(window_rows / BLOCKS_PER_WINDOW)
    blocks_per_window = window_rows // block
    starts = torch.randperm(math.ceil(n / block), generator=generator) * block
    windows = []
    for first in range(0, len(starts), blocks_per_window):
        positions = torch.cat([torch.arange(s, min(s + block, n)) for s in starts[first:first + blocks_per_window].tolist()])
        windows.append(positions[torch.randperm(len(positions), generator=generator)])
    return windows
