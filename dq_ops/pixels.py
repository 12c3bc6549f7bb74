"""Stages 4-5 on a dask cluster: Grad-CAM++ patch dropping, MAE training and reconstruction.

The subset is cut into row chunks of ``r`` images (the patch store's Zarr chunk, so no two tasks
write the same chunk). The client sends each task URLs and a row range, never arrays; the worker
reads its rows from the store, computes, and writes them into a resumable staging group; the
stages are :class:`~dq_ops.stage.ChunkedStage` s, which mark ``done[chunk]`` last and on a
rerun submit only the chunks not marked done. This module holds the stages (keys, layouts, job
descriptions: no torch); what the workers run is :mod:`dq_ops.pixel_work`, which loads each
model once per worker process on the worker's device (its GPU under dask-cuda).

Reports are combined from per-chunk sums that the workers store beside their rows
(``chunk_stats``), so the flow process never holds subset-sized arrays:

* ``patches/<key>`` (:mod:`dq_ops.patch_store` layout) attributes: ``stored_bytes`` against
  ``whole_image_bytes`` = Σ over chunks of the same images stored whole with the same codec in
  the same row chunks (:func:`dq_ops.patch_store.whole_image_bytes`), and the keep ratios.
* ``reconstructions/<key>``: ``images`` (n, H, W, C) uint8 in subset order, ``labels``, ``ids``;
  attributes ``psnr_<fill>_db = 10·log10(255² · Σ count / Σ SSE)`` over the dropped pixels for
  the MAE and the mean-/zero-fill baselines (per chunk,
  :func:`dq_ops.reconstruction_quality.dropped_squared_error`), and ``preview_png`` (original |
  kept patches | reconstruction of the first images, :func:`dq_ops.gallery.reconstruction_grid`).
* ``models/<key>``: the MAE, trained as one task on a worker (a GPU worker when there is one).

Grad-CAM++ is dq's own batched implementation (:func:`dq_ops.gradcam.gradcam_plus_plus`), not
the ``grad-cam`` package (pytorch-grad-cam). The package back-propagates into every parameter
of the backbone (``loss.backward``) rather than only to the target layer, computes the CAM in
NumPy and resizes each map with OpenCV one image at a time (on a GPU that pulls every batch back
to the host), and needs OpenCV, ttach and scikit-learn. Its maps rank patches almost
identically, and dq's is faster (``bench/gradcam.py``; figures in docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from dq_ops.backbone_spec import weights_digest
from dq_ops.config import EmbeddingConfig, PatchConfig
from dq_ops.errors import DQInputError
from dq_ops.gallery import reconstruction_grid
from dq_ops.patch_store import PatchStore, storage_report
from dq_ops.patch_store import default_chunk_rows as patch_chunk_rows
from dq_ops.patches import kept_patch_count, patch_grid
from dq_ops.progress import Progress
from dq_ops.reconstruction_quality import psnr_db
from dq_ops.stage import ChunkedStage, Stage, run_jobs
from dq_ops.store import QUANTIZED_SPLIT as SPLIT
from dq_ops.store import Artifact, Store, file_digest, open_zarr_store, write_array

if TYPE_CHECKING:
    from dq_ops.stage import ClientSource

PREVIEW_IMAGES = 8
# Per-chunk sums of the reconstruction report, in this column order.
RECONSTRUCTION_STATS = ("dropped_values", "sse_mae", "sse_mean_fill", "sse_zero_fill")


# -- job descriptions (built here, run by dq_ops.pixel_work on the workers) ---------------------------
@dataclass(frozen=True)
class ScorerSpec:
    """What identifies a loaded Grad-CAM++ classifier; hashable and cheap to send to workers."""

    backbone: str
    weights: str | None
    cam_image_size: int


@dataclass(frozen=True)
class PixelChunkJob:
    """One task's whole input: where to read and write, and its row range."""

    store_url: str
    storage_options: dict[str, Any]
    staging_url: str
    index: int
    start: int
    stop: int
    inputs: dict[str, Any] = field(default_factory=dict)  # artifact names and stage settings

    def store(self) -> Store:
        return Store(self.store_url, self.storage_options)

    def staging(self) -> zarr.Group:
        return zarr.open_group(open_zarr_store(self.staging_url, self.storage_options), mode="r+")


@dataclass(frozen=True)
class MAEJob:
    """The MAE training task's input: the dataset by store URL and name, the patch settings."""

    store_url: str
    storage_options: dict[str, Any]
    dataset: str
    config: dict[str, Any]  # PatchConfig as JSON
    seed: int


def subset_images(store: Store, dataset: str, subset: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of subset rows ``[start, stop)``, read from the dataset's Zarr."""
    split = store.open("datasets", dataset)[SPLIT]
    rows = np.asarray(store.open("subsets", subset)["indices"][start:stop])
    return (np.asarray(split["images"].get_orthogonal_selection((rows,))),
            np.asarray(split["labels"].get_orthogonal_selection((rows,))))


# -- stages (client side) --------------------------------------------------------------------------
def _add_chunk_stats(group: zarr.Group, rows: int, chunk_rows: int, columns: int) -> None:
    """Per-chunk sums written by the workers beside their rows (read and dropped in ``finalize``)."""
    chunks = -(-rows // chunk_rows)
    group.create_array("chunk_stats", shape=(chunks, columns), dtype=np.float64, chunks=(1, columns), fill_value=0.0)


def _pop_chunk_stats(group: zarr.Group) -> np.ndarray:
    stats = np.asarray(group["chunk_stats"][:])
    del group["chunk_stats"]
    return stats


class DropPatchesStage(ChunkedStage):
    """Stage 4 (``patches/<key>``, :mod:`dq_ops.patch_store` layout, rows in subset order): keep
    the top ``1 − θ`` patches of every subset image by Grad-CAM++ of the pretrained backbone for
    its own predicted class. ``config.chunk_rows`` (images per task and per Zarr chunk) defaults
    to about 1 MiB of kept patches; it is in the key, because the byte figures depend on it.
    """

    kind = "patches"
    version = 2
    worker = "dq_ops.pixel_work:drop_patches_chunk"

    def __init__(self, store: Store, dataset: Artifact, subset: Artifact, config: PatchConfig, embedding: EmbeddingConfig):
        super().__init__(store)
        split = dataset[SPLIT]
        if "images" not in split:
            raise DQInputError(f"{dataset.url} holds texts: patch dropping applies to image datasets only")
        self.dataset, self.subset, self.config, self.embedding = dataset, subset, config, embedding
        self.image_shape = tuple(split["images"].shape[1:])
        self.dtype = split["images"].dtype
        grid = patch_grid(self.image_shape[:2], config.patch_size)
        self.kept = kept_patch_count(grid[0] * grid[1], config.drop_ratio)
        self._chunk_rows = config.chunk_rows or patch_chunk_rows(
            self.kept, config.patch_size, self.image_shape[2], self.dtype.itemsize)

    def params(self) -> dict[str, Any]:
        c = self.config
        return {
            "patch_size": c.patch_size, "drop_ratio": c.drop_ratio, "cam_image_size": c.cam_image_size,
            "backbone": self.embedding.backbone,
            "weights_sha256": weights_digest(self.embedding.backbone, self.embedding.weights),
            "chunk_rows": self._chunk_rows,
        }

    def inputs(self) -> list[Artifact]:
        return [self.dataset, self.subset]

    def num_rows(self) -> int:
        return int(self.subset["indices"].shape[0])

    def chunk_rows(self) -> int:
        return self._chunk_rows

    def create_layout(self, group: zarr.Group) -> None:
        PatchStore.create(group, self.num_rows(), self.image_shape, self.config.patch_size, self.kept,
                          chunk_rows=self._chunk_rows, dtype=self.dtype)
        _add_chunk_stats(group, self.num_rows(), self._chunk_rows, 1)

    def layout_matches(self, group: zarr.Group) -> bool:
        patches = group.get("patches")
        return patches is not None and "chunk_stats" in group and patches.shape[:2] == (self.num_rows(), self.kept) \
            and patches.chunks[0] == self._chunk_rows

    def job(self, staging_url: str, index: int, start: int, stop: int) -> PixelChunkJob:
        c = self.config
        return PixelChunkJob(self.store.url, self.store.storage_options, staging_url, index, start, stop, {
            "dataset": self.dataset.name, "subset": self.subset.name, "patch_size": c.patch_size,
            "drop_ratio": c.drop_ratio, "scorer": ScorerSpec(self.embedding.backbone, self.embedding.weights, c.cam_image_size),
        })

    def finalize(self, group: zarr.Group) -> None:
        whole = int(_pop_chunk_stats(group)[:, 0].sum())
        report = storage_report(PatchStore(group), whole, sample_ratio=self.num_rows() / self.dataset[SPLIT]["labels"].shape[0])
        group.attrs.update({
            "subset": self.subset.name, "stored_bytes": report.patch_bytes, "whole_image_bytes": report.whole_image_bytes,
            "byte_ratio": report.byte_ratio, "patch_keep_ratio": report.patch_keep_ratio,
            "sample_keep_ratio": report.sample_ratio, "keep_ratio": report.keep_ratio,
        })


class MAEStage(Stage):
    """Stage 5a: the MAE checkpoint in ``models/<key>`` (a safetensors blob with its config),
    trained as one task on a dask worker (on its device) on a seeded sample of
    ``config.mae_train_samples`` images of the quantized split, or copied from
    ``config.mae_checkpoint`` (validated by loading it; it enters the key by digest, and must be
    readable by the workers). Without a client the training runs in this process.
    """

    kind = "models"

    def __init__(self, store: Store, dataset: Artifact, config: PatchConfig, seed: int):
        super().__init__(store)
        self.dataset, self.config, self.seed = dataset, config, seed

    def params(self) -> dict[str, Any]:
        c = self.config
        if c.mae_checkpoint:
            return {"checkpoint_sha256": file_digest(c.mae_checkpoint)}
        return {"patch_size": c.patch_size, "epochs": c.mae_epochs, "samples": c.mae_train_samples,
                "mask_ratio": c.mae_mask_ratio, "seed": self.seed}

    def inputs(self) -> list[Artifact]:
        return [] if self.config.mae_checkpoint else [self.dataset]

    def compute(self, group: zarr.Group, progress: Progress | None, client: ClientSource) -> None:
        job = MAEJob(self.store.url, self.store.storage_options, self.dataset.name, self.config.model_dump(mode="json"), self.seed)
        name = self.name()
        [(checkpoint, history, mae_config)] = run_jobs(client, "dq_ops.pixel_work:train_mae_job", [job],
                                                       key=lambda _: f"dq-mae-{name}", progress=progress)
        write_array(group, "checkpoint", np.frombuffer(checkpoint, dtype=np.uint8))
        write_array(group, "loss_history", np.asarray(history, dtype=np.float32))
        group.attrs["mae_config"] = mae_config


class ReconstructStage(ChunkedStage):
    """Stage 5b (``reconstructions/<key>``, layout and report in the module docstring): restore
    the dropped patches of every stored image, in the patch store's row chunks."""

    kind = "reconstructions"
    version = 2
    worker = "dq_ops.pixel_work:reconstruct_chunk"

    def __init__(self, store: Store, dataset: Artifact, patches: Artifact, mae: Artifact):
        super().__init__(store)
        self.dataset, self.patches, self.mae = dataset, patches, mae
        self.patch_store = PatchStore(patches.group)

    def params(self) -> dict[str, Any]:
        return {}

    def inputs(self) -> list[Artifact]:
        return [self.patches, self.mae]

    def num_rows(self) -> int:
        return len(self.patch_store)

    def chunk_rows(self) -> int:
        return self.patch_store.chunk_rows

    def create_layout(self, group: zarr.Group) -> None:
        n, rows = self.num_rows(), self.chunk_rows()
        write_array(group, "images", shape=(n, *self.dataset[SPLIT]["images"].shape[1:]), dtype=np.uint8, chunk_rows=rows)
        write_array(group, "labels", shape=(n,), dtype=np.int64, chunk_rows=rows)
        write_array(group, "ids", shape=(n,), dtype=self.patch_store.ids.dtype, chunk_rows=rows)
        _add_chunk_stats(group, n, rows, len(RECONSTRUCTION_STATS))

    def layout_matches(self, group: zarr.Group) -> bool:
        images = group.get("images")
        return images is not None and "chunk_stats" in group and images.shape[0] == self.num_rows() \
            and images.chunks[0] == self.chunk_rows()

    def job(self, staging_url: str, index: int, start: int, stop: int) -> PixelChunkJob:
        return PixelChunkJob(self.store.url, self.store.storage_options, staging_url, index, start, stop, {
            "dataset": self.dataset.name, "subset": self.patches.group.attrs["subset"],
            "patches": self.patches.name, "mae": self.mae.name,
        })

    def finalize(self, group: zarr.Group) -> None:
        count, *errors = _pop_chunk_stats(group).sum(axis=0)
        shown = min(PREVIEW_IMAGES, self.num_rows())
        subset = self.patches.group.attrs["subset"]
        original, _ = subset_images(self.store, self.dataset.name, subset, 0, shown)
        png = reconstruction_grid(original, self.patch_store.read(slice(0, shown)).keep_mask, np.asarray(group["images"][:shown]))
        write_array(group, "preview_png", np.frombuffer(png, dtype=np.uint8))
        group.attrs.update({"subset": subset} | {
            f"psnr_{name}_db": psnr_db(float(sse), int(count)) for name, sse in zip(("mae", "mean_fill", "zero_fill"), errors)
        })
