"""A folder of PNG/JPEG images with one subfolder per class (the torchvision ``ImageFolder`` layout).

::

    root/[train|val|test/]<class>/.../<image>.png|.jpg|.jpeg

When every top-level folder is named train, val or test, those are the splits; otherwise the
whole folder is one "train" split. Images directly inside a split folder (no class folder) get
label -1. Class names are the class folders of all splits, sorted; a label is the index of its
folder name.

Before anything is decoded, the reader opens every image's header (cheap: Pillow reads only the
header) to learn sizes and colour modes. That finds mixed sizes before a write starts, and
decides the stored channels: all grayscale → ``(H, W, 1)``, otherwise every image is converted
to RGB ``(H, W, 3)``. An image of more than ``max_image_pixels`` pixels is a bad item named by its
file (a decompression bomb would exhaust memory; see :func:`~dq_ops.readers.base.allow_image_pixels`).

A split's files, in sorted order, come in parts of :data:`PART_FILES`: the units that ingest
decodes on dask workers for a large folder (a :class:`~dq_ops.readers.base.PartitionedReader`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from dq_ops.errors import DQInputError
from dq_ops.readers.base import (
    DEFAULT_MAX_IMAGE_PIXELS,
    GRAY_MODES,
    NO_LABEL,
    Batch,
    ItemErrors,
    OnError,
    SkippedItem,
    allow_image_pixels,
    open_fs,
    order_splits,
    resize_image,
    sample_ids,
    too_large,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLIT_FOLDERS = frozenset({"train", "val", "test"})
PART_FILES = 10_000  # files per part: enough decoding per dask task to outweigh its scheduling


@dataclass(frozen=True)
class FolderPart:
    """Files ``[start, stop)`` of a split, in sorted order."""

    split: str
    start: int
    stop: int

    @property
    def samples(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class _Entry:
    path: str  # relative to the root: the sample's name in ids and errors
    label: int
    size: tuple[int, int]  # Pillow's (width, height)
    gray: bool


class ImageFolderReader:
    """Images in class folders, optionally under train/val/test folders."""

    modality = "images"

    def __init__(self, url: str, *, resize: int | None = None, on_error: OnError = "raise", limit: int | None = None,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.source = url.rstrip("/")
        self._max_pixels = max_image_pixels
        allow_image_pixels(max_image_pixels)
        self._fs, self._root = open_fs(self.source)
        self._root = self._root.rstrip("/")
        self._resize = resize
        self._errors = ItemErrors(on_error)
        self.skipped: list[SkippedItem] = self._errors.skipped
        files, self._split_folders = self._list_files()
        self._classes = sorted({parts[1] for parts in files if len(parts) > 2})
        index = {name: k for k, name in enumerate(self._classes)}
        self._entries: dict[str, list[_Entry]] = {}
        for split in order_splits({parts[0] for parts in files}):
            rel_paths = sorted("/".join(parts[1:]) for parts in files if parts[0] == split)
            entries = []
            for rel in rel_paths:
                if limit is not None and len(entries) == limit:
                    break
                folders = rel.split("/")
                label = index[folders[0]] if len(folders) > 1 else NO_LABEL
                entry = self._probe(self._name(split, rel), label)
                if entry is not None:
                    entries.append(entry)
            self._entries[split] = entries
        all_entries = [e for entries in self._entries.values() for e in entries]
        if not all_entries:
            raise DQInputError(f"{self.source}: no readable PNG/JPEG images found")
        self._gray = all(e.gray for e in all_entries)
        if resize is None:
            first = all_entries[0]
            other = next((e for e in all_entries if e.size != first.size), None)
            if other is not None:
                raise DQInputError(
                    f"{self.source}: images differ in size: {first.path} is {_wxh(first.size)} but "
                    f"{other.path} is {_wxh(other.size)}; set dataset.resize to store them at one square size"
                )

    def _list_files(self) -> tuple[list[tuple[str, ...]], bool]:
        """Image files as path parts, each led by its split name; whether the root has split folders."""
        if not self._fs.isdir(self._root):
            raise DQInputError(f"{self.source}: not a folder")
        files = [
            tuple(path[len(self._root) + 1:].split("/"))
            for path in self._fs.find(self._root)
            if path.lower().endswith(IMAGE_SUFFIXES)
        ]
        files = [parts for parts in files if not any(p.startswith(".") for p in parts)]
        top_folders = {parts[0] for parts in files if len(parts) > 1}
        if top_folders and top_folders <= SPLIT_FOLDERS:
            return [parts for parts in files if len(parts) > 1], True
        return [("train", *parts) for parts in files], False

    def _name(self, split: str, rel: str) -> str:
        """A file's path relative to the source root (what users see in their folder)."""
        return f"{split}/{rel}" if self._split_folders else rel

    def _probe(self, name: str, label: int) -> _Entry | None:
        """Read one header; a file Pillow cannot identify, or too large an image, is a bad item."""
        try:
            with self._fs.open(f"{self._root}/{name}", "rb") as fh, Image.open(fh) as image:
                if image.size[0] * image.size[1] <= self._max_pixels:
                    return _Entry(name, label, image.size, image.mode in GRAY_MODES)
                size = image.size
        except Image.DecompressionBombError:  # Pillow's limit (twice its warning limit) is above ours
            size = None
        except UnidentifiedImageError:  # its message names a file object, not the file
            self._errors.bad(f"{self.source}/{name}", "corrupt image: Pillow cannot identify it as an image")
            return None
        except (OSError, SyntaxError, ValueError) as exc:  # Pillow raises all three on bad files
            self._errors.bad(f"{self.source}/{name}", f"corrupt image ({exc})")
            return None
        self._errors.bad(f"{self.source}/{name}", too_large(size, self._max_pixels))
        return None

    def splits(self) -> list[str]:
        return list(self._entries)

    def num_samples(self, split: str) -> int:
        return len(self._entries[split])

    def class_names(self) -> list[str] | None:
        return self._classes or None

    def _decode(self, entry: _Entry, errors: ItemErrors) -> np.ndarray | None:
        try:
            with self._fs.open(f"{self._root}/{entry.path}", "rb") as fh, Image.open(fh) as image:
                image = image.convert("L" if self._gray else "RGB")
        except (OSError, SyntaxError, ValueError) as exc:  # e.g. a truncated file whose header was fine
            errors.bad(f"{self.source}/{entry.path}", f"corrupt image ({exc})")
            return None
        if self._resize is not None:
            image = resize_image(image, self._resize)
        pixels = np.asarray(image)
        return pixels[..., None] if self._gray else pixels

    def iter_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        yield from self._batches(self._entries[split], batch_size, None, self._errors)

    def parts(self, split: str) -> list[FolderPart]:
        """The split's files in parts of :data:`PART_FILES`, in read order."""
        count = len(self._entries[split])
        return [FolderPart(split, start, min(start + PART_FILES, count)) for start in range(0, count, PART_FILES)]

    def part_batches(self, part: FolderPart, batch_size: int, take: int | None, errors: ItemErrors) -> Iterator[Batch]:
        """The first ``take`` (None: all) good images of one part, decoded, in batches; bad ones go
        to ``errors``. Concatenated in :meth:`parts` order they are :meth:`iter_batches`' samples."""
        yield from self._batches(self._entries[part.split][part.start:part.stop], batch_size, take, errors)

    def _batches(self, entries: list[_Entry], batch_size: int, take: int | None, errors: ItemErrors) -> Iterator[Batch]:
        decoded = ((entry, self._decode(entry, errors)) for entry in entries)
        good = itertools.islice(((entry, pixels) for entry, pixels in decoded if pixels is not None), take)
        while chunk := list(itertools.islice(good, batch_size)):
            images = np.stack([pixels for _, pixels in chunk])
            yield Batch(images, np.array([e.label for e, _ in chunk], dtype=np.int64), sample_ids([e.path for e, _ in chunk], images))


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]} (WxH)"
