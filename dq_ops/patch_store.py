"""Compact storage of the patches DQ keeps: only the kept patch pixels, the keep mask and the
grid geometry, in a Zarr v3 group on any store.

Group layout (``PatchStore``)::

    <group>/                 attrs: {"dq_patches": {"version": 1, "image_shape": [H, W(, C)],
                                                    "patch_size": [ph, pw], "grid": [gh, gw]}}
        patches  (total_kept, ph, pw, C) image dtype   kept patches, image by image, each image's
                                                       kept patches in row-major grid order
        mask     (n, gh, gw) bool                      True = kept
        ids      (n,) str or int64                     stable sample ids
        labels   (n,) int64                            -1 = no label

Image ``i``'s patches are ``patches[offsets[i]:offsets[i + 1]]`` with
``offsets = [0, cumsum(mask[i].sum())]``; offsets are derived from the mask, not stored.
Every array uses the project's compressor (``dq_ops.store.default_compressor``: Blosc-zstd
level 5, byte shuffle) in chunks of about 1 MiB of raw rows; the whole-image reference in
:func:`storage_report` uses the same codec and chunking rule, so the two byte counts compare
layouts, not codecs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import zarr

from dq_ops.errors import DQInputError
from dq_ops.patches import patch_grid, patch_shape, patchify, unpatchify
from dq_ops.store import default_compressor

FORMAT_KEY = "dq_patches"
FORMAT_VERSION = 1
# About 1 MiB of raw data per chunk: on Fashion-MNIST larger chunks gained < 0.5% in compressed
# size, smaller ones (64 KiB) lost ~1%, and a reader decodes a whole chunk per random access.
CHUNK_BYTES = 2**20


@dataclass(frozen=True)
class PackedPatches:
    """Kept patches of ``n`` images.

    ``patches`` is ``(total_kept, ph, pw, C)`` (C = 1 for grayscale), ``offsets`` ``(n + 1,)``
    int64 with image ``i``'s patches at ``patches[offsets[i]:offsets[i + 1]]``, ``keep_mask``
    ``(n, gh, gw)`` bool and ``image_shape`` the per-image shape ``(H, W)`` or ``(H, W, C)``.
    """

    patches: np.ndarray
    offsets: np.ndarray
    keep_mask: np.ndarray
    image_shape: tuple[int, ...]

    @property
    def n(self) -> int:
        return int(self.keep_mask.shape[0])

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.keep_mask.shape[1]), int(self.keep_mask.shape[2])

    @property
    def patch_size(self) -> tuple[int, int]:
        return int(self.patches.shape[1]), int(self.patches.shape[2])

    @property
    def keep_fraction(self) -> float:
        """Kept patches / all patches."""
        return float(self.keep_mask.mean()) if self.keep_mask.size else 0.0


def _offsets(keep_mask: np.ndarray) -> np.ndarray:
    counts = keep_mask.reshape(len(keep_mask), -1).sum(axis=1)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _check_mask(keep_mask: np.ndarray, n: int, grid: tuple[int, int]) -> np.ndarray:
    keep_mask = np.asarray(keep_mask)
    if keep_mask.dtype != bool or keep_mask.shape != (n, *grid):
        raise DQInputError(
            f"keep_mask must be a bool array of shape {(n, *grid)}, got {keep_mask.dtype} {keep_mask.shape}"
        )
    return keep_mask


def pack_patches(images: np.ndarray, keep_mask: np.ndarray, patch_size: int | Sequence[int]) -> PackedPatches:
    """Keep only the patches where ``keep_mask`` is True (pure; no I/O)."""
    images = np.asarray(images)
    patches = patchify(images, patch_size)  # validates shapes and divisibility
    n, grid = len(images), patch_grid(images.shape[1:3], patch_size)
    keep_mask = _check_mask(keep_mask, n, grid)
    kept = patches[keep_mask.reshape(n, -1)]
    if kept.ndim == 3:
        kept = kept[..., None]
    return PackedPatches(kept, _offsets(keep_mask), keep_mask, tuple(int(s) for s in images.shape[1:]))


def unpack_patches(packed: PackedPatches) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(n, *image_shape)`` with the dropped patches zero-filled, and the keep mask."""
    n, (gh, gw), (ph, pw) = packed.n, packed.grid, packed.patch_size
    channels = packed.patches.shape[3]
    full = np.zeros((n, gh * gw, ph, pw, channels), dtype=packed.patches.dtype)
    full[packed.keep_mask.reshape(n, -1)] = packed.patches
    images = unpatchify(full, (gh, gw), (ph, pw))
    return images.reshape(n, *packed.image_shape), packed.keep_mask


def _chunk_rows(row_shape: Sequence[int], dtype: np.dtype) -> int:
    return max(1, CHUNK_BYTES // max(1, int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize))


def _create(group: zarr.Group, name: str, row_shape: tuple[int, ...], dtype: np.dtype | type) -> zarr.Array:
    if dtype is str:
        return group.create_array(name, shape=(0,), dtype=str, chunks=(2**16,), overwrite=True)
    return group.create_array(
        name,
        shape=(0, *row_shape),
        dtype=dtype,
        chunks=(_chunk_rows(row_shape, dtype), *row_shape),
        compressors=default_compressor(),
        overwrite=True,
    )


def stored_bytes(node: zarr.Group | zarr.Array) -> int:
    """Bytes the store holds for an array, or for every array below a group: the sizes of its
    encoded chunks plus its metadata document, as reported by the store (not ``nbytes``)."""
    if isinstance(node, zarr.Array):
        return int(node.nbytes_stored())
    return sum(int(a.nbytes_stored()) for _, a in node.members(max_depth=None) if isinstance(a, zarr.Array))


class PatchStore:
    """A patch group (layout in the module docstring) opened for reading and appending."""

    def __init__(self, group: zarr.Group) -> None:
        info = group.attrs.get(FORMAT_KEY)
        if not isinstance(info, dict) or info.get("version") != FORMAT_VERSION:
            raise DQInputError(f"zarr group {group.store_path} is not a dq patch store (no '{FORMAT_KEY}' attributes)")
        self.group = group
        self.image_shape: tuple[int, ...] = tuple(info["image_shape"])
        self.patch_size: tuple[int, int] = tuple(info["patch_size"])
        self.grid: tuple[int, int] = tuple(info["grid"])
        self._patches, self._mask = group["patches"], group["mask"]
        self._ids, self._labels = group["ids"], group["labels"]
        self._offsets: np.ndarray | None = None

    @classmethod
    def create(
        cls,
        group: zarr.Group,
        image_shape: Sequence[int],
        patch_size: int | Sequence[int],
        dtype: np.dtype | str = "uint8",
        id_dtype: type | str = str,
    ) -> PatchStore:
        """Write an empty patch store into ``group`` (replacing its arrays); fill it with :meth:`append`.

        ``image_shape`` is ``(H, W)`` or ``(H, W, C)``; ``id_dtype`` is ``str`` or an integer dtype.
        """
        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) not in (2, 3):
            raise DQInputError(f"image_shape must be (H, W) or (H, W, C), got {image_shape}")
        grid, (ph, pw) = patch_grid(image_shape[:2], patch_size), patch_shape(patch_size)
        channels = image_shape[2] if len(image_shape) == 3 else 1
        _create(group, "patches", (ph, pw, channels), np.dtype(dtype))
        _create(group, "mask", grid, np.dtype(bool))
        _create(group, "ids", (), str if id_dtype is str else np.dtype(np.int64))
        _create(group, "labels", (), np.dtype(np.int64))
        group.attrs[FORMAT_KEY] = {
            "version": FORMAT_VERSION, "image_shape": list(image_shape), "patch_size": [ph, pw], "grid": list(grid),
        }
        return cls(group)

    def __len__(self) -> int:
        return int(self._mask.shape[0])

    def append(self, packed: PackedPatches, ids: Sequence[str] | np.ndarray, labels: np.ndarray | None = None) -> None:
        """Append a batch of packed images with their sample ids (and labels, default -1)."""
        if packed.image_shape != self.image_shape or packed.grid != self.grid:
            raise DQInputError(
                f"packed images {packed.image_shape} on grid {packed.grid} do not match the store's "
                f"{self.image_shape} on grid {self.grid}"
            )
        ids = np.asarray(ids)
        labels = np.full(packed.n, -1, np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
        if ids.shape != (packed.n,) or labels.shape != (packed.n,):
            raise DQInputError(f"ids {ids.shape} and labels {labels.shape} must both have shape ({packed.n},)")
        self._patches.append(packed.patches.astype(self._patches.dtype, copy=False))
        self._ids.append(ids.astype(np.dtypes.StringDType()) if self._ids.dtype.kind in "OTU" else ids.astype(np.int64))
        self._labels.append(labels)
        # The mask goes last: a reader sizes the store by it, so a failed append shows no image.
        self._mask.append(packed.keep_mask)
        self._offsets = None

    @property
    def offsets(self) -> np.ndarray:
        """``(n + 1,)`` int64 start of each image's patches, derived from the whole mask."""
        if self._offsets is None:
            self._offsets = _offsets(self._mask[...])
        return self._offsets

    @property
    def ids(self) -> np.ndarray:
        return self._ids[: len(self)]

    @property
    def labels(self) -> np.ndarray:
        return self._labels[: len(self)]

    def read(self, indices: slice | Sequence[int] | np.ndarray = slice(None)) -> PackedPatches:
        """Packed patches of the images at ``indices`` (a slice or integer positions, in that order)."""
        offsets = self.offsets
        positions = np.arange(len(self))[indices] if isinstance(indices, slice) else np.asarray(indices, np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise DQInputError(f"patch store has {len(self)} images; indices out of range: {positions}")
        mask = self._mask.oindex[positions] if positions.size else np.zeros((0, *self.grid), bool)
        if positions.size and np.all(np.diff(positions) == 1):  # contiguous: one range read
            patches = self._patches[offsets[positions[0]]:offsets[positions[-1] + 1]]
        else:
            rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in positions] or [np.zeros(0, np.int64)])
            patches = self._patches.oindex[rows] if rows.size else self._patches[0:0]
        return PackedPatches(patches, _offsets(mask), mask, self.image_shape)

    def stored_bytes(self) -> int:
        """Stored bytes of the pixel payload: the ``patches`` and ``mask`` arrays (ids and labels,
        identical in any layout, are left out)."""
        return stored_bytes(self._patches) + stored_bytes(self._mask)


@dataclass(frozen=True)
class StorageReport:
    """Bytes of a patch store next to the same images stored whole.

    ``byte_ratio = patch_bytes / whole_image_bytes``; ``keep_ratio = sample_ratio ×
    patch_keep_ratio`` is the paper's "storage keep ratio" (12.5% of samples × 80% of patches =
    "10%"), which counts patches, not compressed bytes.
    """

    n_images: int
    raw_image_bytes: int
    whole_image_bytes: int
    patch_bytes: int
    patch_keep_ratio: float
    sample_ratio: float = 1.0

    @property
    def byte_ratio(self) -> float:
        return self.patch_bytes / self.whole_image_bytes if self.whole_image_bytes else float("nan")

    @property
    def keep_ratio(self) -> float:
        return self.sample_ratio * self.patch_keep_ratio


def storage_report(store: PatchStore, images: np.ndarray, sample_ratio: float = 1.0) -> StorageReport:
    """Measure ``store`` against ``images`` (the same images, same order) written whole into an
    in-memory Zarr array with the same codec and chunking rule."""
    images = np.asarray(images)
    if images.shape != (len(store), *store.image_shape):
        raise DQInputError(f"images {images.shape} are not the {len(store)} images of shape {store.image_shape} in the store")
    whole = _create(zarr.open_group(zarr.storage.MemoryStore(), mode="w"), "images", images.shape[1:], images.dtype)
    whole.append(images)
    return StorageReport(
        n_images=len(store),
        raw_image_bytes=int(images.nbytes),
        whole_image_bytes=stored_bytes(whole),
        patch_bytes=store.stored_bytes(),
        patch_keep_ratio=float(store.offsets[-1]) / max(1, len(store) * store.grid[0] * store.grid[1]),
        sample_ratio=sample_ratio,
    )
