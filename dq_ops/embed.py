"""Stage 1 on a dask cluster: embed one split of a stored dataset into ``embeddings/<key>``.

The artifact (:class:`EmbeddingsStage`, a :class:`~dq_ops.stage.ChunkedStage`) holds::

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
``embeddings/.staging/<key>``, then sets ``done[chunk] = True``. A rerun with the same inputs
finds the same staging group and submits only chunks not marked done.

**Incremental refresh.** An embedding is a function of the sample's content (its id's content
hash) and, in gradient mode, its label. Before computing, the stage looks for a *donor*: an
earlier embeddings artifact of the same parameters (any snapshot of any dataset in the store).
Rows whose content hash (and label) the donor holds are copied from it by the workers; only the
rest go through the backbone. The extractor runs fixed-size batches (see
:class:`~dq_ops.backbones.ImageExtractor`), so a computed row has the same bytes as in a full run.
A chunk whose rows are, in order, one whole chunk of the donor (every chunk before the first new
or removed sample, when samples are only added after them) is copied as its stored bytes,
without decoding or encoding it.

The key's parameters say what was computed, not how: the batch size, chunk size and cluster are
left out; the numeric precision is in (float32 on CPU, bf16/fp16 autocast on CUDA workers). The
chunk size does reach the artifact's fingerprint, whose content digest combines chunk digests
(:func:`dq_ops.store.array_digest`): features rewritten in other chunks fingerprint anew. The
key comes from :mod:`dq_ops.backbone_spec`; :mod:`dq_ops.backbones` (torch) is imported only
where rows are computed, so finding the artifact done costs no model library.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from dq_ops.backbone_spec import ExtractorSpec, text_dim, text_model_version, weights_digest
from dq_ops.cluster import workers_precision
from dq_ops.config import EmbeddingConfig
from dq_ops.errors import DQInputError
from dq_ops.features import gradient_embedding
from dq_ops.progress import Progress
from dq_ops.stage import ChunkedStage, is_running, run_jobs
from dq_ops.store import Artifact, ChunkCopy, Store, copy_chunks, feature_compressor, open_zarr_store, write_array, write_rows

if TYPE_CHECKING:
    from distributed import Client

    from dq_ops.stage import ClientSource

# Default rows per task: tens of seconds of CPU work for a small backbone (enough to hide task
# overhead), capped at about 64 MB of decoded input so that large images fit a worker's memory.
MAX_CHUNK_ROWS = 4096
# A refresh with at most this many samples to embed runs in the calling process: starting a
# cluster and loading the model on its workers would cost more than the work.
INLINE_ROWS = 1024
_CHUNK_INPUT_BYTES = 64 * 2**20


@dataclass(frozen=True)
class _ChunkJob:
    """One task's whole input: URLs, a row range and which of its rows to copy, never features."""

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
    donor_url: str | None = None
    copied: np.ndarray | None = None  # positions in [start, stop) whose features the donor holds
    donor_rows: np.ndarray | None = None  # their rows in the donor
    fresh: np.ndarray | None = None  # features of the other rows, when computed before the job (inline)
    whole_donor_chunk: bool = False  # the donor rows are one whole stored chunk, in order: copy its bytes


def embed_chunk(job: _ChunkJob) -> int:
    """Worker side: fill rows [start, stop) of the staging group; return the rows computed."""
    out = zarr.open_group(open_zarr_store(job.staging_url, job.storage_options), mode="r+")
    source = zarr.open_group(open_zarr_store(job.dataset_url, job.storage_options, read_only=True), mode="r")
    split = source[job.split]
    features = np.empty((job.stop - job.start, out["features"].shape[1]), dtype=np.float32)
    computed = np.ones(len(features), dtype=bool)
    if job.donor_url is not None and len(job.copied):
        donor = zarr.open_group(open_zarr_store(job.donor_url, job.storage_options, read_only=True), mode="r")
        features[job.copied] = donor["features"].get_orthogonal_selection((job.donor_rows, slice(None)))
        computed[job.copied] = False
    rows = job.start + np.flatnonzero(computed)
    if job.fresh is not None:
        features[computed] = job.fresh
    elif len(rows):
        from dq_ops.backbones import get_extractor

        features[computed] = get_extractor(job.spec)(split[job.samples].get_orthogonal_selection((rows,)), job.batch_size)
    write_rows(out["features"], job.start, features)
    if job.gradient_classes is not None:
        labels = split["labels"][job.start:job.stop]
        write_rows(out["gradients"], job.start,
                   gradient_embedding(features, labels, num_classes=job.gradient_classes, seed=job.seed).g)
    return len(rows)


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


def content_keys(ids: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """What an embedding depends on, per sample: the content hash of its id (after the last
    ':'), plus its label when given (gradient mode)."""
    keys = np.array([str(i).rsplit(":", 1)[-1] for i in ids], dtype=object)
    return keys if labels is None else np.array([f"{k}|{y}" for k, y in zip(keys, labels)], dtype=object)


class EmbeddingsStage(ChunkedStage):
    """Features of one split of a dataset snapshot (module docstring).

    Image datasets use ``config.backbone`` / ``weights`` (by content digest) / ``image_size``,
    text datasets ``config.text_model``; ``config.mode="gradient"`` adds the gradients of a
    random head seeded by ``seed`` (``seed`` enters the key only then). The precision the
    workers compute in is part of the key (CUDA workers use bf16/fp16 autocast). ``chunk_rows``
    (rows per task) defaults to :func:`default_chunk_rows`; a rerun must use the same value to
    resume. After :meth:`run`, ``work_done`` is the number of samples that went through the model
    and ``chunks_copied`` the chunks copied from the donor as stored bytes.
    """

    kind = "embeddings"
    version = 1
    worker = "dq_ops.embed:embed_chunk"

    def __init__(
        self, store: Store, dataset: Artifact, split: str, config: EmbeddingConfig, *,
        seed: int, precision: str, chunk_rows: int | None = None,
    ):
        super().__init__(store)
        if split not in dataset.group:
            splits = sorted(name for name, _ in dataset.group.groups())
            raise DQInputError(f"{dataset.url}: no split {split!r}; splits: {', '.join(splits)}")
        self.dataset, self.split, self.config, self.seed = dataset, split, config, seed
        self.split_group = dataset[split]
        self.samples = next((name for name in ("images", "texts") if name in self.split_group), None)
        if self.samples is None:
            raise DQInputError(f"{dataset.url}/{split}: neither 'images' nor 'texts' (not an ingested dataset?)")
        if self.samples == "images":
            digest = weights_digest(config.backbone, config.weights)
            self.spec = ExtractorSpec("images", config.backbone, config.weights, config.image_size, digest)
            self._params: dict[str, Any] = {
                "backbone": config.backbone,
                "weights_sha256": digest,
                "image_size": config.image_size,
                "precision": precision,
            }
        else:
            self.spec = ExtractorSpec("texts", config.text_model)
            text_dim(config.text_model)  # an unknown model fails here, naming the known ones
            self._params = {"text_model": config.text_model, "text_model_version": text_model_version(config.text_model)}
        self._params.update(split=split, modality=self.samples, mode=config.mode)
        self.gradient_classes = None
        if config.mode == "gradient":
            class_names = dataset.group.attrs.get("class_names")
            self.gradient_classes = _gradient_classes(self.split_group, class_names, f"{dataset.url}/{split}")
            self._params.update(seed=seed, num_classes=self.gradient_classes)
        self._chunk_rows = chunk_rows or config.chunk_rows or default_chunk_rows(self.split_group[self.samples], config.batch_size)
        if self._chunk_rows < 1:
            raise DQInputError(f"chunk_rows must be positive, got {self._chunk_rows}")
        self._donor: tuple[Artifact | None, dict[str, int]] | None = None
        self._split_keys: np.ndarray | None = None  # content keys of the split's rows, read with the donor's
        self.chunks_copied = 0  # chunks of this run copied from the donor as stored bytes
        self._donor_layout: bool | None = None
        self._client: ClientSource = None  # the run's cluster: it, not this process, loads the model

    def params(self) -> dict[str, Any]:
        return dict(self._params)

    def inputs(self) -> list[Artifact]:
        return [self.dataset]

    def run(self, *, progress: Progress | None = None, client: ClientSource = None) -> Artifact:
        self._client = client
        return super().run(progress=progress, client=client)

    @functools.cached_property
    def dim(self) -> int:
        """Feature dimension: the donor's, else the model's. An image backbone's is built (on
        the meta device) where its rows will be embedded: on a worker when they go to the
        cluster, so the flow process never imports torch."""
        donor, _ = self.donor()
        if donor is not None:
            return int(donor["features"].shape[1])
        if self.samples == "texts":
            return text_dim(self.config.text_model)
        goes_to_cluster = is_running(self._client) or self.num_rows() > INLINE_ROWS
        [dim] = run_jobs(self._client if goes_to_cluster else None, "dq_ops.backbones:backbone_dim", [self.config.backbone])
        return int(dim)

    def num_rows(self) -> int:
        return int(self.split_group["ids"].shape[0])

    def chunk_rows(self) -> int:
        return self._chunk_rows

    def create_layout(self, group: zarr.Group) -> None:
        n = self.num_rows()
        write_array(group, "features", shape=(n, self.dim), dtype=np.float32, chunk_rows=self._chunk_rows,
                    compressor=feature_compressor())
        if self.gradient_classes is not None:
            write_array(group, "gradients", shape=(n, self.gradient_classes), dtype=np.float32, chunk_rows=self._chunk_rows,
                        compressor=feature_compressor())
            write_array(group, "labels", self.split_group["labels"][:], chunk_rows=self._chunk_rows)  # gradients depend on them
        write_array(group, "ids", self.split_group["ids"][:], chunk_rows=self._chunk_rows)

    def layout_matches(self, group: zarr.Group) -> bool:
        features = group.get("features")
        return features is not None and features.shape == (self.num_rows(), self.dim) and features.chunks[0] == self._chunk_rows

    @staticmethod
    def _rows_to_embed(jobs: list[_ChunkJob]) -> list[np.ndarray]:
        """Per job, the positions (within its chunk) of the rows no donor holds."""
        return [np.setdiff1d(np.arange(job.stop - job.start), job.copied if job.copied is not None else []) for job in jobs]

    def inline(self, jobs: list[_ChunkJob], cluster_running: bool) -> tuple[list[_ChunkJob], list[_ChunkJob]]:
        """Chunks that only copy from the donor run here. When no cluster runs yet, the rows to
        embed are few and this process computes at the stage's precision, every chunk runs here
        (no cluster start). With nothing to embed (a refresh that only removed samples) the model
        library is never imported."""
        to_embed = self._rows_to_embed(jobs)
        if not any(len(positions) for positions in to_embed):
            return jobs, []
        few = not cluster_running and sum(len(p) for p in to_embed) <= INLINE_ROWS
        if few and self._computes_here_as_on_workers():
            return jobs, []
        copy_only = [job for job, positions in zip(jobs, to_embed) if len(positions) == 0]
        return copy_only, [job for job, positions in zip(jobs, to_embed) if len(positions)]

    def _computes_here_as_on_workers(self) -> bool:
        """Whether this process computes at the stage's precision (asked only when it would compute)."""
        if self.samples == "texts":
            return True
        from dq_ops.backbones import inference_precision

        return inference_precision() == self._params["precision"]

    def prepare_inline(self, jobs: list[_ChunkJob]) -> list[_ChunkJob]:
        """On a refresh, the new rows of the chunks run here are scattered over many chunks, each
        of which would pad a batch of its own: they are embedded together in full batches first
        and handed to their jobs (``fresh``). A first run embeds chunk by chunk, resumable as usual."""
        to_embed = self._rows_to_embed(jobs)
        if all(job.copied is None for job in jobs) or not any(len(positions) for positions in to_embed):
            return jobs
        from dq_ops.backbones import get_extractor

        rows = np.concatenate([job.start + positions for job, positions in zip(jobs, to_embed)]).astype(np.int64)
        fresh = get_extractor(self.spec)(self.split_group[self.samples].get_orthogonal_selection((rows,)), self.config.batch_size)
        bounds = np.cumsum([0] + [len(p) for p in to_embed])
        return [dataclasses.replace(job, fresh=fresh[a:b]) for job, a, b in zip(jobs, bounds[:-1], bounds[1:])]

    def copy_ahead(self, jobs: list[_ChunkJob], on_done: Callable[[int], None]) -> list[_ChunkJob]:
        """The chunks whose every row the donor holds, with the donor and staging groups opened
        once: those that are one whole chunk of the donor in every embedding array copied as its
        stored bytes (no decoding, no encoding; the checksum verified), all together; the others
        (rows moved by a removal, say) read from the donor's rows and written, on threads.
        Gradient mode leaves the latter to their jobs, which compute the gradients."""
        from_donor = [job for job in jobs if job.copied is not None and len(job.copied) == job.stop - job.start]
        if not from_donor:
            return []
        donor = zarr.open_group(open_zarr_store(from_donor[0].donor_url, self.store.storage_options, read_only=True), mode="r")
        out = zarr.open_group(open_zarr_store(from_donor[0].staging_url, self.store.storage_options), mode="r+")
        names = ["features"] + (["gradients"] if self.gradient_classes is not None else [])
        arrays = {name: (donor[name], out[name]) for name in names}
        whole = [job for job in from_donor if job.whole_donor_chunk]
        donor_digests = {name: self.donor()[0].chunk_digests(name) for name in names}

        def digest(name: str, row: int) -> bytes | None:
            known = donor_digests[name]
            return known[row // self._chunk_rows] if row // self._chunk_rows < len(known) else None

        copied = copy_chunks([ChunkCopy(arrays[name][0], int(job.donor_rows[0]), arrays[name][1], job.start, job.stop - job.start,
                                        digest(name, int(job.donor_rows[0])))
                              for job in whole for name in names])
        done = [job for k, job in enumerate(whole) if all(copied[k * len(names):(k + 1) * len(names)])]
        self.chunks_copied += len(done)
        for _ in done:
            on_done(0)
        if self.gradient_classes is None:
            features, out_features = arrays["features"]
            taken = {job.index for job in done}

            def copy_rows(job: _ChunkJob) -> None:
                write_rows(out_features, job.start, features.get_orthogonal_selection((job.donor_rows, slice(None))))

            rows = [job for job in from_donor if job.index not in taken]
            run_jobs(None, copy_rows, rows, on_done=lambda _: on_done(0), threads=len(os.sched_getaffinity(0)))
            done += rows
        return done

    def moves_bytes_only(self, job: _ChunkJob) -> bool:
        """Jobs whose new rows were computed before (``fresh``) or that only copy."""
        return job.fresh is not None or (job.copied is not None and len(job.copied) == job.stop - job.start)

    def donor(self) -> tuple[Artifact | None, dict[str, int]]:
        """The earlier embeddings artifact (same parameters) sharing the most samples with this
        split, and its row of each shared content key."""
        if self._donor is None:
            gradients = self.gradient_classes is not None
            self._split_keys = content_keys(self.split_group["ids"][:], self.split_group["labels"][:] if gradients else None)
            wanted = set(self._split_keys)
            best: tuple[Artifact | None, dict[str, int]] = (None, {})
            for name in self.store.list(self.kind):
                candidate = self.store.open(self.kind, name)
                if candidate.params != self.key_params():
                    continue
                keys = content_keys(candidate["ids"][:], candidate["labels"][:] if gradients else None)
                rows = {k: r for r, k in enumerate(keys) if k in wanted}
                if len(rows) > len(best[1]):
                    best = (candidate, rows)
            self._donor = best
        return self._donor

    def job(self, staging_url: str, index: int, start: int, stop: int) -> _ChunkJob:
        donor, rows = self.donor()
        copied = donor_rows = None
        if donor is not None:
            keys = self._split_keys[start:stop]
            positions = [p for p, k in enumerate(keys) if k in rows]
            copied = np.array(positions, dtype=np.int64)
            donor_rows = np.array([rows[keys[p]] for p in positions], dtype=np.int64)
        return _ChunkJob(
            self.dataset.url, self.split, self.samples, staging_url, self.store.storage_options, self.spec,
            self.config.batch_size, index, start, stop, self.gradient_classes, self.seed,
            donor.url if donor is not None else None, copied, donor_rows,
            whole_donor_chunk=self._is_whole_donor_chunk(staging_url, donor_rows, stop - start),
        )

    def _is_whole_donor_chunk(self, staging_url: str, donor_rows: np.ndarray | None, rows: int) -> bool:
        """Whether ``donor_rows`` are, in order, one whole stored chunk of the donor's features
        whose bytes this layout can take as they are (a refresh that only added samples after
        them, say): :meth:`copy_ahead` copies them."""
        if donor_rows is None or len(donor_rows) != rows or rows != self._chunk_rows or not self._donor_layout_matches(staging_url):
            return False
        return donor_rows[0] % rows == 0 and bool(np.all(np.diff(donor_rows) == 1))

    def _donor_layout_matches(self, staging_url: str) -> bool:
        """Same chunk rows, dtype and codecs in the donor's features as in this staging layout
        (read once per run)."""
        if self._donor_layout is None:
            donor = self.donor()[0]["features"]
            staged = zarr.open_group(open_zarr_store(staging_url, self.store.storage_options), mode="r")["features"]
            self._donor_layout = (donor.chunks == staged.chunks and donor.dtype == staged.dtype
                                  and donor.metadata.codecs == staged.metadata.codecs)
        return self._donor_layout



@dataclass(frozen=True)
class EmbeddingResult:
    """The committed artifact and what this call computed."""

    artifact: Artifact
    rows_computed: int  # rows that went through the model now; the rest were copied or done before
    chunks_skipped: int  # chunks an interrupted earlier run had finished
    seconds: float

    @property
    def samples_per_second(self) -> float | None:
        """Throughput of this call (model loading on the workers included)."""
        return self.rows_computed / self.seconds if self.rows_computed and self.seconds > 0 else None


def embed_dataset(
    store: Store,
    dataset_name: str,
    split: str,
    config: EmbeddingConfig,
    client: Client | None,
    *,
    seed: int,
    progress: Progress | None = None,
    chunk_rows: int | None = None,
) -> EmbeddingResult:
    """Run :class:`EmbeddingsStage` for ``datasets/<dataset_name>`` (a snapshot, or a dataset's
    name for its latest snapshot) on ``client``'s workers, or inline without one."""
    from dq_ops.backbones import inference_precision

    precision = inference_precision() if client is None else workers_precision(client)
    stage = EmbeddingsStage(store, store.open("datasets", dataset_name), split, config, seed=seed, precision=precision,
                            chunk_rows=chunk_rows)
    started = time.perf_counter()
    artifact = stage.run(progress=progress, client=client)
    return EmbeddingResult(artifact, stage.work_done, stage.chunks_resumed, time.perf_counter() - started)
