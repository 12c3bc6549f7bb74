"""Stages 4-5 on a dask cluster: Grad-CAM++ patch dropping, MAE training and reconstruction.

The subset is cut into row chunks of ``r`` images (the patch store's Zarr chunk, so no two tasks
write the same chunk). The client sends each task URLs and a row range, never arrays; the worker
reads its rows from the store, computes, and writes them into a resumable staging group, then
sets ``done[chunk]`` (written last: a chunk marked done is complete). A rerun with the same
inputs submits only the chunks not marked done. Models are loaded once per worker process
(:func:`get_classifier`, :func:`get_mae`) on the worker's device (its GPU under dask-cuda).

Reports are combined from per-chunk sums that the workers store beside their rows
(``chunk_stats``), so the flow process never holds subset-sized arrays:

* ``patches/<key>`` (:mod:`dq_ops.patch_store` layout) attributes: ``stored_bytes`` against
  ``whole_image_bytes`` = Σ over chunks of the same images stored whole with the same codec in
  the same row chunks (:func:`dq_ops.patch_store.whole_image_bytes`), and the keep ratios.
* ``reconstructions/<key>``: ``images`` (n, H, W, C) uint8 in subset order, ``labels``, ``ids``;
  attributes ``psnr_<fill>_db = 10·log10(255² · Σ count / Σ SSE)`` over the dropped pixels for
  the MAE and the mean-/zero-fill baselines (:func:`dq_ops.mae.dropped_squared_error` per chunk),
  and ``preview_png`` (original | kept patches | reconstruction of the first images).
* ``models/<key>``: the MAE, trained as one task on a worker (a GPU worker when there is one).

Grad-CAM++ is dq's own batched implementation (:func:`dq_ops.patches.gradcam_plus_plus`), not
the ``grad-cam`` package (pytorch-grad-cam 1.5.7): on the same 256 Fashion-MNIST images at
112 px (``bench/gradcam.py``) the package was slower, because it back-propagates into every
parameter of the backbone (``loss.backward``) instead of only to the target layer, and moves
activations and gradients to NumPy and resizes each map with OpenCV one image at a time, which
would also pull a GPU batch back to the host; its maps rank patches almost identically.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from distributed import Client, as_completed

from dq_ops.backbones import Classifier, default_device, load_classifier
from dq_ops.config import EmbeddingConfig, PatchConfig
from dq_ops.errors import DQInputError
from dq_ops.mae import (
    MAEConfig,
    MaskedAutoencoder,
    baseline_fill,
    dropped_squared_error,
    load_mae,
    mae_checkpoint_bytes,
    mae_from_checkpoint_bytes,
    picture_grid,
    psnr_db,
    reconstruct,
    train_mae,
)
from dq_ops.patch_store import PackedPatches, PatchStore, pack_patches, storage_report, unpack_patches, whole_image_bytes
from dq_ops.patch_store import default_chunk_rows as patch_chunk_rows
from dq_ops.patches import gradcam_plus_plus, kept_patch_count, patch_grid, patch_scores, select_patches
from dq_ops.store import Artifact, Store, derive_key, open_zarr_store, write_array

Progress = Callable[[int, int], None]
SPLIT = "train"  # the quantized split (dq_ops.stages.QUANTIZED_SPLIT)
PREVIEW_IMAGES = 8
# Per-chunk sums of the reconstruction report, in this column order.
RECONSTRUCTION_STATS = ("dropped_values", "sse_mae", "sse_mean_fill", "sse_zero_fill")


# -- models, once per worker process ---------------------------------------------------------------
@dataclass(frozen=True)
class ScorerSpec:
    """What identifies a loaded Grad-CAM++ classifier; hashable and cheap to send to workers."""

    backbone: str
    weights: str | None
    cam_image_size: int


_MODELS: dict[Any, Classifier | MaskedAutoencoder] = {}
_MODELS_LOCK = threading.Lock()


def _cached(key: Any, load: Callable[[], Any]) -> Any:
    with _MODELS_LOCK:  # one load even when several worker threads ask at once
        if key not in _MODELS:
            _MODELS[key] = load()
        return _MODELS[key]


def get_classifier(spec: ScorerSpec) -> Classifier:
    """The Grad-CAM++ classifier for ``spec`` on this process's device, loaded once per process."""

    def load() -> Classifier:
        classifier = load_classifier(spec.backbone, spec.weights, image_size=spec.cam_image_size)
        classifier.model.to(default_device())
        return classifier

    return _cached(spec, load)


def get_mae(mae: Artifact) -> MaskedAutoencoder:
    """The MAE of a ``models/<key>`` artifact on this process's device, loaded once per process
    (keyed by fingerprint: a replaced artifact is loaded afresh)."""
    return _cached(("mae", mae.fingerprint), lambda: load_mae_artifact(mae).to(default_device()))


def load_mae_artifact(artifact: Artifact) -> MaskedAutoencoder:
    """The MAE held by a ``models/<key>`` artifact (on the CPU)."""
    return mae_from_checkpoint_bytes(np.asarray(artifact["checkpoint"][:]).tobytes(), artifact.url)


def drop_patches(classifier: Classifier, images: np.ndarray, patch_size: int, drop_ratio: float,
                 batch_size: int = 64) -> PackedPatches:
    """Grad-CAM++ of each image for its own predicted class, pooled to the patch grid; the top
    ``1 − θ`` patches kept (pure: arrays in, packed patches out)."""
    device = next(classifier.model.parameters()).device
    cam = gradcam_plus_plus(classifier.model, classifier.target_layer, classifier.preprocess(images, device), batch_size)
    keep = select_patches(patch_scores(cam, patch_grid(images.shape[1:3], patch_size)), drop_ratio)
    return pack_patches(images, keep, patch_size)


# -- chunk jobs (worker side) ----------------------------------------------------------------------
@dataclass(frozen=True)
class _Chunk:
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


def _subset_images(store: Store, dataset: str, subset: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of subset rows ``[start, stop)``, read from the dataset's Zarr."""
    split = store.open("datasets", dataset)[SPLIT]
    rows = np.asarray(store.open("subsets", subset)["indices"][start:stop])
    return (np.asarray(split["images"].get_orthogonal_selection((rows,))),
            np.asarray(split["labels"].get_orthogonal_selection((rows,))))


def _drop_patches_chunk(job: _Chunk) -> int:
    """Score, select and store one chunk of subset images; returns its row count."""
    store, settings = job.store(), job.inputs
    images, labels = _subset_images(store, settings["dataset"], settings["subset"], job.start, job.stop)
    ids = np.asarray(store.open("subsets", settings["subset"])["ids"][job.start:job.stop])
    classifier = get_classifier(ScorerSpec(settings["backbone"], settings["weights"], settings["cam_image_size"]))
    packed = drop_patches(classifier, images, settings["patch_size"], settings["drop_ratio"])
    staging = job.staging()
    patch_store = PatchStore(staging)
    patch_store.write(job.start, packed, ids, labels)
    staging["chunk_stats"][job.index] = [whole_image_bytes(images, patch_store.chunk_rows)]
    staging["done"][job.index] = True  # last: the chunk's rows are all written
    return job.stop - job.start


def _reconstruct_chunk(job: _Chunk) -> int:
    """Restore one chunk of a patch store with the MAE and add its PSNR sums; returns its row count."""
    store, settings = job.store(), job.inputs
    patches = PatchStore(store.open("patches", settings["patches"]).group)
    zero_filled, keep = unpack_patches(patches.read(slice(job.start, job.stop)))
    restored = reconstruct(get_mae(store.open("models", settings["mae"])), zero_filled, keep)
    original, _ = _subset_images(store, settings["dataset"], settings["subset"], job.start, job.stop)
    errors = [dropped_squared_error(original, filled, keep)
              for filled in (restored, baseline_fill(zero_filled, keep, "mean"), baseline_fill(zero_filled, keep, "zero"))]
    staging = job.staging()
    staging["images"][job.start:job.stop] = restored
    staging["labels"][job.start:job.stop] = patches.labels[job.start:job.stop]
    staging["ids"][job.start:job.stop] = patches.ids[job.start:job.stop]
    staging["chunk_stats"][job.index] = [errors[0][1], *(sse for sse, _ in errors)]
    staging["done"][job.index] = True
    return job.stop - job.start


def _train_mae_job(store_url: str, storage_options: dict[str, Any], staging_url: str, dataset: str,
                   params: dict[str, Any], seed: int) -> int:
    """Train (or load) the MAE on a worker and write it into the staging group; returns steps."""
    if params["mae_checkpoint"]:
        model, history = load_mae(params["mae_checkpoint"]), []
    else:
        split = Store(store_url, storage_options).open("datasets", dataset)[SPLIT]
        n = split["images"].shape[0]
        rows = np.sort(np.random.default_rng(seed).permutation(n)[: min(n, params["mae_train_samples"])])
        images = np.asarray(split["images"].get_orthogonal_selection((rows,)))
        config = MAEConfig(image_size=images.shape[1:3], in_chans=images.shape[3], patch_size=params["patch_size"],
                           mask_ratio=params["mae_mask_ratio"])
        model, history = train_mae(images, config, seed=seed, epochs=params["mae_epochs"], device=default_device())
    group = zarr.open_group(open_zarr_store(staging_url, storage_options), mode="r+")
    write_array(group, "checkpoint", np.frombuffer(mae_checkpoint_bytes(model), dtype=np.uint8))
    write_array(group, "loss_history", np.asarray(history, dtype=np.float32))
    group.attrs["mae_config"] = json.loads(model.config.to_json())
    return len(history)


# -- client side -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkedResult:
    """A committed artifact and how much of it this call computed."""

    artifact: Artifact
    chunks_total: int
    chunks_skipped: int  # done by an earlier, interrupted run
    seconds: float

    @property
    def resumed_note(self) -> str | None:
        """``"resumed: N of M chunks already done"`` when an earlier run had done some."""
        return f"resumed: {self.chunks_skipped} of {self.chunks_total} chunks already done" if self.chunks_skipped else None


def _run_chunks(client: Client, work: Callable[[_Chunk], int], staging: zarr.Group, make_job: Callable[[int], _Chunk],
                label: str, progress: Progress | None) -> tuple[int, int, float]:
    """Submit every chunk not marked done; returns (chunks, chunks skipped, seconds)."""
    done = staging["done"][:]
    total, finished = len(done), int(done.sum())
    skipped = finished
    if progress is not None:
        progress(finished, total)
    token = uuid.uuid4().hex[:8]  # fresh task keys: a rerun must not meet its cancelled predecessors
    started = time.perf_counter()
    futures = [client.submit(work, make_job(k), key=f"dq-{label}-{k}-{token}") for k in np.flatnonzero(~done).tolist()]
    try:
        for future in as_completed(futures):
            future.result()  # re-raises a worker's exception here
            finished += 1
            if progress is not None:
                progress(finished, total)
    finally:
        # On an error or an interruption stop what has not started; done chunks stay for a rerun.
        client.cancel([f for f in futures if not f.done()])
    return total, skipped, time.perf_counter() - started


def _staging_is_current(group: zarr.Group, rows: int, chunk_rows: int, pixels: str) -> bool:
    """Whether a resumable group has the layout this run would create (same rows and chunks)."""
    done, array = group.get("done"), group.get(pixels)
    return done is not None and array is not None and array.shape[0] == rows and array.chunks[0] == chunk_rows \
        and done.shape == (-(-rows // chunk_rows),)


def _chunk_bookkeeping(group: zarr.Group, rows: int, chunk_rows: int, stats: int) -> None:
    chunks = -(-rows // chunk_rows)
    group.create_array("chunk_stats", shape=(chunks, stats), dtype=np.float64, chunks=(1, stats), fill_value=0.0)
    # Written last: a group with ``done`` has all its arrays.
    group.create_array("done", shape=(chunks,), dtype=bool, chunks=(1,), fill_value=False)


def _finish(group: zarr.Group) -> np.ndarray:
    """The per-chunk sums, and the bookkeeping arrays dropped before the commit."""
    stats = np.asarray(group["chunk_stats"][:])
    del group["done"], group["chunk_stats"]
    return stats


def drop_patches_stage(
    store: Store,
    dataset: Artifact,
    subset: Artifact,
    params: PatchConfig,
    embedding: EmbeddingConfig,
    client: Client,
    *,
    chunk_rows: int | None = None,
    progress: Progress | None = None,
) -> ChunkedResult:
    """Stage 4 on ``client``'s workers: keep the top ``1 − θ`` patches of every subset image by
    Grad-CAM++ of the pretrained backbone for its own predicted class (``patches/<key>``, rows in
    subset order). ``chunk_rows`` (images per task and per Zarr chunk) defaults to about 1 MiB of
    kept patches; it is in the key, because the byte figures depend on the chunking.
    """
    split = dataset[SPLIT]
    if "images" not in split:
        raise DQInputError(f"{dataset.url} holds texts: patch dropping applies to image datasets only")
    image_shape = tuple(split["images"].shape[1:])
    grid = patch_grid(image_shape[:2], params.patch_size)
    kept = kept_patch_count(grid[0] * grid[1], params.drop_ratio)
    chunk_rows = chunk_rows or patch_chunk_rows(kept, params.patch_size, image_shape[2])
    settings = {
        "patch_size": params.patch_size, "drop_ratio": params.drop_ratio, "cam_image_size": params.cam_image_size,
        "backbone": embedding.backbone, "weights": embedding.weights, "chunk_rows": chunk_rows,
    }
    inputs = [dataset.fingerprint, subset.fingerprint]
    key = derive_key("patches", settings, inputs)
    if store.exists("patches", key):
        return ChunkedResult(store.open("patches", key), 0, 0, 0.0)
    n = int(subset["indices"].shape[0])
    group, staging_url = store.resumable("patches", key)
    if not _staging_is_current(group, n, chunk_rows, "patches"):
        store.discard_resumable("patches", key)
        group, staging_url = store.resumable("patches", key)
        PatchStore.create(group, n, image_shape, params.patch_size, kept, chunk_rows=chunk_rows,
                          dtype=split["images"].dtype)
        _chunk_bookkeeping(group, n, chunk_rows, 1)
    job_inputs = settings | {"dataset": dataset.name, "subset": subset.name}
    total, skipped, seconds = _run_chunks(
        client, _drop_patches_chunk, group,
        lambda k: _Chunk(store.url, store.storage_options, staging_url, k, k * chunk_rows, min(n, (k + 1) * chunk_rows), job_inputs),
        f"patches-{key}", progress,
    )
    whole = int(_finish(group)[:, 0].sum())
    report = storage_report(PatchStore(group), whole, sample_ratio=n / split["labels"].shape[0])
    group.attrs.update({
        "subset": subset.name, "stored_bytes": report.patch_bytes, "whole_image_bytes": report.whole_image_bytes,
        "byte_ratio": report.byte_ratio, "patch_keep_ratio": report.patch_keep_ratio,
        "sample_keep_ratio": report.sample_ratio, "keep_ratio": report.keep_ratio,
    })
    return ChunkedResult(store.commit_resumable("patches", key, settings, inputs), total, skipped, seconds)


def mae_stage(store: Store, dataset: Artifact, params: PatchConfig, seed: int, client: Client) -> Artifact:
    """Stage 5a: the MAE checkpoint in ``models/<key>`` (a safetensors blob with its config),
    trained as one task on a worker on a seeded sample of ``params.mae_train_samples`` images
    of the quantized split, or copied from ``params.mae_checkpoint`` (validated by loading it).
    """
    settings = {"patch_size": params.patch_size, "epochs": params.mae_epochs, "samples": params.mae_train_samples,
                "mask_ratio": params.mae_mask_ratio, "seed": seed, "checkpoint": params.mae_checkpoint}
    key = derive_key("models", settings, [dataset.fingerprint])
    if store.exists("models", key):
        return store.open("models", key)
    store.discard_resumable("models", key)  # one task: an interrupted one starts over
    _, staging_url = store.resumable("models", key)
    job = client.submit(_train_mae_job, store.url, store.storage_options, staging_url, dataset.name,
                        params.model_dump(mode="json"), seed, key=f"dq-mae-{key}-{uuid.uuid4().hex[:8]}")
    job.result()
    return store.commit_resumable("models", key, settings, [dataset.fingerprint])


def reconstruct_stage(
    store: Store, dataset: Artifact, patches: Artifact, mae: Artifact, client: Client, *, progress: Progress | None = None
) -> ChunkedResult:
    """Stage 5b on ``client``'s workers: restore the dropped patches of every stored image
    (``reconstructions/<key>``, layout and report in the module docstring), chunk by chunk in the
    patch store's row chunks."""
    inputs = [patches.fingerprint, mae.fingerprint]
    key = derive_key("reconstructions", {}, inputs)
    if store.exists("reconstructions", key):
        return ChunkedResult(store.open("reconstructions", key), 0, 0, 0.0)
    patch_store = PatchStore(patches.group)
    n, chunk_rows = len(patch_store), patch_store.chunk_rows
    image_shape = tuple(dataset[SPLIT]["images"].shape[1:])
    group, staging_url = store.resumable("reconstructions", key)
    if not _staging_is_current(group, n, chunk_rows, "images"):
        store.discard_resumable("reconstructions", key)
        group, staging_url = store.resumable("reconstructions", key)
        write_array(group, "images", shape=(n, *image_shape), dtype=np.uint8, chunk_rows=chunk_rows)
        write_array(group, "labels", shape=(n,), dtype=np.int64, chunk_rows=chunk_rows)
        write_array(group, "ids", shape=(n,), dtype=patch_store.ids.dtype, chunk_rows=chunk_rows)
        _chunk_bookkeeping(group, n, chunk_rows, len(RECONSTRUCTION_STATS))
    subset = patches.group.attrs["subset"]
    job_inputs = {"dataset": dataset.name, "subset": subset, "patches": patches.name, "mae": mae.name}
    total, skipped, seconds = _run_chunks(
        client, _reconstruct_chunk, group,
        lambda k: _Chunk(store.url, store.storage_options, staging_url, k, k * chunk_rows, min(n, (k + 1) * chunk_rows), job_inputs),
        f"reconstruct-{key}", progress,
    )
    count, *errors = _finish(group).sum(axis=0)
    shown = min(PREVIEW_IMAGES, n)
    original, _ = _subset_images(store, dataset.name, subset, 0, shown)
    png = picture_grid(original, patch_store.read(slice(0, shown)).keep_mask, np.asarray(group["images"][:shown]))
    write_array(group, "preview_png", np.frombuffer(png, dtype=np.uint8))
    group.attrs.update({"subset": subset} | {
        f"psnr_{name}_db": psnr_db(float(sse), int(count)) for name, sse in zip(("mae", "mean_fill", "zero_fill"), errors)
    })
    return ChunkedResult(store.commit_resumable("reconstructions", key, {}, inputs), total, skipped, seconds)

