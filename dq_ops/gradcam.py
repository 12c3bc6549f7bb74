"""Stage 4's saliency: Grad-CAM++ maps (batched, on any device) and their pooling to the patch
grid, the scores :func:`dq_ops.patches.select_patches` ranks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dq_ops.errors import DQInputError


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
    handle = target_layer.register_forward_hook(keep_output)
    try:
        maps = [_batch_cam(model, images[start:start + batch_size].to(device), captured)
                for start in range(0, len(images), batch_size)]
    finally:
        handle.remove()
    return np.concatenate(maps).astype(np.float32, copy=False)


def _batch_cam(model: nn.Module, images: torch.Tensor, captured: list[torch.Tensor]) -> np.ndarray:
    """:func:`gradcam_plus_plus` of one batch. A function of its own so that the batch's autograd
    graph (the activations saved in the forward pass) is freed before the next batch's forward
    pass runs, not held beside it by the loop's variables."""
    # Gradients must flow even when the model's parameters are frozen.
    x = images.detach().float().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        if not captured:
            raise DQInputError("target_layer was not called during the model's forward pass")
        acts = captured[-1]
        captured.clear()
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
    return (cam / torch.where(peak > 0, peak, 1.0)).clamp(0, 1).cpu().numpy()


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
