"""Stage 4 of DQ, pixel quantization: split images into patches, keep the top ``1 - θ`` of them per
image by their saliency scores (Grad-CAM++ maps pooled to the grid: :mod:`dq_ops.gradcam`).
NumPy only: the stage's keys and the patch store's layout need no torch.

Conventions used across ``patches``, ``patch_store`` and ``mae``:

- images are ``(n, H, W)`` or ``(n, H, W, C)`` (uint8 or float);
- a patch is ``ph × pw`` pixels; the grid is ``(gh, gw) = (H / ph, W / pw)`` and the
  ``L = gh · gw`` patches of an image are numbered row-major (patch ``l`` sits at grid row
  ``l // gw``, column ``l % gw``), the token order of a ViT;
- patches are ``(n, L, ph, pw)`` or ``(n, L, ph, pw, C)``;
- patch scores and keep masks are grid-shaped, ``(n, gh, gw)``; ``True`` in a keep mask means
  the patch is stored, ``False`` that it is dropped (to be predicted by the MAE).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dq_ops.errors import DQInputError


def patch_shape(patch_size: int | Sequence[int]) -> tuple[int, int]:
    """``(ph, pw)`` from an int (square patches) or a pair; both must be positive."""
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, (int, np.integer)) else tuple(patch_size)
    if ph < 1 or pw < 1:
        raise DQInputError(f"patch_size must be positive, got {patch_size!r}")
    return int(ph), int(pw)


def patch_grid(image_hw: Sequence[int], patch_size: int | Sequence[int]) -> tuple[int, int]:
    """Grid ``(H / ph, W / pw)``; raises when the image size is not a multiple of the patch size."""
    (h, w), (ph, pw) = image_hw, patch_shape(patch_size)
    if h % ph or w % pw:
        raise DQInputError(
            f"image size {h}×{w} is not divisible by patch_size {ph}×{pw} "
            f"(remainders {h % ph}, {w % pw}); crop or pad the images, or pick another patch_size"
        )
    return h // ph, w // pw


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim not in (3, 4):
        raise DQInputError(f"images must be (n, H, W) or (n, H, W, C), got shape {images.shape}")
    return images


def patchify(images: np.ndarray, patch_size: int | Sequence[int]) -> np.ndarray:
    """Split images into row-major patches.

    ``(n, H, W[, C])`` → ``(n, L, ph, pw[, C])`` with ``L = (H/ph)·(W/pw)``; a view-free copy
    that keeps the dtype, so ``unpatchify(patchify(x, p), grid, p)`` equals ``x`` bit for bit.
    """
    images = _check_images(images)
    n, h, w = images.shape[:3]
    (gh, gw), (ph, pw) = patch_grid((h, w), patch_size), patch_shape(patch_size)
    rest = images.shape[3:]
    x = images.reshape(n, gh, ph, gw, pw, *rest).swapaxes(2, 3)  # (n, gh, gw, ph, pw[, C])
    return np.ascontiguousarray(x).reshape(n, gh * gw, ph, pw, *rest)


def unpatchify(patches: np.ndarray, grid: Sequence[int], patch_size: int | Sequence[int]) -> np.ndarray:
    """Inverse of :func:`patchify`: ``(n, L, ph, pw[, C])`` → ``(n, gh·ph, gw·pw[, C])``."""
    patches = np.asarray(patches)
    gh, gw = (int(g) for g in grid)
    ph, pw = patch_shape(patch_size)
    if patches.ndim not in (4, 5) or patches.shape[1:4] != (gh * gw, ph, pw):
        raise DQInputError(
            f"patches of shape {patches.shape} do not match grid {gh}×{gw} and patch_size {ph}×{pw}; "
            f"expected (n, {gh * gw}, {ph}, {pw}[, C])"
        )
    n, rest = patches.shape[0], patches.shape[4:]
    x = patches.reshape(n, gh, gw, ph, pw, *rest).swapaxes(2, 3)  # (n, gh, ph, gw, pw[, C])
    return np.ascontiguousarray(x).reshape(n, gh * ph, gw * pw, *rest)


def pixel_mask(keep_mask: np.ndarray, patch_size: int | Sequence[int]) -> np.ndarray:
    """Expand a grid keep mask ``(n, gh, gw)`` to pixels ``(n, gh·ph, gw·pw)`` (nearest)."""
    ph, pw = patch_shape(patch_size)
    return np.repeat(np.repeat(np.asarray(keep_mask, dtype=bool), ph, axis=1), pw, axis=2)


def kept_patch_count(num_patches: int, drop_ratio: float) -> int:
    """Patches kept per image: ``max(1, ⌊L·(1 − θ)⌋)``.

    Floor matches the reference (``len_keep = int(L * (1 - mask_ratio))``: θ = 0.2 of 196 keeps
    156, of 49 keeps 39). A 1e-9 slack absorbs float error so that e.g. L = 10, θ = 0.3 keeps 7
    (the reference's ``int(10 * 0.7)`` gives 6). At least one patch is always kept.
    """
    if not (isinstance(drop_ratio, (int, float, np.floating)) and 0.0 <= float(drop_ratio) < 1.0):
        raise DQInputError(f"drop_ratio θ must be in [0, 1), got {drop_ratio!r}")
    return max(1, math.floor(num_patches * (1.0 - float(drop_ratio)) + 1e-9))


def select_patches(scores: np.ndarray, drop_ratio: float) -> np.ndarray:
    """Keep mask ``(n, gh, gw)`` with the :func:`kept_patch_count` highest-scoring patches per image.

    Ties are broken by the lowest row-major patch index (a stable sort on ``-score``), so the
    result depends on the scores only.
    """
    scores = np.asarray(scores)
    if scores.ndim != 3:
        raise DQInputError(f"scores must be (n, gh, gw), got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise DQInputError("scores contain NaN or infinite values")
    n, gh, gw = scores.shape
    k = kept_patch_count(gh * gw, drop_ratio)
    order = np.argsort(-scores.reshape(n, -1).astype(np.float64), axis=1, kind="stable")[:, :k]
    keep = np.zeros((n, gh * gw), dtype=bool)
    np.put_along_axis(keep, order, True, axis=1)
    return keep.reshape(n, gh, gw)
