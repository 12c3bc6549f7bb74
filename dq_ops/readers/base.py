"""What every reader shares: the ``Reader`` protocol, the ``Batch`` it yields, sample ids and
image-batch normalisation.

A reader is built from one source (a path or fsspec URL) and knows its splits. It streams each
split as batches so that a dataset of any size passes through bounded memory; ``dq_ops.ingest``
writes the batches into a store. Readers never write.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import fsspec
import numpy as np
from PIL import Image

from dq_ops.errors import DQInputError
from dq_ops.urls import filesystem

Modality = Literal["images", "texts"]
OnError = Literal["raise", "skip"]
NO_LABEL = -1
# The conventional order of split names; other names follow alphabetically.
SPLIT_ORDER = ("train", "val", "validation", "test")
# Pillow modes stored as one gray channel; every other mode (RGB, RGBA, P, CMYK, ...) becomes RGB.
GRAY_MODES = frozenset({"1", "L", "LA"})
# Pillow's Image.MAX_IMAGE_PIXELS: more pixels than this and an image is refused (dataset.max_image_pixels).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


@dataclass(frozen=True)
class Batch:
    """Consecutive samples of one split.

    ``samples`` is ``(b, H, W, C) uint8`` for images (C = 1 gray, 3 RGB) or ``(b,)`` str for
    texts; ``labels`` is ``(b,) int64`` with ``-1`` for "no label"; ``ids`` is ``(b,)`` str.
    """

    samples: np.ndarray
    labels: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class SkippedItem:
    """An item left out under ``on_error="skip"``: its name (file, ``file:line``, record) and why."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


class Reader(Protocol):
    """A dataset source split into named splits, read in batches.

    ``num_samples(split)`` is exact up to items that turn out bad while reading (skipped under
    ``on_error="skip"``), so it is an upper bound a writer can allocate for; it already honours
    the reader's ``limit``. ``class_names()`` is ``None`` when labels are bare integers or absent.
    ``skipped`` collects the items left out so far.
    """

    source: str
    modality: Modality
    skipped: list[SkippedItem]

    def splits(self) -> list[str]: ...

    def num_samples(self, split: str) -> int: ...

    def class_names(self) -> list[str] | None: ...

    def iter_batches(self, split: str, batch_size: int) -> Iterator[Batch]: ...


@runtime_checkable
class PartitionedReader(Reader, Protocol):
    """A reader whose splits come in parts (shards) that decode independently: ingest spreads
    them over dask workers (``dq_ops.ingest``). Concatenated in order, the parts' samples are
    ``iter_batches``' samples."""

    def parts(self, split: str) -> list[Any]:
        """The split's parts in read order; each has ``samples``, an upper bound of what it holds."""

    def part_batches(self, part: Any, batch_size: int, take: int | None, errors: ItemErrors) -> Iterator[Batch]:
        """The first ``take`` (None: all) good samples of ``part``, decoded; bad ones go to ``errors``."""


@dataclass
class ItemErrors:
    """Applies ``on_error`` to bad items: raise a :class:`DQInputError` naming the item, or record it."""

    on_error: OnError = "raise"
    skipped: list[SkippedItem] = field(default_factory=list)

    def bad(self, name: str, reason: str) -> None:
        if self.on_error == "raise":
            raise DQInputError(f"{name}: {reason}")
        self.skipped.append(SkippedItem(name, reason))


def allow_image_pixels(max_pixels: int) -> None:
    """Let Pillow open images of up to ``max_pixels``: its decompression-bomb limit is a process-wide
    setting that refuses larger ones before their size can be read; it is only ever raised here."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def too_large(size: tuple[int, int] | None, max_pixels: int) -> str:
    """Why an image over ``max_pixels`` is a bad item; ``size`` None: Pillow refused it unread."""
    what = "refused by Pillow as a possible decompression bomb" if size is None else (
        f"{size[0]}x{size[1]} (WxH) = {size[0] * size[1]:,} pixels")
    return f"image too large ({what}): more than dataset.max_image_pixels={max_pixels:,} pixels (raise it to ingest larger images)"


def open_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and root path of a source URL (a plain path is a local file)."""
    return filesystem(url)


def order_splits(names: list[str] | set[str]) -> list[str]:
    """Split names in the conventional order: train, val, test, then the rest alphabetically."""
    rank = {name: k for k, name in enumerate(SPLIT_ORDER)}
    return sorted(names, key=lambda name: (rank.get(name, len(rank)), name))


def content_hash(data: bytes) -> str:
    """The short content hash in a sample id: 12 hex digits of sha256."""
    return hashlib.sha256(data).hexdigest()[:12]


def sample_ids(positions: Sequence[int | str], samples: np.ndarray | list[str]) -> np.ndarray:
    """Stable ids ``"<position>:<content hash>"``; images hash their stored pixel bytes, texts their UTF-8.

    A position that already ends with ``:<content hash>`` of its sample is a dq id (an exported
    subset read back) and is kept as it is, so export → ingest keeps ids.
    """
    ids = []
    for position, sample in zip(positions, samples, strict=True):
        data = sample.encode() if isinstance(sample, str) else np.ascontiguousarray(sample).tobytes()
        digest = content_hash(data)
        ids.append(str(position) if str(position).endswith(f":{digest}") else f"{position}:{digest}")
    return np.array(ids, dtype=str)


def resize_image(image: Image.Image, size: int) -> Image.Image:
    """Resize to ``size × size`` (bicubic, with Pillow's antialiasing when shrinking)."""
    return image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BICUBIC)


def image_batch(
    images: np.ndarray, labels: np.ndarray, start: int, *, resize: int | None, where: str,
    names: Sequence[str] | None = None,
) -> Batch:
    """Normalise rows ``start, start + 1, ...`` of an array source into a :class:`Batch`.

    Accepts ``(b, H, W)`` or ``(b, H, W, C)`` with C in {1, 3} and integer pixels in 0..255;
    ``where`` names the source in errors. ``names``: the rows' own names for their ids (stable
    when rows are inserted or removed), else their positions.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DQInputError(
            f"{where}: images must be (n, H, W) or (n, H, W, C) with C = 1 or 3; got shape {images.shape[1:]} per sample"
        )
    if images.dtype != np.uint8:
        if images.dtype.kind == "f" and not np.isfinite(images).all():
            sample = start + int(np.flatnonzero(~np.isfinite(images).reshape(len(images), -1).all(axis=1))[0])
            raise DQInputError(f"{where}: sample {sample} has non-finite pixel values (NaN or inf)")
        if images.dtype.kind not in "iu" or (images.size and (images.min() < 0 or images.max() > 255)):
            raise DQInputError(f"{where}: images must hold integer pixels in 0..255 (uint8); got {images.dtype}")
        images = images.astype(np.uint8)
    if resize is not None and images.shape[1:3] != (resize, resize):
        channels = images.shape[-1]
        images = np.stack([
            np.asarray(resize_image(Image.fromarray(image[..., 0] if channels == 1 else image), resize))
            .reshape(resize, resize, channels)
            for image in images
        ])
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DQInputError(
            f"{where}: labels must be one integer per sample; got {labels.dtype} of shape {labels.shape[1:]} per sample"
        )
    check_labels(labels, start, where)
    positions = range(start, start + len(images)) if names is None else [str(n) for n in names]
    return Batch(images, labels.astype(np.int64), sample_ids(positions, images))


def check_labels(labels: np.ndarray, start: int, where: str) -> None:
    """Labels are class indices ≥ 0 or :data:`NO_LABEL` (-1); other negative values are rejected,
    naming the sample (they would otherwise become classes of their own)."""
    bad = np.flatnonzero(labels < NO_LABEL)
    if bad.size:
        raise DQInputError(f"{where}: sample {start + int(bad[0])} has label {int(labels[bad[0]])}: labels must be >= 0, or -1 for 'no label'")


def array_batches(
    images, labels: np.ndarray, total: int, batch_size: int, *, resize: int | None, where: str
) -> Iterator[Batch]:
    """Slice the first ``total`` rows of an array-like (numpy, Zarr) image source into batches."""
    for start in range(0, total, batch_size):
        stop = min(start + batch_size, total)
        yield image_batch(images[start:stop], labels[start:stop], start, resize=resize, where=where)


def check_counts(where: str, split: str, num_images: int, num_labels: int) -> None:
    """Images and labels must pair up one to one."""
    if num_images != num_labels:
        raise DQInputError(
            f"{where}: label count differs from image count in split {split!r}: {num_images} images, {num_labels} labels"
        )
