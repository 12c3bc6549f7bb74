"""Stage 5 of DQ: a masked autoencoder (He et al., CVPR 2022) that predicts the dropped patches.

The reference restores patches with the public MAE ViT-L/16 checkpoint on 224×224 images; none
ships here, so this module trains a small MAE on the dataset itself (defaults: 28×28×1, 4×4
patches), small enough to train on CPU cores.

This module is the algorithm only (model, masking, training, embedding, reconstruction): its
checkpoints and the patch store read back as a torch ``Dataset`` are in :mod:`dq_ops.mae_store`,
PSNR and the model-free fills in :mod:`dq_ops.reconstruction_quality`, the preview picture in
:mod:`dq_ops.gallery`.

Model: patches are flattened to tokens of ``D = ph·pw·C`` pixels scaled to [0, 1] and embedded
linearly; fixed 2-D sin-cos position embeddings; a pre-norm ViT encoder sees only the kept
tokens (plus a class token); a lighter decoder sees every position (encoded kept tokens, a
learned mask token elsewhere) and predicts ``D`` pixels per position. Any boolean keep mask is
accepted, so the same model serves random masking in training and the Grad-CAM++ drop pattern
of DQ; images with different numbers of kept patches in one batch are padded and masked out of
attention.

Loss (on dropped patches only, as in MAE): with ``x`` the target tokens and ``m_l = 1`` for a
dropped patch ``l``,

    loss = Σ_l m_l · mean_d (pred_ld − x_ld)² / Σ_l m_l

where ``x`` is in [0, 1] pixels, or each patch standardised (``(x − μ_l)/σ_l``) when
``norm_pix_loss`` is set (such a model cannot restore pixel values and is refused by
:func:`reconstruct`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dq_ops.errors import DQInputError
from dq_ops.patches import kept_patch_count, patch_grid, patchify, pixel_mask, unpatchify

# A dropped patch predicted below this everywhere, in an image with a flat black background, is
# background: see :func:`reconstruct`.
BACKGROUND_SNAP = 48 / 255


@dataclass(frozen=True)
class MAEConfig:
    """Sizes of the MAE. Defaults: Fashion-MNIST, 4×4 patches (7×7 grid), ~1.0M parameters."""

    image_size: tuple[int, int] = (28, 28)
    in_chans: int = 1
    patch_size: int = 4
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    decoder_embed_dim: int = 96
    decoder_depth: int = 2
    decoder_num_heads: int = 4
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
        patch_grid(self.image_size, self.patch_size)
        if not 0.0 <= self.mask_ratio < 1.0:
            raise DQInputError(f"mask_ratio must be in [0, 1), got {self.mask_ratio!r}")
        for dim, heads in ((self.embed_dim, self.num_heads), (self.decoder_embed_dim, self.decoder_num_heads)):
            if dim % heads:
                raise DQInputError(f"embedding width {dim} is not divisible by its {heads} attention heads")

    @property
    def grid(self) -> tuple[int, int]:
        return patch_grid(self.image_size, self.patch_size)

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @property
    def token_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_chans

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MAEConfig:
        return cls(**json.loads(text))


def sincos_pos_embed(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding ``(gh·gw, dim)``: half the channels encode the row, half the
    column, each as ``[sin(pos·ω_k), cos(pos·ω_k)]`` with ``ω_k = 10000^(−k/(dim/4))``."""
    if dim % 4:
        raise DQInputError(f"embedding width {dim} must be a multiple of 4 for 2-D sin-cos positions")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1).double() * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


class Block(nn.Module):
    """Pre-norm transformer block: ``x + MHA(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        n, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.proj(attended.transpose(1, 2).reshape(n, s, d))
        return x + self.mlp(self.norm2(x))


class MaskedAutoencoder(nn.Module):
    """ViT MAE over flattened patch tokens ``(n, L, D)`` in [0, 1] with a keep mask ``(n, L)``."""

    def __init__(self, config: MAEConfig) -> None:
        super().__init__()
        self.config = c = config
        self.patch_embed = nn.Linear(c.token_dim, c.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed(c.embed_dim, c.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(c.embed_dim, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_embed_dim))
        self.register_buffer(
            "decoder_pos_embed", sincos_pos_embed(c.decoder_embed_dim, c.grid)[None], persistent=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(c.decoder_embed_dim, c.decoder_num_heads, c.mlp_ratio) for _ in range(c.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(c.decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(c.decoder_embed_dim, c.token_dim)
        self.apply(self._init_weights)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # MAE's initialisation (xavier-uniform linear layers), which trains stably from scratch.
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Predicted tokens ``(n, L, D)`` for every position, given tokens and keep mask ``(n, L)``.

        Only the kept tokens enter the encoder; dropped positions' pixel values are never read.
        """
        n, length, _ = tokens.shape
        x = self.patch_embed(tokens) + self.pos_embed
        counts = keep.sum(1)
        width = int(counts.max())
        # Kept positions first (stable: in patch order); rows with fewer kept tokens are padded.
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
        x = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
        valid = torch.arange(width, device=keep.device)[None] < counts[:, None]
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], dim=1)
        attn_mask = None
        if bool((counts != width).any()):
            attn_mask = torch.cat([valid.new_ones(n, 1), valid], dim=1)[:, None, None, :]
        for block in self.blocks:
            x = block(x, attn_mask)
        x = self.decoder_embed(self.norm(x))
        kept = torch.where(valid[..., None], x[:, 1:], self.mask_token)
        # Scattering puts each encoded token back at its grid position; padding slots (which
        # index dropped positions) write the mask token, which is what those positions hold.
        full = self.mask_token.expand(n, length, -1).clone()
        full = full.scatter(1, order[..., None].expand(-1, -1, full.shape[-1]), kept)
        y = torch.cat([x[:, :1], full + self.decoder_pos_embed], dim=1)
        for block in self.decoder_blocks:
            y = block(y)
        return self.decoder_pred(self.decoder_norm(y))[:, 1:]

    @torch.inference_mode()
    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(n, embed_dim)``: the encoder's normalised patch tokens of whole images (nothing
        dropped), averaged over the patches — a self-supervised embedding of the data itself."""
        x = self.patch_embed(tokens) + self.pos_embed
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:].mean(dim=1)

    def loss(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Mean squared error on the dropped patches (formula in the module docstring)."""
        pred = self(tokens, keep)
        target = tokens
        if self.config.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        dropped = (~keep).float()
        return (((pred - target) ** 2).mean(-1) * dropped).sum() / dropped.sum().clamp(min=1)


def _tokens(images: np.ndarray, config: MAEConfig) -> np.ndarray:
    """``(n, H, W[, C])`` images → ``(n, L, ph·pw·C)`` tokens, same dtype (patch-major, C last)."""
    images = np.asarray(images)
    expected = (*config.image_size, config.in_chans)
    shape = images.shape[1:] if images.ndim == 4 else (*images.shape[1:], 1)
    if images.ndim not in (3, 4) or shape != expected:
        raise DQInputError(f"images of shape {images.shape} do not fit the MAE: expected (n, H, W, C) = (n, {expected})")
    return patchify(images, config.patch_size).reshape(len(images), config.num_patches, config.token_dim)


def mae_embedding(model: MaskedAutoencoder, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """``(n, embed_dim)`` float32: :meth:`MaskedAutoencoder.encode` of uint8 ``images`` ``(n, H, W[, C])``."""
    config = model.config
    device = next(model.parameters()).device
    return np.concatenate([
        model.encode(torch.from_numpy(_tokens(images[i:i + batch_size], config)).to(device).float() / 255.0).cpu().numpy()
        for i in range(0, len(images), batch_size)]).astype(np.float32)


def random_keep_mask(n: int, num_patches: int, mask_ratio: float, generator: torch.Generator) -> torch.Tensor:
    """``(n, L)`` bool: ``kept_patch_count(L, mask_ratio)`` positions per row, uniformly at random."""
    keep_count = kept_patch_count(num_patches, mask_ratio)
    ranks = torch.rand(n, num_patches, generator=generator).argsort(dim=1)
    return ranks < keep_count


def train_mae(
    images: np.ndarray,
    config: MAEConfig = MAEConfig(),
    *,
    seed: int = 0,
    steps: int | None = None,
    epochs: int | None = None,
    batch_size: int = 128,
    lr: float = 1.5e-3,
    weight_decay: float = 0.05,
    progress: Callable[[int, int, float], None] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[MaskedAutoencoder, list[float]]:
    """Train an MAE on uint8 ``images`` ``(n, H, W[, C])`` with random masking at ``config.mask_ratio``.

    Give ``steps`` (optimizer steps) or ``epochs`` (each ``max(1, ⌊n / batch_size⌋)`` steps over
    a fresh permutation; a short last batch is skipped). AdamW (β = 0.9, 0.95) with a linear warm-up over the first 5% of steps and a
    cosine decay to 0. Everything random (initialisation, batches, masks) derives from ``seed``;
    the global torch RNG is left as it was. ``progress(step, total_steps, loss)`` is called after
    every step. Batches, masks and shuffles are drawn on the CPU and the model trains on
    ``device`` (the same seed gives the same model on one device type). Returns the model (in
    eval mode, on ``device``) and the per-step training losses.
    """
    if (steps is None) == (epochs is None):
        raise DQInputError("train_mae needs exactly one of steps or epochs")
    tokens = torch.from_numpy(_tokens(images, config))
    n = len(tokens)
    if n == 0:
        raise DQInputError("train_mae got no images")
    total = steps if steps is not None else epochs * max(1, n // batch_size)
    if total < 1:
        raise DQInputError(f"steps/epochs must be positive, got steps={steps}, epochs={epochs}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MaskedAutoencoder(config).to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
    )
    model.train()
    losses: list[float] = []
    order = torch.randperm(n, generator=generator)
    cursor = 0
    for step in range(total):
        if cursor + batch_size > n and cursor > 0:  # new epoch: reshuffle instead of a short batch
            order, cursor = torch.randperm(n, generator=generator), 0
        batch = tokens[order[cursor:cursor + batch_size]].to(device).float() / 255.0
        cursor += batch_size
        keep = random_keep_mask(len(batch), config.num_patches, config.mask_ratio, generator).to(device)
        loss = model.loss(batch, keep)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, total, losses[-1])
    model.eval()
    return model, losses


def reconstruct(
    model: MaskedAutoencoder, images: np.ndarray, keep_mask: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """Fill the dropped patches of uint8 ``images`` ``(n, H, W[, C])`` with the MAE's prediction.

    ``keep_mask`` is ``(n, gh, gw)``. Kept pixels are copied from ``images`` unchanged (bit
    exact); dropped pixels are ``round(255 · clip(pred, 0, 1))``. The content of dropped patches
    in ``images`` is ignored (zero-filled images from ``unpack_patches`` are fine). Runs on the
    model's device.

    Background snap: in an image with a flat black background (at least one kept patch entirely
    0), a dropped patch whose prediction stays below ``BACKGROUND_SNAP`` everywhere is background
    and is written as exact zeros. The MAE's squared-error regression otherwise paints faint
    speckle there, where zero fill is exact. The threshold was chosen on held-out images and
    checked on others (PSNR on the dropped pixels; see docs/benchmarks.md): the speckle was never
    a large error, the snap makes flat background exact instead of noisy.
    """
    config = model.config
    if config.norm_pix_loss:
        raise DQInputError("reconstruct needs an MAE trained on raw pixels; this one has norm_pix_loss=True")
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise DQInputError(f"images must be uint8, got {images.dtype}")
    tokens = _tokens(images, config)
    keep_mask = np.asarray(keep_mask, dtype=bool)
    if keep_mask.shape != (len(images), *config.grid):
        raise DQInputError(f"keep_mask of shape {keep_mask.shape} does not match {len(images)} images on grid {config.grid}")
    if not keep_mask.reshape(len(images), -1).any(axis=1).all():
        raise DQInputError("every image needs at least one kept patch to be reconstructed")
    model.eval()
    device = next(model.parameters()).device
    predicted = np.empty_like(tokens)
    with torch.inference_mode():
        for start in range(0, len(tokens), batch_size):
            batch = torch.from_numpy(tokens[start:start + batch_size]).to(device).float() / 255.0
            keep = torch.from_numpy(keep_mask[start:start + batch_size].reshape(len(batch), -1)).to(device)
            pred = model(batch, keep).clamp(0, 1)
            black_background = ((batch.amax(-1) == 0) & keep).any(1)  # (b,) a kept patch is all zeros
            background = black_background[:, None] & ~keep & (pred.amax(-1) < BACKGROUND_SNAP)
            pred = torch.where(background[..., None], 0.0, pred)
            predicted[start:start + batch_size] = pred.mul(255).round().to(torch.uint8).cpu().numpy()
    p = config.patch_size
    filled = unpatchify(predicted.reshape(len(images), config.num_patches, p, p, config.in_chans), config.grid, p)
    filled = filled.reshape(images.shape)
    keep_pixels = pixel_mask(keep_mask, p)
    return np.where(keep_pixels if images.ndim == 3 else keep_pixels[..., None], images, filled)
