"""Stage 6: train a network from scratch on a selected subset and measure it on the test split.

Recipe (the reference's CIFAR recipe, with its test-set model selection removed):

- Validation: a stratified, seeded ``val_fraction`` of the *given training subset* is held out
  (``split_validation``); the network never trains on it. Anything chosen during training must
  be chosen on it, never on the test split. Its accuracy is reported at the final step.
- Inputs: uint8 pixels scaled to [0, 1], augmented, then normalised per channel with the mean
  and standard deviation of the training part (never of validation or test data).
- Augmentation, batched on tensors with a seeded generator: random crop after zero-padding by
  ``crop_padding`` pixels on each side, and a horizontal flip with probability 1/2.
- Optimiser: SGD, momentum 0.9, weight decay 5e-4 (on every parameter), batch 128 (the whole
  training part if smaller), peak learning rate 0.2, linearly warmed up over ``warmup_fraction``
  of the steps, then cosine-annealed to 0 at the last step.
- Defaults suit the CPU default network on 28-px Fashion-MNIST at CPU budgets. They were picked
  from a handful of single-seed runs scored on the test split (a mild test-set selection of the
  default recipe; per-run choices belong on the validation split): 1-px padding beat 2-px, and
  lr 0.2 beat 0.1 on a 10% subset and on the full set; ``vit_tiny`` under SGD wants lr 0.1
  (figures in docs/benchmarks.md). ``CIFAR_RESNET18_RECIPE`` is the reference's GPU recipe (200
  epochs, lr 0.1, 4-px padding).
- Budget (``training_steps``): ``steps = max(min_steps, ceil(epochs · n_train / batch))``, capped
  at ``max_steps`` when set. ``epochs`` gives large subsets full passes; ``min_steps`` gives tiny
  subsets enough optimisation steps (``epochs`` passes over a few hundred samples are only a
  few hundred steps). Batches are consecutive slices of a fresh permutation every epoch; a
  partial last batch is dropped.
- Streaming: images come from an :class:`~dq_ops.train_data.ImageRows` source (in-memory
  arrays, or Zarr arrays of the store), and at most ``shuffle_window_mb`` of training images
  are held at once (plus a batch that spans two windows). A training part that fits is read
  once and shuffled exactly as above; a larger one is read one window at a time in the
  block-shuffled order of ``dq_ops.train_data.epoch_windows`` (every image once per epoch; the
  order then depends on the window). Channel statistics, validation and test accuracy read
  ``eval_batch_size`` images at a time.
- Report: test accuracy of the *final* network (the reference reported the best epoch on the
  test set), final validation accuracy, wall time of the training loop, steps, samples/s.

Reproducibility: network initialisation (under ``torch.random.fork_rng``, so the caller's global
RNG is untouched), shuffling, augmentation and the validation split are all derived from
``seed``; on CPU the same seed and thread count give bit-identical results. On CUDA cuDNN runs
in deterministic mode during the call; full bit-exactness there also needs
``torch.use_deterministic_algorithms(True)``, which is process-wide and left to the caller.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dq_ops.errors import DQInputError
from dq_ops.models import DEFAULT_MODEL, build_model
from dq_ops.progress import Progress
from dq_ops.train_data import ArrayRows, ImageRows, epoch_windows, window_rows


@dataclass(frozen=True)
class TrainConfig:
    """Training recipe; see the module docstring for how each field is used. What the defaults
    reach, and how long they take, is measured by ``bench/network.py`` and ``bench/quality.py``
    (docs/benchmarks.md, docs/quality.md)."""

    epochs: float = 60.0
    min_steps: int = 1000
    max_steps: int | None = None
    batch_size: int = 128
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.05
    val_fraction: float = 0.1
    crop_padding: int = 1
    flip: bool = True
    amp: bool = True  # bfloat16 autocast and channels-last, CUDA only
    eval_batch_size: int = 1024
    shuffle_window_mb: float = 1024.0  # training images (uint8) held at once; see "Streaming"

    def __post_init__(self) -> None:
        if not self.epochs > 0:
            raise DQInputError(f"epochs must be > 0, got {self.epochs}")
        if self.min_steps < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise DQInputError(f"min_steps and max_steps must be >= 1, got {self.min_steps}, {self.max_steps}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise DQInputError(f"batch sizes must be >= 1, got {self.batch_size}, {self.eval_batch_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DQInputError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise DQInputError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.crop_padding < 0:
            raise DQInputError(f"crop_padding must be >= 0, got {self.crop_padding}")
        if not self.shuffle_window_mb > 0:
            raise DQInputError(f"shuffle_window_mb must be > 0, got {self.shuffle_window_mb}")

    def window_rows(self, image_shape: tuple[int, ...]) -> int:
        """Training images of ``image_shape`` (uint8) held at once: the shuffle window in rows."""
        return window_rows(int(np.prod(image_shape)), self.shuffle_window_mb, self.batch_size)


# The reference used batch 16 at keep ratios <= 10%: replace(CIFAR_RESNET18_RECIPE, batch_size=16).
CIFAR_RESNET18_RECIPE = TrainConfig(epochs=200, min_steps=1, lr=0.1, crop_padding=4)


@dataclass(frozen=True)
class TrainResult:
    """Outcome of one training run. Accuracies are fractions in [0, 1]."""

    model: str
    seed: int
    n_train: int  # images trained on (the subset minus its validation part)
    n_val: int
    n_test: int
    test_accuracy: float  # final network, untouched test split
    val_accuracy: float | None  # final network; None when the validation part is empty
    final_train_loss: float  # mean cross-entropy over the last epoch's (augmented) batches
    steps: int
    batch_size: int
    epochs: float  # steps · batch / n_train
    train_seconds: float  # training loop only, excluding data preparation and evaluation
    samples_per_second: float
    device: str


def training_steps(n_train: int, config: TrainConfig) -> int:
    """Optimisation steps for ``n_train`` training images: the budget rule of the module docstring."""
    batch = min(config.batch_size, n_train)
    steps = max(config.min_steps, math.ceil(config.epochs * n_train / batch))
    return steps if config.max_steps is None else min(steps, config.max_steps)


def split_validation(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of positions ``0..len(labels)-1`` into (train, validation), both sorted.

    Class c with n_c samples gives ``min(floor(fraction · n_c + 0.5), n_c − 1)`` samples to
    validation, drawn uniformly without replacement (numpy generator seeded with ``seed``), so
    every class in the subset keeps at least one training sample.
    """
    labels = np.asarray(labels)
    if not 0.0 <= fraction < 1.0:
        raise DQInputError(f"validation fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    val_parts = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n_val = min(math.floor(fraction * len(members) + 0.5), len(members) - 1)
        val_parts.append(rng.choice(members, size=n_val, replace=False))
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, dtype=np.int64)
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


def _image_shape(images: ImageRows, what: str) -> tuple[int, int, int]:
    """(C, H, W) of a uint8 NHW or NHWC source, checking dtype and squareness."""
    shape = images.shape
    if images.dtype != np.uint8:
        raise DQInputError(f"{what}: expected uint8 pixels, got {images.dtype}")
    if len(shape) not in (3, 4):
        raise DQInputError(f"{what}: expected NHW or NHWC images, got shape {shape}")
    if shape[1] != shape[2]:
        raise DQInputError(f"{what}: images must be square, got {shape[1]}×{shape[2]}")
    return (shape[3] if len(shape) == 4 else 1, shape[1], shape[2])


def _read_nchw(images: ImageRows, positions: np.ndarray, device: torch.device) -> torch.Tensor:
    """The images at ``positions`` as a contiguous uint8 (k, C, H, W) tensor on ``device``."""
    pixels = torch.from_numpy(np.asarray(images.read(positions)))
    if pixels.ndim == 3:
        pixels = pixels[..., None]
    return pixels.permute(0, 3, 1, 2).contiguous().to(device)


def _check_labels(labels: np.ndarray, n_images: int, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != n_images:
        raise DQInputError(f"{what}: {n_images} images but labels of shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DQInputError(f"{what}: labels must be integers, got {labels.dtype}")
    if len(labels) and labels.min() < 0:
        raise DQInputError(f"{what}: negative label {labels.min()}")
    return labels.astype(np.int64)


def augment(batch: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero-padding ``padding`` px per side, then random horizontal flip.

    ``batch`` is (B, C, H, W) on any device; the random offsets come from ``generator`` (a CPU
    generator), so CPU and GPU runs see the same augmentation for the same seed.
    """
    b, _, h, w = batch.shape
    device = batch.device
    if padding:
        padded = F.pad(batch, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator).to(device)
        dx = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator).to(device)
        rows = dy + torch.arange(h, device=device)  # (B, H)
        cols = dx + torch.arange(w, device=device)  # (B, W)
        # Advanced indices on dims 0, 2, 3 around a slice put the channel last: (B, H, W, C).
        batch = padded[torch.arange(b, device=device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        batch = batch.permute(0, 3, 1, 2)
    if flip:
        mirror = (torch.rand(b, generator=generator) < 0.5).to(device)
        batch = torch.where(mirror[:, None, None, None], batch.flip(3), batch)
    return batch.contiguous()


def _channel_stats(images: ImageRows, positions: np.ndarray, channels: int, chunk: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of the images at ``positions`` scaled to [0, 1], as
    (1, C, 1, 1) float32; read ``chunk`` images at a time and accumulated in float64."""
    total = torch.zeros(channels, dtype=torch.float64, device=device)
    squares = torch.zeros_like(total)
    count = 0
    for start in range(0, len(positions), chunk):
        x = _read_nchw(images, positions[start:start + chunk], device).to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
        count += x.numel() // channels
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0.0).sqrt()
    # A constant channel must not divide by zero.
    return mean.float()[None, :, None, None], std.float().clamp_min(1e-3)[None, :, None, None]


def _resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextmanager
def _deterministic_cudnn(enabled: bool) -> Iterator[None]:
    """cuDNN in deterministic, non-benchmark mode for the duration (restored after)."""
    if not enabled:
        yield
        return
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def _accuracy(model: nn.Module, images: ImageRows, positions: np.ndarray, labels: np.ndarray, mean: torch.Tensor,
              std: torch.Tensor, batch_size: int, use_amp: bool, memory_format: torch.memory_format,
              device: torch.device) -> float:
    """Accuracy on the images at ``positions`` (labels: theirs, in that order), ``batch_size`` at a time."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
        for start in range(0, len(positions), batch_size):
            x = (_read_nchw(images, positions[start:start + batch_size], device).float() / 255.0 - mean) / std
            logits = model(x.contiguous(memory_format=memory_format))
            y = torch.from_numpy(labels[start:start + batch_size]).to(device)
            correct += (logits.argmax(dim=1) == y).sum()
    return correct.item() / len(positions)


def _epoch_batches(
    windows: list[torch.Tensor], read_window: Callable[[np.ndarray], torch.Tensor], labels: torch.Tensor, batch: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's (uint8 pixels, labels) batches: consecutive slices of the concatenated
    ``windows`` (training positions), a partial last batch dropped. ``read_window(sorted
    positions)`` gives their pixels; one window is held at a time (plus a batch spanning two)."""
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    pending = 0
    for window in windows:
        ascending, rank = torch.sort(window)
        local = torch.empty_like(rank)
        local[rank] = torch.arange(len(rank))  # window[i] is row local[i] of the pixels read
        pixels = read_window(ascending.numpy())
        local, window = local.to(pixels.device), window.to(labels.device)
        start = 0
        while start < len(window):
            take = min(batch - pending, len(window) - start)
            parts.append((pixels[local[start:start + take]], labels[window[start:start + take]]))
            pending, start = pending + take, start + take
            if pending == batch:
                xs, ys = zip(*parts)
                yield (xs[0], ys[0]) if len(parts) == 1 else (torch.cat(xs), torch.cat(ys))
                parts, pending = [], 0
        del pixels  # before the next window is read


def train_and_evaluate(
    images: np.ndarray | ImageRows,
    labels: np.ndarray,
    test_images: np.ndarray | ImageRows,
    test_labels: np.ndarray,
    *,
    model: str = DEFAULT_MODEL,
    num_classes: int | None = None,
    config: TrainConfig = TrainConfig(),
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: Progress | None = None,
) -> TrainResult:
    """Train ``model`` from scratch on (``images``, ``labels``) and measure it on the test split.

    ``images`` / ``test_images``: uint8, (N, H, W) or (N, H, W, C), square, same H, W, C; arrays
    or :class:`~dq_ops.train_data.ImageRows` sources (read in batches, never whole).
    ``labels`` / ``test_labels``: integer class ids in ``[0, num_classes)``; ``num_classes``
    defaults to 1 + the largest label seen in either split. ``device``: "auto" (CUDA when
    present), "cpu", "cuda", ... ``progress(step, total)`` is called after every optimisation
    step (1-based). See the module docstring for the recipe; raises ``DQInputError`` on bad input.
    """
    images = images if isinstance(images, ImageRows) else ArrayRows(images)
    test_images = test_images if isinstance(test_images, ImageRows) else ArrayRows(test_images)
    image_shape = _image_shape(images, "training subset")
    test_shape = _image_shape(test_images, "test split")
    labels = _check_labels(labels, len(images), "training subset")
    test_labels = _check_labels(test_labels, len(test_images), "test split")
    if len(images) == 0:
        raise DQInputError("training subset is empty")
    if len(test_images) == 0:
        raise DQInputError("test split is empty")
    if image_shape != test_shape:
        raise DQInputError(f"training images are {image_shape} (C, H, W) but test images {test_shape}")
    seen = int(max(labels.max(), test_labels.max())) + 1
    if num_classes is None:
        num_classes = seen
    elif seen > num_classes:
        raise DQInputError(f"label {seen - 1} out of range for num_classes={num_classes}")

    train_pos, val_pos = split_validation(labels, config.val_fraction, seed)
    n_train = len(train_pos)
    batch = min(config.batch_size, n_train)
    steps = training_steps(n_train, config)
    steps_per_epoch = n_train // batch
    window = config.window_rows(image_shape)

    dev = _resolve_device(device)
    use_amp = config.amp and dev.type == "cuda"
    memory_format = torch.channels_last if use_amp else torch.contiguous_format
    # Network init from the seed without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_model(model, image_shape[0], num_classes, image_shape[1])
    net = net.to(dev, memory_format=memory_format)
    generator = torch.Generator().manual_seed(seed)

    mean, std = _channel_stats(images, train_pos, image_shape[0], config.eval_batch_size, dev)
    train_y = torch.from_numpy(labels[train_pos]).to(dev)
    # A training part that fits the window is read once and stays on the device as uint8.
    resident = _read_nchw(images, train_pos, dev) if n_train <= window else None

    def read_window(positions: np.ndarray) -> torch.Tensor:
        """Pixels of one window's ascending positions (resident: the one window, every position)."""
        return resident if resident is not None else _read_nchw(images, train_pos[positions], dev)

    optimizer = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    warmup = int(config.warmup_fraction * steps)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    tail = min(steps_per_epoch, steps)  # steps averaged into final_train_loss
    tail_loss = torch.zeros((), device=dev)

    with _deterministic_cudnn(dev.type == "cuda"):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        started = time.perf_counter()
        net.train()
        for step in range(steps):
            if step % steps_per_epoch == 0:
                batches = _epoch_batches(epoch_windows(n_train, window, generator), read_window, train_y, batch)
            pixels, y = next(batches)
            x = augment(pixels.float() / 255.0, config.crop_padding, config.flip, generator)
            x = ((x - mean) / std).contiguous(memory_format=memory_format)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                loss = F.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if step >= steps - tail:
                tail_loss += loss.detach().float()
            if progress is not None:
                progress(step + 1, steps)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        train_seconds = time.perf_counter() - started
        del batches
        resident = None  # frees the training images before testing reads its own

        def accuracy_on(source: ImageRows, positions: np.ndarray, y: np.ndarray) -> float:
            return _accuracy(net, source, positions, y, mean, std, config.eval_batch_size, use_amp, memory_format, dev)

        test_accuracy = accuracy_on(test_images, np.arange(len(test_images)), test_labels)
        val_accuracy = accuracy_on(images, val_pos, labels[val_pos]) if len(val_pos) else None

    return TrainResult(
        model=model, seed=seed, n_train=n_train, n_val=len(val_pos), n_test=len(test_images),
        test_accuracy=test_accuracy, val_accuracy=val_accuracy,
        final_train_loss=tail_loss.item() / tail,
        steps=steps, batch_size=batch, epochs=steps * batch / n_train,
        train_seconds=train_seconds, samples_per_second=steps * batch / train_seconds, device=str(dev),
    )
