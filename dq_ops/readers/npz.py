"""NumPy ``.npz`` archives: ``images``/``labels`` (one "train" split) or ``x_<split>``/``y_<split>``
pairs (``x_train``, ``y_train``, ``x_test``, ...). An optional ``class_names`` array names the labels.
Optional ``ids`` (or ``ids_<split>``) string arrays name the samples: their ids are then
``"<name>:<content hash>"`` instead of ``"<position>:<content hash>"``, so a refreshed archive with
rows inserted or removed keeps every other sample's id (and its selection).

Images stream out of the archive member in row batches (the ``.npy`` payload is read
sequentially), so an archive larger than memory can be ingested; labels are read whole.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import numpy as np

from dq_ops.errors import DQInputError
from dq_ops.readers.base import (
    Batch,
    SkippedItem,
    check_counts,
    image_batch,
    open_fs,
    order_splits,
)


def _header(member: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of a ``.npy`` stream, leaving it at the first value."""
    version = np.lib.format.read_magic(member)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(member)


class NpzReader:
    """One ``.npz`` file (path or fsspec URL)."""

    modality = "images"

    def __init__(self, url: str, *, resize: int | None = None, limit: int | None = None):
        self.source = url
        self.skipped: list[SkippedItem] = []  # arrays have no per-item failures
        self._resize, self._limit = resize, limit
        self._fs, self._path = open_fs(url)
        with self._zip() as archive:
            keys = {name.removesuffix(".npy") for name in archive.namelist()}
            if "images" in keys:
                pairs = {"train": ("images", "labels")}
            else:
                pairs = {key[2:]: (key, f"y_{key[2:]}") for key in keys if key.startswith("x_")}
            if not pairs:
                raise DQInputError(
                    f"{url}: no images found: expected arrays 'images' and 'labels' or x_<split>/y_<split> "
                    f"(x_train, y_train, ...); the archive holds {sorted(keys)}"
                )
            for images, labels in pairs.values():
                if labels not in keys:
                    raise DQInputError(f"{url}: missing labels: array {images!r} has no {labels!r} beside it")
            self._pairs = {split: pairs[split] for split in order_splits(set(pairs))}
            self._shapes = {key: self._shape(archive, key) for pair in pairs.values() for key in pair}
            self._names = {
                split: self._load(archive, key).astype(str)
                for split in self._pairs
                for key in (("ids",) if split == "train" and "images" in keys else (f"ids_{split}",))
                if key in keys
            }
            self._classes = (
                [str(name) for name in self._load(archive, "class_names")] if "class_names" in keys else None
            )
        for split, (images, labels) in self._pairs.items():
            check_counts(url, split, self._shapes[images][0], self._shapes[labels][0])
            if split in self._names and len(self._names[split]) != self._shapes[images][0]:
                raise DQInputError(f"{url}: {len(self._names[split])} ids for {self._shapes[images][0]} images in split {split!r}")

    @contextmanager
    def _zip(self) -> Iterator[zipfile.ZipFile]:
        try:
            fh = self._fs.open(self._path, "rb")
        except FileNotFoundError:
            raise DQInputError(f"{self.source}: file not found") from None
        with fh:
            try:
                archive = zipfile.ZipFile(fh)
            except zipfile.BadZipFile:
                raise DQInputError(f"{self.source}: not an .npz archive (bad zip file)") from None
            with archive:
                yield archive

    def _shape(self, archive: zipfile.ZipFile, key: str) -> tuple[int, ...]:
        with archive.open(f"{key}.npy") as member:
            shape, _, _ = _header(member)
        if not shape:
            raise DQInputError(f"{self.source}: array {key!r} is a scalar, expected one row per sample")
        return shape

    def _load(self, archive: zipfile.ZipFile, key: str) -> np.ndarray:
        with archive.open(f"{key}.npy") as member:
            try:
                return np.lib.format.read_array(member, allow_pickle=False)
            except ValueError as exc:  # object arrays need pickle, which we never load
                raise DQInputError(f"{self.source}: cannot read array {key!r} ({exc})") from None

    def splits(self) -> list[str]:
        return list(self._pairs)

    def num_samples(self, split: str) -> int:
        n = self._shapes[self._pairs[split][0]][0]
        return min(n, self._limit or n)

    def class_names(self) -> list[str] | None:
        return self._classes

    def iter_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        images_key, labels_key = self._pairs[split]
        where = f"{self.source}[{images_key!r}]"
        total = self.num_samples(split)
        with self._zip() as archive:
            labels = self._load(archive, labels_key)
            with archive.open(f"{images_key}.npy") as member:
                shape, fortran, dtype = _header(member)
                if fortran or dtype.hasobject:  # no contiguous rows to stream: load whole (refuses objects)
                    images = self._load(archive, images_key)[:total]
                    names = self._names.get(split)
                    for start in range(0, total, batch_size):
                        rows = slice(start, start + batch_size)
                        yield image_batch(images[rows], labels[rows], start, resize=self._resize, where=where,
                                          names=None if names is None else names[rows])
                    return
                row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
                for start in range(0, total, batch_size):
                    rows = min(batch_size, total - start)
                    data = member.read(rows * row_bytes)
                    if len(data) < rows * row_bytes:  # the header promises more rows than the member holds
                        raise DQInputError(
                            f"{self.source}: {images_key}: truncated: the header says {shape[0]} rows, "
                            f"the data holds {start + len(data) // row_bytes}"
                        )
                    images = np.frombuffer(data, dtype=dtype).reshape(rows, *shape[1:])
                    names = self._names[split][start:start + rows] if split in self._names else None
                    yield image_batch(images, labels[start:start + rows], start, resize=self._resize, where=where, names=names)
