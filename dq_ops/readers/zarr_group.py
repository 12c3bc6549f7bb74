"""An existing Zarr group (path or fsspec URL) holding ``images`` and ``labels`` arrays.

Either the group itself holds them (one "train" split) or each subgroup does (one split per
subgroup, e.g. a dq dataset artifact ``datasets/<name>`` with ``train/`` and ``test/``). The
group's ``class_names`` attribute, when present, names the labels. Rows are read chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Iterator

import zarr

from dq_ops.errors import DQInputError
from dq_ops.readers.base import Batch, SkippedItem, array_batches, check_counts, order_splits
from dq_ops.store import open_zarr_store


class ZarrGroupReader:
    """Images and labels from a Zarr v3 (or v2) group."""

    modality = "images"

    def __init__(self, url: str, *, resize: int | None = None, limit: int | None = None):
        self.source = url.rstrip("/")
        self.skipped: list[SkippedItem] = []  # arrays have no per-item failures
        self._resize, self._limit = resize, limit
        try:
            self._group = zarr.open_group(store=open_zarr_store(self.source, read_only=True), mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
            raise DQInputError(f"{self.source}: no Zarr group here") from None
        holders = {"train": self._group} if "images" in self._group else {
            name: sub for name, sub in self._group.groups() if "images" in sub
        }
        if not holders:
            raise DQInputError(
                f"{self.source}: no 'images' array in the group or in any of its subgroups "
                f"(it holds {sorted(self._group.keys())})"
            )
        self._arrays: dict[str, tuple[zarr.Array, zarr.Array]] = {}
        for split in order_splits(set(holders)):
            group = holders[split]
            if "labels" not in group:
                raise DQInputError(f"{self.source}: missing labels: {_path(group)}/images has no 'labels' array beside it")
            images, labels = group["images"], group["labels"]
            check_counts(self.source, split, images.shape[0], labels.shape[0])
            self._arrays[split] = (images, labels)
        names = self._group.attrs.get("class_names")
        self._classes = [str(name) for name in names] if names else None

    def splits(self) -> list[str]:
        return list(self._arrays)

    def num_samples(self, split: str) -> int:
        n = self._arrays[split][0].shape[0]
        return min(n, self._limit or n)

    def class_names(self) -> list[str] | None:
        return self._classes

    def iter_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        images, labels = self._arrays[split]
        where = f"{self.source}/{_path(images)}"
        yield from array_batches(images, labels, self.num_samples(split), batch_size, resize=self._resize, where=where)


def _path(node: zarr.Group | zarr.Array) -> str:
    return node.path or "."
