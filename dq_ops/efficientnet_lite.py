"""EfficientNet-Lite0, the default backbone, defined here rather than imported from timm.

Importing timm imports torchvision and, through it, ``torch._dynamo``: a start-up cost
(docs/refresh.md) that a refresh embedding a few hundred new images would otherwise pay in the
flow's process, and every dask worker once. This module builds the same network as timm's
``tf_efficientnet_lite0``: the same modules, names and parameter order (so the packaged
weights load in order, and Grad-CAM++ finds ``bn2``), the same operations in the same order
(so features are bit-identical; ``tests/test_backbones.py`` compares both), and the same seeded
random initialisation.

Architecture (Tan & Le 2019, "Lite": ReLU6, no squeeze-excitation, TF "SAME" padding):
stem 3×3/2 conv to 32 channels; blocks (type, repeats, kernel, first stride, expansion,
channels) ds 1 3 1 1 16 · ir 2 3 2 6 24 · ir 2 5 2 6 40 · ir 3 3 2 6 80 · ir 3 5 1 6 112 ·
ir 4 5 2 6 192 · ir 1 3 1 6 320; 1×1 head to 1280; global average pool; linear classifier.
Every convolution is followed by batch norm (ε = 10⁻³), with ReLU6 except after projections.
A block adds its input back when it keeps the shape (stride 1, same channels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# (block type, repeats, kernel, stride of the first repeat, expansion, output channels)
STAGES = (("ds", 1, 3, 1, 1, 16), ("ir", 2, 3, 2, 6, 24), ("ir", 2, 5, 2, 6, 40), ("ir", 3, 3, 2, 6, 80),
          ("ir", 3, 5, 1, 6, 112), ("ir", 4, 5, 2, 6, 192), ("ir", 1, 3, 1, 6, 320))
STEM_CHANNELS = 32
NUM_FEATURES = 1280
BN_EPS = 1e-3


class SameConv2d(nn.Conv2d):
    """TensorFlow "SAME" padding: pad ``max((⌈i/s⌉ - 1)·s + k - i, 0)`` per axis, the odd pixel
    at the end. Stride 1 with an odd kernel pads symmetrically, which a plain padded convolution
    does; this class is for the strided ones."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, kernel, stride in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            pad = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [pad // 2, pad - pad // 2]
        return F.conv2d(F.pad(x, pads), self.weight, None, self.stride, 0, self.dilation, self.groups)


def conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    if stride == 1:
        return nn.Conv2d(in_channels, out_channels, kernel_size, 1, kernel_size // 2, groups=groups, bias=False)
    return SameConv2d(in_channels, out_channels, kernel_size, stride, groups)


class BatchNormAct(nn.BatchNorm2d):
    """Batch norm, then ReLU6 when ``act`` (timm's ``BatchNormAct2d``: same parameters; ReLU6
    as ``hardtanh(0, 6)``, which is what ``nn.ReLU6`` runs)."""

    def __init__(self, channels: int, act: bool = True):
        super().__init__(channels, eps=BN_EPS)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return F.hardtanh(x, 0.0, 6.0, inplace=True) if self.act else x


class DepthwiseSeparable(nn.Module):
    """Depthwise k×k conv, BN+ReLU6, pointwise projection, BN."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__()
        self.conv_dw = conv(in_channels, in_channels, kernel_size, stride, groups=in_channels)
        self.bn1 = BatchNormAct(in_channels)
        self.conv_pw = conv(in_channels, out_channels, 1)
        self.bn2 = BatchNormAct(out_channels, act=False)
        self.has_skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv_pw(self.bn1(self.conv_dw(x))))
        return out + x if self.has_skip else out


class InvertedResidual(nn.Module):
    """Pointwise expansion, BN+ReLU6, depthwise k×k conv, BN+ReLU6, pointwise projection, BN."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expansion: int):
        super().__init__()
        mid = in_channels * expansion
        self.conv_pw = conv(in_channels, mid, 1)
        self.bn1 = BatchNormAct(mid)
        self.conv_dw = conv(mid, mid, kernel_size, stride, groups=mid)
        self.bn2 = BatchNormAct(mid)
        self.conv_pwl = conv(mid, out_channels, 1)
        self.bn3 = BatchNormAct(out_channels, act=False)
        self.has_skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv_pwl(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))))
        return out + x if self.has_skip else out


class EfficientNetLite0(nn.Module):
    """The network of the module docstring; ``classifier`` maps the pooled 1280-d feature to
    ``num_classes`` logits, ``bn2`` gives the last feature map."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv_stem = conv(3, STEM_CHANNELS, 3, 2)
        self.bn1 = BatchNormAct(STEM_CHANNELS)
        # timm's block builder instantiates a throwaway squeeze-excite module here (two 8-channel
        # 1×1 convs, to probe its signature), which draws from the RNG: drawing the same keeps
        # the seeded random initialisation (dq_ops.backbone_spec.RANDOM_WEIGHTS) equal to timm's.
        nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        stages, channels = [], STEM_CHANNELS
        for kind, repeats, kernel, stride, expansion, out in STAGES:
            blocks = []
            for r in range(repeats):
                step = stride if r == 0 else 1
                blocks.append(DepthwiseSeparable(channels, out, kernel, step) if kind == "ds"
                              else InvertedResidual(channels, out, kernel, step, expansion))
                channels = out
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = conv(channels, NUM_FEATURES, 1)
        self.bn2 = BatchNormAct(NUM_FEATURES)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(NUM_FEATURES, num_classes)
        for module in self.modules():
            _init_like_tensorflow(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))
        return self.classifier(torch.flatten(self.global_pool(x), 1))


def _init_like_tensorflow(module: nn.Module) -> None:
    """The TensorFlow reference's initialisation (timm's ``_init_weight_goog``): conv weights
    N(0, 2/fan_out) with fan_out = k²·out/groups, BN (1, 0), linear U(±1/√out) with zero bias."""
    if isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0, math.sqrt(2.0 / fan_out))
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        bound = 1.0 / math.sqrt(module.weight.size(0))
        nn.init.uniform_(module.weight, -bound, bound)
        nn.init.zeros_(module.bias)
