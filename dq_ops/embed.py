"""Stage 1 on a dask cluster: embed one split of a stored dataset into ``embeddings/<key>``.

The artifact (``key = derive_key("embeddings", params, [dataset fingerprint])``) holds::

    features   (n, D) float32   penultimate image features / unit-norm sentence embeddings (e)
    gradients  (n, C) float32   mode="gradient" only: g = ∂loss/∂logits under the seeded random
                                head (``dq_ops.features.gradient_embedding``); the embedding is
                                the factorised f = [g, g ⊗ e], never materialised (read both
                                with ``dq_ops.stages.embedding_rows``)
    ids        (n,)   str       the split's sample ids, in row order

Work is split into row chunks of ``chunk_rows`` (the Zarr chunk size of ``features``, so no two
tasks write the same chunk). The client sends each task only URLs and a row range; the worker
reads its rows from the dataset's Zarr store, runs the extractor (loaded once per worker process,
:func:`dq_ops.backbones.get_extractor`) and writes its rows into the resumable staging group
``embeddings/.staging/<key>``, then sets ``done[chunk] = True`` (``done`` has one Zarr chunk per
task). Chunk writes are atomic object/file writes, and ``done`` is written last, so a chunk marked
done is complete. A rerun with the same inputs finds the same staging group and submits only
chunks not marked done; when all are, ``done`` is dropped and the group is committed.

The key's parameters say what was computed, not how: the batch size, chunk size and cluster are
left out; the numeric precision is in (float32 on CPU, bf16/fp16 autocast on CUDA workers).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from distributed import Client, as_completed

from dq_ops.backbones import (
    ExtractorSpec,
    backbone_dim,
    get_extractor,
    inference_precision,
    text_dim,
    text_model_version,
    weights_digest,
)
from dq_ops.config import EmbeddingConfig
from dq_ops.errors import DQInputError
from dq_ops.features import gradient_embedding
from dq_ops.store import Artifact, Store, derive_key, open_zarr_store, write_array

Progress = Callable[[int, int], None]
# Default rows per task: tens of seconds of CPU work for a small backbone (enough to hide task
# overhead), capped at about 64 MB of decoded input so that large images fit a worker's memory.
MAX_CHUNK_ROWS = 4096
_CHUNK_INPUT_BYTES = 64 * 2**20


@dataclass(frozen=True)
class EmbeddingResult:
    """The committed artifact and what this call computed (for tracking)."""

    artifact: Artifact
    rows_computed: int  # rows embedded by this call; the rest were done by an earlier, interrupted run
    chunks_skipped: int
    seconds: float  # wall clock from the first submitted chunk to the last finished one

    @property
    def samples_per_second(self) -> float | None:
        """Throughput of this call's chunks (model loading on the workers included)."""
        return self.rows_computed / self.seconds if self.rows_computed and self.seconds > 0 else None


@dataclass(frozen=True)
class _ChunkJob:
    """One task's whole input: URLs and a row range, never arrays."""

    dataset_url: str
    split: str
    samples: str  # "images" or "texts"
    staging_url: str
    storage_options: dict[str, Any]
    spec: ExtractorSpec
    batch_size: int
    index: int
    start: int
    stop: int
    gradient_classes: int | None  # mode="gradient": number of classes of the random head
    seed: int


def _embed_chunk(job: _ChunkJob) -> int:
    """Worker side: embed rows [start, stop) into the staging group; return the row count."""
    source = zarr.open_group(open_zarr_store(job.dataset_url, job.storage_options, read_only=True), mode="r")
    split = source[job.split]
    extractor = get_extractor(job.spec)
    features = extractor(split[job.samples][job.start:job.stop], job.batch_size)
    out = zarr.open_group(open_zarr_store(job.staging_url, job.storage_options), mode="r+")
    out["features"][job.start:job.stop] = features
    if job.gradient_classes is not None:
        labels = split["labels"][job.start:job.stop]
        out["gradients"][job.start:job.stop] = gradient_embedding(
            features, labels, num_classes=job.gradient_classes, seed=job.seed
        ).g
    out["done"][job.index] = True  # last: the chunk's rows are all written
    return job.stop - job.start


def _cluster_precision(client: Client) -> str:
    """Precision the workers' image extractors run at ("float32" on CPU); mixed clusters list all."""
    client.wait_for_workers(1)
    return "+".join(sorted(set(client.run(inference_precision).values())))


def _gradient_classes(split: zarr.Group, class_names: list[str] | None, where: str) -> int:
    labels = split["labels"][:]
    if len(labels) and labels.min() < 0:
        raise DQInputError(
            f"{where}: mode='gradient' needs a label for every sample (sample {int(labels.argmin())} has none); "
            "use mode='embedding' for unlabelled data"
        )
    return len(class_names) if class_names else int(labels.max()) + 1


def default_chunk_rows(samples: zarr.Array, batch_size: int) -> int:
    """Rows per task: at most :data:`MAX_CHUNK_ROWS` and ~64 MB of input, whole batches."""
    rows = MAX_CHUNK_ROWS
    if samples.ndim > 1:
        row_bytes = int(np.prod(samples.shape[1:])) * samples.dtype.itemsize
        rows = max(1, min(rows, _CHUNK_INPUT_BYTES // row_bytes))
    return rows - rows % batch_size if rows >= batch_size else rows


def _open_staging(
    store: Store, key: str, ids: zarr.Array, dim: int, gradient_classes: int | None, chunk_rows: int
) -> tuple[zarr.Group, str]:
    """The staging group for ``key``, created (or recreated when its layout differs) as needed."""
    n = ids.shape[0]
    n_chunks = -(-n // chunk_rows)
    group, url = store.resumable("embeddings", key)
    features = group.get("features")
    done = group.get("done")
    if (
        features is not None and done is not None
        and features.shape == (n, dim) and features.chunks[0] == chunk_rows and done.shape == (n_chunks,)
    ):
        return group, url
    # A layout from another chunk size (or an interrupted commit): start this cache over.
    store.discard_resumable("embeddings", key)
    group, url = store.resumable("embeddings", key)
    write_array(group, "features", shape=(n, dim), dtype=np.float32, chunk_rows=chunk_rows)
    if gradient_classes is not None:
        write_array(group, "gradients", shape=(n, gradient_classes), dtype=np.float32, chunk_rows=chunk_rows)
    write_array(group, "ids", ids[:], chunk_rows=chunk_rows)
    # Written last: a group with ``done`` has all its arrays.
    group.create_array("done", shape=(n_chunks,), dtype=bool, chunks=(1,), fill_value=False)
    return group, url


def embed_dataset(
    store: Store,
    dataset_name: str,
    split: str,
    config: EmbeddingConfig,
    client: Client,
    *,
    seed: int,
    progress: Progress | None = None,
    chunk_rows: int | None = None,
) -> EmbeddingResult:
    """Embed ``datasets/<dataset_name>/<split>`` on ``client``'s workers (see the module docstring).

    Image datasets use ``config.backbone`` / ``weights`` / ``image_size``, text datasets
    ``config.text_model``; ``config.mode="gradient"`` adds the gradients of a random head seeded
    by ``seed`` (``seed`` does not enter the key in embedding mode). ``progress(done, total)``
    counts chunks, including those an interrupted run already finished. ``chunk_rows`` (rows per
    task) defaults to :func:`default_chunk_rows`; a rerun must use the same value to resume.
    Returns at once when the artifact already exists. Raises :class:`DQInputError` for a missing
    split, an unknown backbone or a missing/corrupt weights file (the last from the workers).
    """
    dataset = store.open("datasets", dataset_name)
    if split not in dataset.group:
        splits = sorted(name for name, _ in dataset.group.groups())
        raise DQInputError(f"{dataset.url}: no split {split!r}; splits: {', '.join(splits)}")
    split_group = dataset[split]
    samples = next((name for name in ("images", "texts") if name in split_group), None)
    if samples is None:
        raise DQInputError(f"{dataset.url}/{split}: neither 'images' nor 'texts' (not an ingested dataset?)")
    if samples == "images":
        spec = ExtractorSpec("images", config.backbone, config.weights, config.image_size)
        dim = backbone_dim(config.backbone)
        params: dict[str, Any] = {
            "backbone": config.backbone,
            "weights_sha256": weights_digest(config.backbone, config.weights),
            "image_size": config.image_size,
            "precision": _cluster_precision(client),
        }
    else:
        spec = ExtractorSpec("texts", config.text_model)
        dim = text_dim(config.text_model)
        params = {"text_model": config.text_model, "text_model_version": text_model_version(config.text_model)}
    params.update(split=split, modality=samples, mode=config.mode)
    gradient_classes = None
    if config.mode == "gradient":
        class_names = dataset.group.attrs.get("class_names")
        gradient_classes = _gradient_classes(split_group, class_names, f"{dataset.url}/{split}")
        params.update(seed=seed, num_classes=gradient_classes)
    key = derive_key("embeddings", params, [dataset.fingerprint])
    chunk_rows = chunk_rows or default_chunk_rows(split_group[samples], config.batch_size)
    if chunk_rows < 1:
        raise DQInputError(f"chunk_rows must be positive, got {chunk_rows}")
    if store.exists("embeddings", key):
        return EmbeddingResult(store.open("embeddings", key), 0, 0, 0.0)

    staging, staging_url = _open_staging(store, key, split_group["ids"], dim, gradient_classes, chunk_rows)
    n = split_group["ids"].shape[0]
    done = staging["done"][:]
    total, finished = len(done), int(done.sum())
    if progress is not None:
        progress(finished, total)
    jobs = [
        _ChunkJob(
            dataset.url, split, samples, staging_url, store.storage_options, spec, config.batch_size,
            k, k * chunk_rows, min(n, (k + 1) * chunk_rows), gradient_classes, seed,
        )
        for k in np.flatnonzero(~done).tolist()
    ]
    token = uuid.uuid4().hex[:8]  # fresh task keys: a rerun must not meet its cancelled predecessors
    started = time.perf_counter()
    futures = [client.submit(_embed_chunk, job, key=f"dq-embed-{key}-{job.index}-{token}") for job in jobs]
    rows = 0
    try:
        for future in as_completed(futures):
            rows += future.result()  # re-raises a worker's exception here
            finished += 1
            if progress is not None:
                progress(finished, total)
    finally:
        # On an error or an interruption stop what has not started; done chunks stay for a rerun.
        client.cancel([f for f in futures if not f.done()])
    seconds = time.perf_counter() - started

    del staging["done"]
    artifact = store.commit_resumable("embeddings", key, params, [dataset.fingerprint])
    return EmbeddingResult(artifact, rows, total - len(jobs), seconds)
