"""What the shard readers (Parquet, WebDataset) share: finding shards, naming splits, decoding.

A source is a folder (searched recursively), one shard file, or a glob (``s3://b/data/*.tar``),
on any fsspec filesystem. A shard's split is the first of its folders named like a split
(``train/``, ``val/``, ``validation/``, ``test/``), else the first split name among the ``-``,
``_`` or ``.``-separated words of its file name (``train-00000-of-00004.parquet``,
``imagenet-test-000000.tar``), else "train". Shards are read in name order.

Samples are named ``<shard path below the root>:<row or key>``: the name is the position in
the sample's id (``"<name>:<content hash>"``) and, after the root URL, what errors show. A sample
that carries an ``id`` (dq's own exports do) is named by it instead, so export → ingest keeps ids.

Only the encoded bytes are streamed; images are decoded one by one as batches are assembled.
Channels and size are taken from the first readable image (a decode of the whole dataset up
front would double what is read): a grayscale first image makes a one-channel dataset, any other
mode RGB. A later colour image in a one-channel dataset is taken only when its channels are equal
(gray in a colour container: WebP has no gray mode). Without ``resize`` every image must have the
first image's size.
"""

from __future__ import annotations

import io
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from dq_ops.errors import DQInputError
from dq_ops.readers.base import (
    DEFAULT_MAX_IMAGE_PIXELS,
    GRAY_MODES,
    NO_LABEL,
    SPLIT_ORDER,
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
from dq_ops.urls import is_glob, protocol_of


@dataclass(frozen=True)
class Shard:
    path: str  # on the filesystem
    name: str  # below the source root: what ids and errors show
    samples: int  # an upper bound: bad samples are skipped or raised while reading


@dataclass(frozen=True)
class Record:
    """One sample as stored in a shard, before decoding: ``name`` is ``<shard name>:<row or key>``."""

    name: str
    data: bytes
    label: int
    id: str | None = None


class ShardReader:
    """A :class:`~dq_ops.readers.base.Reader` over shard files; subclasses read one shard's
    metadata (:meth:`_open_shard`) and records (:meth:`_records`)."""

    modality = "images"
    suffixes: tuple[str, ...] = ()
    kind = ""  # "Parquet", "WebDataset": for errors

    def __init__(self, url: str, *, resize: int | None = None, on_error: OnError = "raise", limit: int | None = None,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.source = url.rstrip("/")
        self._resize, self._limit, self._max_pixels = resize, limit, max_image_pixels
        allow_image_pixels(max_image_pixels)
        self._errors = ItemErrors(on_error)
        self.skipped: list[SkippedItem] = self._errors.skipped
        self._fs, path = open_fs(self.source)
        found, root = self._find(path.rstrip("/"))
        self._base = root if protocol_of(self.source) == "file" else self._fs.unstrip_protocol(root)
        by_split: dict[str, list[Shard]] = {}
        for file in sorted(found):
            name = file[len(root):].lstrip("/")
            by_split.setdefault(_split_of(name), []).append(self._open_shard(file, name))
        self._shards = {split: by_split[split] for split in order_splits(set(by_split))}
        self._gray, self._size = self._probe()

    def __setstate__(self, state: dict) -> None:
        # Unpickled on a dask worker (ingest spreads shards): Pillow's pixel limit is per process.
        self.__dict__.update(state)
        allow_image_pixels(self._max_pixels)

    def _find(self, path: str) -> tuple[list[str], str]:
        """The shard files of ``path`` (folder, file or glob) and the root their names are relative to."""
        if is_glob(path):
            root = re.split(r"[*?\[]", path, maxsplit=1)[0].rsplit("/", 1)[0]  # the folder above the first wildcard
            files = [p for p, info in self._fs.glob(path, detail=True).items() if info["type"] == "file"]
        elif self._fs.isdir(path):
            root, files = path, self._fs.find(path)
        elif self._fs.isfile(path):
            root, files = path.rsplit("/", 1)[0], [path]
        else:
            raise DQInputError(f"{self.source}: not found")
        shards = [
            p for p in files
            if p.lower().endswith(self.suffixes) and not any(part.startswith(".") for part in p[len(root):].split("/"))
        ]
        if not shards:
            raise DQInputError(f"{self.source}: no {self.kind} shards ({', '.join(self.suffixes)}) found")
        return shards, root

    def _open_shard(self, path: str, name: str) -> Shard:
        raise NotImplementedError

    def _records(self, shard: Shard, errors: ItemErrors) -> Iterator[Record]:
        """The shard's samples in order; a sample without an image or label is reported to ``errors``."""
        raise NotImplementedError

    def _where(self, name: str) -> str:
        return f"{self._base}/{name}"

    def _probe(self) -> tuple[bool, tuple[int, int]]:
        """Colour mode and size of the first image Pillow can identify (headers only)."""
        unreported = ItemErrors("skip")  # the read reports bad samples; the probe only looks past them
        for shards in self._shards.values():
            for shard in shards:
                for record in self._records(shard, unreported):
                    try:
                        with Image.open(io.BytesIO(record.data)) as image:
                            if image.size[0] * image.size[1] <= self._max_pixels:
                                return image.mode in GRAY_MODES, image.size
                    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                        continue
        raise DQInputError(f"{self.source}: no readable images in its {self.kind} shards")

    def splits(self) -> list[str]:
        return list(self._shards)

    def sample_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of every decoded image: the first image's channels, at ``resize`` or its size."""
        width, height = self._size if self._resize is None else (self._resize, self._resize)
        return height, width, 1 if self._gray else 3

    def num_samples(self, split: str) -> int:
        n = sum(shard.samples for shard in self._shards[split])
        return min(n, self._limit or n)

    def class_names(self) -> list[str] | None:
        return None

    def iter_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        good = itertools.islice(self._decoded(self._shards[split], self._errors), self.num_samples(split))
        yield from _batched(good, batch_size)

    def parts(self, split: str) -> list[Shard]:
        """The split's shards in read order: the units ingest spreads over dask workers
        (``dq_ops.ingest``); ``Shard.samples`` bounds what each holds."""
        return list(self._shards[split])

    def part_batches(self, part: Shard, batch_size: int, take: int | None, errors: ItemErrors) -> Iterator[Batch]:
        """The first ``take`` (None: all) good samples of one shard, decoded, in batches; bad ones
        go to ``errors``. Concatenated in :meth:`parts` order they are :meth:`iter_batches`' samples."""
        yield from _batched(itertools.islice(self._decoded([part], errors), take), batch_size)

    def _decoded(self, shards: list[Shard], errors: ItemErrors) -> Iterator[tuple[Record, np.ndarray]]:
        """The good records of ``shards`` with their pixels, shard after shard."""
        for shard in shards:
            for record in self._records(shard, errors):
                pixels = self._decode(record, errors)
                if pixels is not None:
                    yield record, pixels

    def _decode(self, record: Record, errors: ItemErrors) -> np.ndarray | None:
        """The stored pixels of one record, or ``None`` for a bad one (reported to the error policy)."""
        where = self._where(record.name)
        if record.label < NO_LABEL:
            errors.bad(where, f"label {record.label}: labels must be >= 0, or -1 for 'no label'")
            return None
        try:
            image = Image.open(io.BytesIO(record.data))  # in memory: nothing to close
            if image.size[0] * image.size[1] > self._max_pixels:
                errors.bad(where, too_large(image.size, self._max_pixels))
                return None
            image.load()
        except Image.DecompressionBombError:  # Pillow's limit (twice its warning limit) is above ours
            errors.bad(where, too_large(None, self._max_pixels))
            return None
        except UnidentifiedImageError:  # its message names a file object, not the sample
            errors.bad(where, "corrupt image: Pillow cannot identify it as an image")
            return None
        except (OSError, SyntaxError, ValueError) as exc:  # Pillow raises all three on bad data
            errors.bad(where, f"corrupt image ({exc})")
            return None
        mode, size = image.mode, image.size
        if self._gray and mode not in GRAY_MODES:
            rgb = np.asarray(image.convert("RGB"))
            if not (rgb == rgb[..., :1]).all():
                raise DQInputError(
                    f"{where}: a {mode} image in a dataset whose first image is grayscale; dq stores every image "
                    "of a dataset with the first image's channels (convert the images to one mode)"
                )
            image = Image.fromarray(rgb[..., 0])  # gray in a colour container (WebP has no gray mode)
        image = image.convert("L" if self._gray else "RGB")
        if self._resize is None and size != self._size:
            raise DQInputError(
                f"{where}: image is {size[0]}x{size[1]} (WxH) but the first image is {self._size[0]}x{self._size[1]}; "
                "set dataset.resize to store them at one square size"
            )
        if self._resize is not None:
            image = resize_image(image, self._resize)
        pixels = np.asarray(image)
        return pixels[..., None] if self._gray else pixels


def _batched(good: Iterator[tuple[Record, np.ndarray]], batch_size: int) -> Iterator[Batch]:
    while chunk := list(itertools.islice(good, batch_size)):
        records, images = zip(*chunk)
        stacked = np.stack(images)
        positions = [record.id if record.id is not None else record.name for record in records]
        yield Batch(stacked, np.array([record.label for record in records], dtype=np.int64), sample_ids(positions, stacked))


def _split_of(name: str) -> str:
    """A shard's split from its path below the root (module docstring)."""
    *folders, file = name.split("/")
    for folder in folders:
        if folder in SPLIT_ORDER:
            return folder
    return next((word for word in re.split(r"[-_.]", file) if word in SPLIT_ORDER), "train")

