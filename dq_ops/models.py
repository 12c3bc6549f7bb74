"""Evaluation architectures, built by name: ``build_model(name, in_channels, num_classes, image_size)``.

Stage 6 trains one of these from scratch on a selected subset:

- ``medium_cnn`` (default, CPU): three 3×3 conv-BN-ReLU layers (32/64/128 channels, 2×2
  max-pool after the first two), adaptive average pooling to a 3×3 grid (the head keeps where
  things are, which Fashion-MNIST's classes depend on), one linear layer; ~104k parameters for
  1 channel / 10 classes. On the full Fashion-MNIST it ends clearly above ``small_cnn``, which
  small random subsets already match, so subsets can be told apart from the full data
  (``bench/network.py``; docs/benchmarks.md).
- ``small_cnn``: three 3×3 conv-BN-ReLU layers (16/32/64 channels, 2×2 max-pool after the first
  two), global average pooling, one linear layer; ~24k parameters for 1 channel / 10 classes.
  Fast on CPU.
- ``resnet18``: the reference's CIFAR ResNet-18 (torchvision BasicBlock [2, 2, 2, 2], widths
  64–512) with a 3×3 stride-1 stem and no max-pool; ~11.2M parameters. A GPU network: far
  too slow to train on CPU cores.
- ``vit_tiny``: a small pre-norm Vision Transformer for cross-architecture transfer: 4×4
  patches, width 64, depth 4, 4 heads, MLP ratio 2, learned position embeddings, mean-pooled
  tokens; ~140k parameters, trainable on CPU cores.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import resnet18

from dq_ops.config import MODEL_NAMES
from dq_ops.errors import DQInputError

DEFAULT_MODEL = "medium_cnn"


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def _small_cnn(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    # Global pooling makes the head independent of image_size.
    return nn.Sequential(
        *_conv_bn_relu(in_channels, 16), nn.MaxPool2d(2),
        *_conv_bn_relu(16, 32), nn.MaxPool2d(2),
        *_conv_bn_relu(32, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
    )


def _medium_cnn(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    # Pooling to a fixed 3×3 grid keeps the head independent of image_size.
    return nn.Sequential(
        *_conv_bn_relu(in_channels, 32), nn.MaxPool2d(2),
        *_conv_bn_relu(32, 64), nn.MaxPool2d(2),
        *_conv_bn_relu(64, 128),
        nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(128 * 9, num_classes),
    )


def _resnet18_cifar(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    model = resnet18(weights=None, num_classes=num_classes)
    # CIFAR stem: small images lose too much resolution to a 7×7/2 conv plus max-pool.
    model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


class TinyViT(nn.Module):
    """Pre-norm ViT over ``patch × patch`` patches; pixels past the last whole patch are dropped."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int,
                 patch: int = 4, width: int = 64, depth: int = 4, heads: int = 4) -> None:
        super().__init__()
        if image_size < patch:
            raise DQInputError(f"vit_tiny needs images of at least {patch}×{patch} pixels, got {image_size}")
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.position = nn.Parameter(torch.zeros(1, tokens, width))
        nn.init.trunc_normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        # Nested tensors only apply to padded sequences, which never occur here.
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.position
        return self.head(self.norm(self.encoder(tokens)).mean(dim=1))


_BUILDERS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "medium_cnn": _medium_cnn,
    "small_cnn": _small_cnn,
    "resnet18": _resnet18_cifar,
    "vit_tiny": TinyViT,
}
assert tuple(_BUILDERS) == MODEL_NAMES, "dq_ops.config.MODEL_NAMES names every builder"


def build_model(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """A freshly initialised network ``name`` for square ``image_size``-pixel images.

    Initialisation draws from torch's global RNG: seed it (``torch.manual_seed``) for a
    reproducible network. Raises ``DQInputError`` for an unknown name or non-positive sizes.
    """
    builder = _BUILDERS.get(name)
    if builder is None:
        raise DQInputError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    for what, value in (("in_channels", in_channels), ("num_classes", num_classes), ("image_size", image_size)):
        if int(value) != value or value < 1:
            raise DQInputError(f"{what} must be a positive integer, got {value!r}")
    return builder(int(in_channels), int(num_classes), int(image_size))
