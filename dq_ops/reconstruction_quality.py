"""How well dropped patches are restored: PSNR on the dropped pixels, and the model-free fills
that are the MAE's yardstick. Pure NumPy: arrays in, numbers or arrays out."""

from __future__ import annotations

import math

import numpy as np

from dq_ops.errors import DQInputError
from dq_ops.patches import patchify, pixel_mask, unpatchify


def dropped_squared_error(original: np.ndarray, reconstructed: np.ndarray, keep_mask: np.ndarray) -> tuple[float, int]:
    """``(Σ (x − x̂)², count)`` over the dropped pixels (and channels) of a batch: additive over
    batches, so PSNR of a whole subset is computed chunk by chunk (:func:`psnr_db`)."""
    original, reconstructed = np.asarray(original), np.asarray(reconstructed)
    if original.shape != reconstructed.shape:
        raise DQInputError(f"original {original.shape} and reconstructed {reconstructed.shape} differ in shape")
    keep_mask = np.asarray(keep_mask)
    dropped = ~pixel_mask(keep_mask, (original.shape[1] // keep_mask.shape[1], original.shape[2] // keep_mask.shape[2]))
    if original.ndim == 4:
        dropped = np.broadcast_to(dropped[..., None], original.shape)
    diff = original[dropped].astype(np.float64) - reconstructed[dropped].astype(np.float64)
    return float(np.dot(diff, diff)), int(diff.size)


def psnr_db(squared_error: float, count: int) -> float:
    """PSNR = 10 · log10(255² / MSE) with MSE = squared_error / count (``inf`` when the error is
    0, ``nan`` when nothing was dropped)."""
    if count == 0:
        return float("nan")
    return float("inf") if squared_error == 0 else 10 * math.log10(255.0**2 * count / squared_error)


def reconstruction_psnr(original: np.ndarray, reconstructed: np.ndarray, keep_mask: np.ndarray) -> float:
    """PSNR in dB over the dropped pixels only, pooled over all images:

        PSNR = 10 · log10(255² / MSE),   MSE = mean over dropped pixels (and channels) of (x − x̂)²

    (``inf`` when the dropped pixels are restored exactly, ``nan`` when nothing was dropped).
    """
    return psnr_db(*dropped_squared_error(original, reconstructed, keep_mask))


def baseline_fill(images: np.ndarray, keep_mask: np.ndarray, method: str = "mean") -> np.ndarray:
    """A model-free fill of the dropped patches, the yardstick for the MAE.

    ``mean``: each dropped pixel gets its image's mean kept pixel (per channel), rounded.
    ``nearest``: each dropped patch copies the kept patch whose grid centre is nearest
    (Euclidean; ties → lowest patch index).
    ``zero``: dropped pixels are 0 — on black-background data (Fashion-MNIST), where the
    dropped patches are mostly background, this is the hardest of the three to beat.
    """
    images = np.asarray(images)
    keep_mask = np.asarray(keep_mask, dtype=bool)
    n, gh, gw = keep_mask.shape
    ph, pw = images.shape[1] // gh, images.shape[2] // gw
    keep_pixels = pixel_mask(keep_mask, (ph, pw))
    if images.ndim == 4:
        keep_pixels = keep_pixels[..., None]
    if method == "mean":
        weights = np.broadcast_to(keep_pixels, images.shape)
        total = (images * weights).sum(axis=(1, 2), keepdims=True, dtype=np.float64)
        mean = np.rint(total / np.maximum(weights.sum(axis=(1, 2), keepdims=True), 1))
        return np.where(keep_pixels, images, mean.astype(images.dtype))
    if method == "zero":
        return np.where(keep_pixels, images, np.zeros((), images.dtype))
    if method == "nearest":
        rows, cols = np.divmod(np.arange(gh * gw), gw)
        distance = np.hypot(rows[:, None] - rows[None], cols[:, None] - cols[None])  # (L, L)
        flat_keep = keep_mask.reshape(n, -1)
        source = np.empty((n, gh * gw), dtype=np.int64)
        for start in range(0, n, 1024):  # bounds the (batch, L, L) distance table
            part = flat_keep[start:start + 1024]
            source[start:start + 1024] = np.where(part[:, None, :], distance[None], np.inf).argmin(axis=2)
        source = np.where(flat_keep, np.arange(gh * gw)[None], source)  # kept patches stay
        patches = patchify(images, (ph, pw))
        index = source.reshape(n, gh * gw, *([1] * (patches.ndim - 2)))
        return unpatchify(np.take_along_axis(patches, index, axis=1), (gh, gw), (ph, pw))
    raise DQInputError(f"unknown baseline fill method {method!r}; expected 'mean', 'nearest' or 'zero'")
