"""Gzipped (or plain) IDX files, the format of MNIST and Fashion-MNIST.

A source folder holds ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``; ``t10k`` is the
"test" split. Images stream from the file in row batches, so only one batch of pixels is in
memory at a time (labels, one byte per sample, are read whole).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np

from dq_ops.errors import DQInputError
from dq_ops.readers.base import Batch, SkippedItem, check_counts, image_batch, open_fs

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# Split name -> file prefix.
_PREFIXES = {"train": "train", "test": "t10k"}

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def _open(url: str) -> IO[bytes]:
    fs, path = open_fs(url)
    try:
        return fs.open(path, "rb", compression="gzip" if path.endswith(".gz") else None)
    except FileNotFoundError:
        raise DQInputError(f"{url}: IDX file not found") from None


def _read_header(fh: IO[bytes], url: str) -> tuple[np.dtype, tuple[int, ...]]:
    """Parse the magic number and dimensions, leaving ``fh`` at the first value."""
    try:
        magic = fh.read(4)
        if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
            raise DQInputError(f"{url}: not an IDX file (bad magic number)")
        dims = fh.read(4 * magic[3])
    except (OSError, EOFError) as exc:  # e.g. a .gz that is not gzip
        raise DQInputError(f"{url}: unreadable IDX file ({exc})") from None
    if len(dims) < 4 * magic[3]:
        raise DQInputError(f"{url}: truncated IDX header")
    shape = tuple(int.from_bytes(dims[4 * k: 4 * k + 4], "big") for k in range(magic[3]))
    return np.dtype(_IDX_DTYPES[magic[2]]), shape


def _read_rows(fh: IO[bytes], url: str, dtype: np.dtype, shape: tuple[int, ...], rows: int) -> np.ndarray:
    """The next ``rows`` rows as a native-endian array; a short read means a truncated file."""
    row_items = int(np.prod(shape[1:], dtype=np.int64))
    want = rows * row_items * dtype.itemsize
    try:
        raw = fh.read(want)
    except (OSError, EOFError) as exc:
        raise DQInputError(f"{url}: unreadable IDX file ({exc})") from None
    if len(raw) != want:
        raise DQInputError(f"{url}: truncated IDX file (header says {shape[0]} rows of {shape[1:]})")
    return np.frombuffer(raw, dtype=dtype).reshape(rows, *shape[1:]).astype(dtype.newbyteorder("="))


def _check_end(fh: IO[bytes], url: str) -> None:
    if fh.read(1):
        raise DQInputError(f"{url}: IDX file is longer than its header says (padded or wrong shape)")


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (``.gz`` or plain; a path or fsspec URL) into a native-endian array of its stored shape."""
    url = str(path)
    with _open(url) as fh:
        dtype, shape = _read_header(fh, url)
        array = _read_rows(fh, url, dtype, shape, shape[0] if shape else 0)
        _check_end(fh, url)
    return array


def _find(fs, root: str, stem: str) -> str | None:
    """``root/stem.gz`` or ``root/stem``, whichever exists (the gzipped file first)."""
    for name in (f"{stem}.gz", stem):
        if fs.exists(f"{root}/{name}"):
            return f"{root}/{name}"
    return None


def load_fashion_mnist(split: str = "train", root: str | Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(n, 28, 28) uint8`` and labels ``(n,) int64`` of a Fashion-MNIST split ("train" or "test")."""
    reader = IdxReader(str(root))
    if split not in reader.splits():
        raise DQInputError(f"unknown Fashion-MNIST split {split!r}; expected 'train' or 'test'")
    images_url, labels_url = reader.files(split)
    images, labels = read_idx(images_url), read_idx(labels_url).astype(np.int64)
    if len(images) != len(labels):
        raise DQInputError(f"{root}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels


class IdxReader:
    """A folder of IDX files (MNIST layout); splits "train" and "test" as present.

    ``class_names`` are given by the caller (Fashion-MNIST's ten names for format
    "fashion-mnist"); plain IDX labels are bare integers.
    """

    modality = "images"

    def __init__(
        self,
        url: str,
        *,
        class_names: tuple[str, ...] | None = None,
        resize: int | None = None,
        limit: int | None = None,
    ):
        self.source = url.rstrip("/")
        self.skipped: list[SkippedItem] = []  # IDX has no per-item failures
        self._class_names = list(class_names) if class_names else None
        self._resize, self._limit = resize, limit
        fs, root = open_fs(self.source)
        self._files: dict[str, tuple[str, str]] = {}
        for split, prefix in _PREFIXES.items():
            images = _find(fs, root, f"{prefix}-images-idx3-ubyte")
            labels = _find(fs, root, f"{prefix}-labels-idx1-ubyte")
            if images is None:
                continue
            if labels is None:
                raise DQInputError(
                    f"{self.source}: missing labels for split {split!r}: "
                    f"found {images.rsplit('/', 1)[-1]} but no {prefix}-labels-idx1-ubyte[.gz]"
                )
            self._files[split] = (self._url(images), self._url(labels))
        if not self._files:
            raise DQInputError(
                f"{self.source}: no IDX images found (expected train-images-idx3-ubyte[.gz] or t10k-images-idx3-ubyte[.gz])"
            )

    def _url(self, path: str) -> str:
        """The URL of a file found under the source (keeps the source's protocol)."""
        return f"{self.source}/{path.rsplit('/', 1)[-1]}"

    def files(self, split: str) -> tuple[str, str]:
        """URLs of a split's images and labels files."""
        return self._files[split]

    def splits(self) -> list[str]:
        return list(self._files)

    def class_names(self) -> list[str] | None:
        return self._class_names

    def num_samples(self, split: str) -> int:
        images_url, _ = self._files[split]
        with _open(images_url) as fh:
            _, shape = _read_header(fh, images_url)
        return min(shape[0], self._limit or shape[0])

    def iter_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        images_url, labels_url = self._files[split]
        labels = read_idx(labels_url)
        with _open(images_url) as fh:
            dtype, shape = _read_header(fh, images_url)
            if len(shape) != 3:
                raise DQInputError(f"{images_url}: expected (n, H, W) images, header says {shape}")
            if labels.ndim != 1:
                raise DQInputError(f"{labels_url}: expected (n,) labels, header says {labels.shape}")
            check_counts(f"{images_url} and {labels_url}", split, shape[0], len(labels))
            total = self.num_samples(split)
            for start in range(0, total, batch_size):
                rows = min(batch_size, total - start)
                images = _read_rows(fh, images_url, dtype, shape, rows)
                yield image_batch(images, labels[start:start + rows], start, resize=self._resize, where=images_url)
            if total == shape[0]:
                _check_end(fh, images_url)
