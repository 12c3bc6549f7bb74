"""The worker side of the pixel stages (:mod:`dq_ops.pixels`): models loaded once per worker
process on its device, and the functions a chunk job or the MAE job runs. Imported where they
run (a dask worker, or the flow process when it computes inline), never to look up a key.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from dq_ops.backbones import Classifier, default_device, load_classifier
from dq_ops.gradcam import gradcam_plus_plus, patch_scores
from dq_ops.mae import MAEConfig, MaskedAutoencoder, reconstruct, train_mae
from dq_ops.mae_store import load_mae, load_mae_artifact, mae_checkpoint_bytes
from dq_ops.patch_store import PackedPatches, PatchStore, pack_patches, unpack_patches, whole_image_bytes
from dq_ops.patches import patch_grid, select_patches
from dq_ops.pixels import MAEJob, PixelChunkJob, ScorerSpec, subset_images
from dq_ops.progress import Progress
from dq_ops.reconstruction_quality import baseline_fill, dropped_squared_error
from dq_ops.store import QUANTIZED_SPLIT as SPLIT
from dq_ops.store import Artifact, Store, write_rows

# -- models, once per worker process ---------------------------------------------------------------
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


def keep_top_patches(classifier: Classifier, images: np.ndarray, patch_size: int, drop_ratio: float,
                     batch_size: int = 16, slice_batches: int = 16) -> PackedPatches:
    """Grad-CAM++ of each image for its own predicted class, pooled to the patch grid; the top
    ``1 − θ`` patches kept (pure: arrays in, packed patches out).

    ``batch_size`` bounds the activations the backward pass keeps; the maps do not depend on it
    (the model is in eval mode). Images are resized and their maps pooled ``slice_batches``
    batches at a time, so a chunk never holds all its images at the CAM size, nor all its
    full-size maps: both grow with the chunk (thousands of small images), the pooled scores do not.
    Slices are whole batches, so the batches, and the maps, are those of one pass."""
    device = next(classifier.model.parameters()).device
    grid = patch_grid(images.shape[1:3], patch_size)
    step = batch_size * slice_batches
    scores = [
        patch_scores(gradcam_plus_plus(classifier.model, classifier.target_layer,
                                       classifier.preprocess(images[start:start + step], device), batch_size), grid)
        for start in range(0, len(images), step)
    ]
    keep = select_patches(np.concatenate(scores), drop_ratio)
    return pack_patches(images, keep, patch_size)


# -- chunk jobs ------------------------------------------------------------------------------------
def drop_patches_chunk(job: PixelChunkJob) -> int:
    """Score, select and store one chunk of subset images; returns its row count."""
    store, settings = job.store(), job.inputs
    images, labels = subset_images(store, settings["dataset"], settings["subset"], job.start, job.stop)
    ids = np.asarray(store.open("subsets", settings["subset"])["ids"][job.start:job.stop])
    classifier = get_classifier(settings["scorer"])
    packed = keep_top_patches(classifier, images, settings["patch_size"], settings["drop_ratio"])
    staging = job.staging()
    patch_store = PatchStore(staging)
    patch_store.write(job.start, packed, ids, labels)
    staging["chunk_stats"][job.index] = [whole_image_bytes(images, patch_store.chunk_rows)]
    return job.stop - job.start


def reconstruct_chunk(job: PixelChunkJob) -> int:
    """Restore one chunk of a patch store with the MAE and add its PSNR sums; returns its row count."""
    store, settings = job.store(), job.inputs
    patches = PatchStore(store.open("patches", settings["patches"]).group)
    zero_filled, keep = unpack_patches(patches.read(slice(job.start, job.stop)))
    restored = reconstruct(get_mae(store.open("models", settings["mae"])), zero_filled, keep)
    original, _ = subset_images(store, settings["dataset"], settings["subset"], job.start, job.stop)
    errors = [dropped_squared_error(original, filled, keep)
              for filled in (restored, baseline_fill(zero_filled, keep, "mean"), baseline_fill(zero_filled, keep, "zero"))]
    staging = job.staging()
    write_rows(staging["images"], job.start, restored)
    write_rows(staging["labels"], job.start, patches.labels[job.start:job.stop])
    write_rows(staging["ids"], job.start, patches.ids[job.start:job.stop])
    staging["chunk_stats"][job.index] = [errors[0][1], *(sse for sse, _ in errors)]
    return job.stop - job.start


def train_mae_job(job: MAEJob, progress: Progress | None = None) -> tuple[bytes, list[float], dict[str, Any]]:
    """Train (or load) the MAE where this runs (a worker, on its device); returns the checkpoint
    bytes, the per-step losses and the model's configuration (a model-sized payload, never data).
    ``progress(step, total_steps)`` follows the training."""
    config = job.config
    if config["mae_checkpoint"]:
        model, history = load_mae(config["mae_checkpoint"]), []
    else:
        split = Store(job.store_url, job.storage_options).open("datasets", job.dataset)[SPLIT]
        n = split["images"].shape[0]
        rows = np.sort(np.random.default_rng(job.seed).permutation(n)[: min(n, config["mae_train_samples"])])
        images = np.asarray(split["images"].get_orthogonal_selection((rows,)))
        mae_config = MAEConfig(image_size=images.shape[1:3], in_chans=images.shape[3], patch_size=config["patch_size"],
                               mask_ratio=config["mae_mask_ratio"])
        model, history = train_mae(images, mae_config, seed=job.seed, epochs=config["mae_epochs"], device=default_device(),
                                   progress=None if progress is None else lambda step, total, loss: progress(step, total))
    return mae_checkpoint_bytes(model), history, json.loads(model.config.to_json())
