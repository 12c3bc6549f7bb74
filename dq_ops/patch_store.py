"""Compact storage of the patches DQ keeps: only the kept patch pixels, the keep mask and the
grid geometry, in a Zarr v3 group on any store.

Every image keeps the same number ``k = kept_patch_count(L, θ)`` of its ``L = gh·gw`` patches
(:func:`dq_ops.patches.select_patches`), so rows have a fixed size and the store is
preallocated: dask workers write disjoint row ranges side by side.

Group layout (``PatchStore``)::

    <group>/                 attrs: {"dq_patches": {"version": 2, "image_shape": [H, W(, C)],
                                     "patch_size": [ph, pw], "grid": [gh, gw], "kept_per_image": k,
                                     "chunk_rows": r}}
        patches  (n, k, ph, pw, C) image dtype   image i's kept patches in row-major grid order
        mask     (n, gh, gw) bool                True = kept (k per row)
        ids      (n,) str or int64               stable sample ids
        labels   (n,) int64                      -1 = no label

Every array is chunked along rows by the same ``r`` rows, so a writer of rows ``[a·r, b·r)``
touches only its own chunks (a Zarr chunk is the unit of a safe concurrent write). ``r``
defaults to about 1 MiB of kept-patch pixels per chunk: on Fashion-MNIST larger chunks barely
compressed better, smaller ones compressed worse, and a reader decodes a whole chunk per random
access. Pixel arrays use the project's compressor (``dq_ops.store.default_compressor``:
Blosc-zstd, byte shuffle) at level :data:`STORAGE_CLEVEL`, 5: here the bytes are the point; :func:`whole_image_bytes` stores the same images whole with
the same codec in the same row chunks, so the two byte counts compare layouts, not codecs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import zarr

from dq_ops.errors import DQInputError
from dq_ops.patches import patch_grid, patch_shape, patchify, unpatchify
from dq_ops.store import checksummed, default_compressor

FORMAT_KEY = "dq_patches"
FORMAT_VERSION = 2
CHUNK_BYTES = 2**20
STORAGE_CLEVEL = 5


@dataclass(frozen=True)
class PackedPatches:
    """Kept patches of ``n`` images, ``k`` each.

    ``patches`` is ``(n, k, ph, pw, C)`` (C = 1 for grayscale), image ``i``'s kept patches in
    row-major grid order; ``keep_mask`` ``(n, gh, gw)`` bool with ``k`` True per row;
    ``image_shape`` the per-image shape ``(H, W)`` or ``(H, W, C)``.
    """

    patches: np.ndarray
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
        return int(self.patches.shape[2]), int(self.patches.shape[3])

    @property
    def kept_per_image(self) -> int:
        return int(self.patches.shape[1])


def _check_mask(keep_mask: np.ndarray, n: int, grid: tuple[int, int]) -> np.ndarray:
    keep_mask = np.asarray(keep_mask)
    if keep_mask.dtype != bool or keep_mask.shape != (n, *grid):
        raise DQInputError(
            f"keep_mask must be a bool array of shape {(n, *grid)}, got {keep_mask.dtype} {keep_mask.shape}"
        )
    counts = keep_mask.reshape(n, -1).sum(axis=1)
    if n and (counts != counts[0]).any():
        raise DQInputError(
            f"every image must keep the same number of patches; got between {counts.min()} and {counts.max()}"
        )
    return keep_mask


def pack_patches(images: np.ndarray, keep_mask: np.ndarray, patch_size: int | Sequence[int]) -> PackedPatches:
    """Keep only the patches where ``keep_mask`` is True (the same count per image; pure, no I/O)."""
    images = np.asarray(images)
    patches = patchify(images, patch_size)  # validates shapes and divisibility
    n, grid = len(images), patch_grid(images.shape[1:3], patch_size)
    keep_mask = _check_mask(keep_mask, n, grid)
    k = int(keep_mask[0].sum()) if n else 0
    kept = patches[keep_mask.reshape(n, -1)]  # boolean indexing keeps row-major order
    if kept.ndim == 3:
        kept = kept[..., None]
    return PackedPatches(kept.reshape(n, k, *kept.shape[1:]), keep_mask, tuple(int(s) for s in images.shape[1:]))


def unpack_patches(packed: PackedPatches) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(n, *image_shape)`` with the dropped patches zero-filled, and the keep mask."""
    n, (gh, gw), (ph, pw) = packed.n, packed.grid, packed.patch_size
    channels = packed.patches.shape[4]
    full = np.zeros((n, gh * gw, ph, pw, channels), dtype=packed.patches.dtype)
    full[packed.keep_mask.reshape(n, -1)] = packed.patches.reshape(-1, ph, pw, channels)
    images = unpatchify(full, (gh, gw), (ph, pw))
    return images.reshape(n, *packed.image_shape), packed.keep_mask


def default_chunk_rows(kept_per_image: int, patch_size: int | Sequence[int], channels: int = 1, itemsize: int = 1) -> int:
    """Rows per chunk holding about :data:`CHUNK_BYTES` of kept-patch pixels (at least 1)."""
    ph, pw = patch_shape(patch_size)
    return max(1, CHUNK_BYTES // max(1, kept_per_image * ph * pw * channels * itemsize))


def _create(
    group: zarr.Group, name: str, n: int, row_shape: tuple[int, ...], dtype: np.dtype | type, chunk_rows: int
) -> zarr.Array:
    text = dtype is str
    return group.create_array(
        name,
        shape=(n, *row_shape),
        dtype=str if text else dtype,
        chunks=(chunk_rows, *row_shape),
        compressors=checksummed(None if text else default_compressor(STORAGE_CLEVEL)),
        fill_value="" if text else None,
        overwrite=True,
    )


def stored_bytes(node: zarr.Group | zarr.Array) -> int:
    """Bytes the store holds for an array, or for every array below a group: the sizes of its
    encoded chunks plus its metadata document, as reported by the store (not ``nbytes``)."""
    if isinstance(node, zarr.Array):
        return int(node.nbytes_stored())
    return sum(int(a.nbytes_stored()) for _, a in node.members(max_depth=None) if isinstance(a, zarr.Array))


def _whole_image_array(stored: dict, shape: tuple[int, ...], dtype: np.dtype, chunk_rows: int) -> zarr.Array:
    return zarr.create_array(
        zarr.storage.MemoryStore(stored), shape=shape, dtype=dtype,
        chunks=(max(1, chunk_rows), *shape[1:]), compressors=checksummed(default_compressor(STORAGE_CLEVEL)),
    )


def whole_image_bytes(images: np.ndarray, chunk_rows: int) -> int:
    """Encoded chunk bytes of ``images`` written whole into an in-memory Zarr array with the
    patch store's codec in chunks of ``chunk_rows`` rows: the reference :class:`StorageReport`
    compares against. Additive over row ranges that start on chunk boundaries, so workers measure
    their own chunks and the sums are combined (:func:`storage_report` adds the one metadata
    document)."""
    images = np.asarray(images)
    stored: dict = {}
    array = _whole_image_array(stored, images.shape, images.dtype, chunk_rows)
    if images.size:
        array[...] = images
    return sum(len(value) for key, value in stored.items() if key != "zarr.json")


class PatchStore:
    """A patch group (layout in the module docstring) opened for reading and writing rows."""

    def __init__(self, group: zarr.Group) -> None:
        info = group.attrs.get(FORMAT_KEY)
        if not isinstance(info, dict) or info.get("version") != FORMAT_VERSION:
            raise DQInputError(
                f"zarr group {group.store_path} is not a dq patch store of format {FORMAT_VERSION} "
                f"(no '{FORMAT_KEY}' attributes with version {FORMAT_VERSION})"
            )
        self.group = group
        self.image_shape: tuple[int, ...] = tuple(info["image_shape"])
        self.patch_size: tuple[int, int] = tuple(info["patch_size"])
        self.grid: tuple[int, int] = tuple(info["grid"])
        self.kept_per_image: int = int(info["kept_per_image"])
        self.chunk_rows: int = int(info["chunk_rows"])
        self._patches, self._mask = group["patches"], group["mask"]
        self._ids, self._labels = group["ids"], group["labels"]

    @classmethod
    def create(
        cls,
        group: zarr.Group,
        n: int,
        image_shape: Sequence[int],
        patch_size: int | Sequence[int],
        kept_per_image: int,
        *,
        chunk_rows: int | None = None,
        dtype: np.dtype | str = "uint8",
        id_dtype: type | str = str,
    ) -> PatchStore:
        """Preallocate a store of ``n`` images in ``group`` (replacing its arrays); fill it with :meth:`write`.

        ``image_shape`` is ``(H, W)`` or ``(H, W, C)``; ``id_dtype`` is ``str`` or an integer
        dtype; ``chunk_rows`` defaults to :func:`default_chunk_rows`.
        """
        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) not in (2, 3):
            raise DQInputError(f"image_shape must be (H, W) or (H, W, C), got {image_shape}")
        grid, (ph, pw) = patch_grid(image_shape[:2], patch_size), patch_shape(patch_size)
        if not 1 <= kept_per_image <= grid[0] * grid[1]:
            raise DQInputError(f"kept_per_image must be in [1, {grid[0] * grid[1]}], got {kept_per_image}")
        channels = image_shape[2] if len(image_shape) == 3 else 1
        dtype = np.dtype(dtype)
        chunk_rows = chunk_rows or default_chunk_rows(kept_per_image, (ph, pw), channels, dtype.itemsize)
        _create(group, "patches", n, (kept_per_image, ph, pw, channels), dtype, chunk_rows)
        _create(group, "mask", n, grid, np.dtype(bool), chunk_rows)
        _create(group, "ids", n, (), str if id_dtype is str else np.dtype(np.int64), chunk_rows)
        _create(group, "labels", n, (), np.dtype(np.int64), chunk_rows)
        group.attrs[FORMAT_KEY] = {
            "version": FORMAT_VERSION, "image_shape": list(image_shape), "patch_size": [ph, pw], "grid": list(grid),
            "kept_per_image": kept_per_image, "chunk_rows": chunk_rows,
        }
        return cls(group)

    def __len__(self) -> int:
        return int(self._mask.shape[0])

    def write(
        self, start: int, packed: PackedPatches, ids: Sequence[str] | np.ndarray, labels: np.ndarray | None = None
    ) -> None:
        """Write packed images into rows ``[start, start + n)`` with their sample ids (and labels,
        default -1). ``start`` must be a multiple of ``chunk_rows`` so that concurrent writers of
        different row ranges never share a chunk."""
        if (packed.image_shape, packed.grid, packed.kept_per_image) != (self.image_shape, self.grid, self.kept_per_image):
            raise DQInputError(
                f"packed images {packed.image_shape} on grid {packed.grid} keeping {packed.kept_per_image} patches "
                f"do not match the store's {self.image_shape} on grid {self.grid} keeping {self.kept_per_image}"
            )
        stop = start + packed.n
        if start % self.chunk_rows or not 0 <= start <= stop <= len(self):
            raise DQInputError(
                f"rows [{start}, {stop}) are outside the store's {len(self)} rows or do not start on a "
                f"{self.chunk_rows}-row chunk boundary"
            )
        ids = np.asarray(ids)
        labels = np.full(packed.n, -1, np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
        if ids.shape != (packed.n,) or labels.shape != (packed.n,):
            raise DQInputError(f"ids {ids.shape} and labels {labels.shape} must both have shape ({packed.n},)")
        self._patches[start:stop] = packed.patches.astype(self._patches.dtype, copy=False)
        self._mask[start:stop] = packed.keep_mask
        self._ids[start:stop] = ids.astype(np.dtypes.StringDType()) if self._ids.dtype.kind in "OTU" else ids.astype(np.int64)
        self._labels[start:stop] = labels

    @property
    def ids(self) -> zarr.Array:
        """The ``ids`` array (read rows with slicing; never loaded whole here)."""
        return self._ids

    @property
    def labels(self) -> zarr.Array:
        return self._labels

    def read(self, indices: slice | Sequence[int] | np.ndarray = slice(None)) -> PackedPatches:
        """Packed patches of the images at ``indices`` (a slice or integer positions, in that order)."""
        if isinstance(indices, slice):
            return PackedPatches(self._patches[indices], self._mask[indices], self.image_shape)
        positions = np.asarray(indices, np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise DQInputError(f"patch store has {len(self)} images; indices out of range: {positions}")
        if not positions.size:
            return self.read(slice(0, 0))
        return PackedPatches(self._patches.oindex[positions], self._mask.oindex[positions], self.image_shape)

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


def storage_report(store: PatchStore, whole_chunk_bytes: int, sample_ratio: float = 1.0) -> StorageReport:
    """Measure ``store`` against the same images stored whole: ``whole_chunk_bytes`` is their
    :func:`whole_image_bytes` in the store's row chunks (summed over chunks when workers measured
    them), to which the whole array's metadata document is added, as the patch store's figure
    includes its own two."""
    n, (gh, gw) = len(store), store.grid
    dtype = np.dtype(store._patches.dtype)
    stored: dict = {}
    _whole_image_array(stored, (n, *store.image_shape), dtype, store.chunk_rows)
    return StorageReport(
        n_images=n,
        raw_image_bytes=n * int(np.prod(store.image_shape)) * dtype.itemsize,
        whole_image_bytes=int(whole_chunk_bytes) + len(stored["zarr.json"]),
        patch_bytes=store.stored_bytes(),
        patch_keep_ratio=store.kept_per_image / (gh * gw),
        sample_ratio=sample_ratio,
    )
