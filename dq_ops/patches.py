"""Stage 4 of DQ, pixel quantization: split images into patches, score the patches with
Grad-CAM++ and keep the top ``1 - θ`` of them per image.

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
import torch
import torch.nn.functional as F
from torch import nn

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


def gradcam_plus_plus(
    model: nn.Module, target_layer: nn.Module, images: torch.Tensor, batch_size: int = 64
) -> np.ndarray:
    """Grad-CAM++ maps (Chattopadhay et al., WACV 2018) for the model's own predicted class.

    ``images`` is a float tensor ``(n, C, H, W)`` already in the model's input space (resized,
    normalised; on any device: batches move to the model's device); the result is ``(n, H, W)``
    float32 in ``[0, 1]`` (each map divided by its
    maximum; an all-zero map stays zero). With ``A`` the target layer's output ``(K, h, w)``,
    ``S`` the predicted class's logit and ``g = ∂S/∂A``, the paper's closed form for the
    exponential score ``exp(S)`` gives

        α_kij = g_kij² / (2·g_kij² + Σ_ab A_kab · g_kij³)      (0 where g_kij = 0)
        w_k   = Σ_ij α_kij · relu(g_kij)
        cam   = relu(Σ_k w_k · A_k),   bilinearly upsampled from (h, w) to (H, W).

    The model is put in eval mode (batch-norm statistics must not depend on the batch, which
    also makes the batched gradient of ``Σ_i S_i`` equal to the per-image gradients).
    """
    if images.ndim != 4:
        raise DQInputError(f"images must be a (n, C, H, W) tensor, got shape {tuple(images.shape)}")
    captured: list[torch.Tensor] = []

    def keep_output(_module: nn.Module, _inputs: object, output: object) -> None:
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            raise DQInputError(f"target_layer must output a (n, K, h, w) tensor, got {type(output).__name__}")
        captured.append(output)

    model.eval()
    device = next(model.parameters()).device
    maps = []
    handle = target_layer.register_forward_hook(keep_output)
    try:
        for start in range(0, len(images), batch_size):
            captured.clear()
            # Gradients must flow even when the model's parameters are frozen.
            x = images[start:start + batch_size].detach().to(device).float().requires_grad_(True)
            with torch.enable_grad():
                logits = model(x)
                if not captured:
                    raise DQInputError("target_layer was not called during the model's forward pass")
                acts = captured[-1]
                score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
                (grads,) = torch.autograd.grad(score, acts)
            acts, grads = acts.detach(), grads.detach()
            g2 = grads.pow(2)
            denom = 2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g2 * grads
            alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, 1.0), 0.0)
            weights = (alpha * grads.clamp(min=0)).sum(dim=(2, 3), keepdim=True)
            cam = (weights * acts).sum(1, keepdim=True).clamp(min=0)
            cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            peak = cam.amax(dim=(1, 2), keepdim=True)
            maps.append((cam / torch.where(peak > 0, peak, 1.0)).clamp(0, 1).cpu().numpy())
    finally:
        handle.remove()
    return np.concatenate(maps).astype(np.float32, copy=False)


def patch_scores(cam: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """Pool saliency maps ``(n, H, W)`` to the patch grid ``(n, gh, gw)``.

    A map at least as large as the grid is area-averaged (score = mean saliency over the
    patch's pixels when ``H, W`` are multiples of the grid); a coarser map (e.g. a raw 4×4
    CAM for a 7×7 grid) is bilinearly interpolated, as the reference resizes its 7×7 CAM to 14×14.
    """
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 3:
        raise DQInputError(f"cam must be (n, H, W), got shape {cam.shape}")
    gh, gw = (int(g) for g in grid)
    t = torch.from_numpy(cam)[:, None]
    if cam.shape[1] >= gh and cam.shape[2] >= gw:
        out = F.adaptive_avg_pool2d(t, (gh, gw))
    else:
        out = F.interpolate(t, size=(gh, gw), mode="bilinear", align_corners=False)
    return out[:, 0].numpy()


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
