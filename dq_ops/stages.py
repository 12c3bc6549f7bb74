"""The pipeline's stages (:class:`dq_ops.stage.Stage`): read artifacts, run the pure algorithm,
write the next artifact. Embeddings are :class:`dq_ops.embed.EmbeddingsStage`; patch dropping,
the MAE and reconstruction are in :mod:`dq_ops.pixels`.

These are what the Prefect tasks wrap and what a library user calls to run DQ without Prefect::

    artifact = BinsStage(store, dataset, embeddings, BinsConfig()).run()

Artifacts written here (see :mod:`dq_ops.store` for the layout):

* ``bins/<key>``: ``bin_of_sample`` (n,) int32 over the quantized split, ``ids``, ``labels``;
  attributes ``num_bins``, ``classes``, ``bin_sizes`` (classes × bins table) and
  ``class_digests`` (what each class's greedy depended on; lets a refresh reuse unchanged classes).
* ``subsets/<key>``: ``indices`` (k,) int64 into the split (sorted), ``ids``, ``labels``; attributes
  ``method``, ``ratio``, ``seed``, ``size``, ``dataset`` (the snapshot drawn from); beside it,
  once measured, ``coverage.json`` (:meth:`dq_ops.coverage.Coverage.metrics` in the embedding the
  bins were built on; :func:`measure_coverage`).

Training (torch) and the text classifiers (scipy) are imported where they run: finding an
evaluation already stored must not cost their import.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from dq_ops.baselines import select_herding, select_kcenter, select_random
from dq_ops.bins import JoinBoundaries, bin_budgets, generate_class_bins, join_boundaries, join_rows
from dq_ops.config import BinsConfig, EvaluationConfig, SamplingConfig
from dq_ops.coverage import coverage_of, nearest_selected, query_rows, unit_rows
from dq_ops.embed import content_keys
from dq_ops.errors import DQInputError
from dq_ops.features import DenseRows, FeatureRows, GradientEmbedding, class_groups, single_threaded_blas
from dq_ops.progress import Progress
from dq_ops.sampling import bin_intensities, sample_bins, sample_sizes
from dq_ops.stage import Stage, is_running, resolve_client, run_jobs
from dq_ops.store import QUANTIZED_SPLIT, Artifact, Store, canonical_json, derive_key, open_zarr_store, write_array

if TYPE_CHECKING:
    from distributed import Client

    from dq_ops.stage import ClientSource
    from dq_ops.train import TrainConfig

BASELINES: dict[str, Callable[..., np.ndarray]] = {
    "random": select_random,
    "kcenter": select_kcenter,
    "herding": select_herding,
}

# When no cluster is running, changed classes holding at most this many rows in all are re-binned
# in this process rather than on a cluster started for them: for a refresh's few changed classes
# that is quicker than starting a local cluster (measured with bench/refresh.py).
BINS_INLINE_ROWS = 32_768
# Classes are binned in jobs of several classes whose rows are read in one pass: each job decodes
# about every chunk of the features (classes interleave), so every job costs a pass over the
# whole array and the jobs are as few as memory and the cluster allow. A job holds at most
# JOB_MEMORY_SHARE of the smallest worker's memory limit in feature rows (CLASS_JOB_BYTES where
# workers have none; the greedy beside them needs little: ``memory_budget_mb``) and, where the
# classes allow, the split is cut into JOBS_PER_THREAD jobs per worker thread, so that every
# thread gets work and an uneven job does not leave the others idle.
JOB_MEMORY_SHARE = 0.3
CLASS_JOB_BYTES = 640 * 2**20
JOBS_PER_THREAD = 2


def _workers(cluster: Client | None) -> list[dict[str, Any]]:
    return list(cluster.scheduler_info(n_workers=-1)["workers"].values()) if cluster else []


def worker_threads(cluster: Client | None) -> int:
    """The cluster's worker threads (none yet, or no cluster: as one)."""
    return max(1, sum(worker["nthreads"] for worker in _workers(cluster)))


def class_job_rows(cluster: Client | None, row_bytes: int, rows: int) -> int:
    """Rows per class job, for ``rows`` rows of ``row_bytes`` bytes in all (see above)."""
    workers, threads = _workers(cluster), worker_threads(cluster)
    limits = [worker["memory_limit"] for worker in workers if worker.get("memory_limit")]
    budget = JOB_MEMORY_SHARE * min(limits) if limits else CLASS_JOB_BYTES
    return max(1, min(int(budget // row_bytes), -(-rows // (JOBS_PER_THREAD * threads))))


# Columns of the last split read whole: a run's bins and each of its subsets read the labels, its
# subsets the ids (a request per chunk of a few thousand rows, every string decoded), from an
# artifact that never changes.
_SPLIT_COLUMNS: dict[tuple[str, str], np.ndarray] = {}
_SPLIT_COLUMNS_LOCK = threading.Lock()


def split_column(dataset: Artifact, name: str, split: str = QUANTIZED_SPLIT) -> np.ndarray:
    """The split's ``name`` array (``ids``, ``labels``), read once per dataset and process (read-only)."""
    key = f"{dataset.url}|{dataset.fingerprint}|{split}"
    with _SPLIT_COLUMNS_LOCK:
        if any(held != key for held, _ in _SPLIT_COLUMNS):
            _SPLIT_COLUMNS.clear()
        if (key, name) not in _SPLIT_COLUMNS:
            column = np.asarray(dataset[f"{split}/{name}"][:])
            column.flags.writeable = False
            _SPLIT_COLUMNS[key, name] = column
        return _SPLIT_COLUMNS[key, name]


def split_labels(dataset: Artifact, split: str = QUANTIZED_SPLIT) -> np.ndarray | None:
    """The split's labels (read-only), or None when the dataset is unlabelled (all -1)."""
    labels = split_column(dataset, "labels", split)
    return None if (labels < 0).all() else labels


# Incremental bins' carried bins (BinsStage._carried_bins) of the last (previous bins, dataset) pair.
_CARRIED: dict[tuple[str, str, str, str], np.ndarray] = {}
_CARRIED_LOCK = threading.Lock()


def labelled_ids(ids: np.ndarray, labels: np.ndarray | None) -> list[tuple[str, int]]:
    """(sample id, label) pairs: what incremental bins match on, so that a relabelled sample (same
    id, new label) leaves its old class's bin and joins its new class like a new sample."""
    return list(zip((str(i) for i in ids), (-1 for _ in ids) if labels is None else (int(y) for y in labels), strict=True))


def embedding_rows(embeddings: Artifact, rows: np.ndarray | None = None) -> FeatureRows:
    """Rows of an embeddings artifact (all, or ``rows``) as bins take them: dense features, or
    the factorised gradient embedding when the artifact holds ``gradients`` (mode="gradient")."""
    def read(name: str) -> np.ndarray:
        array = embeddings[name]
        return np.asarray(array[:] if rows is None else array.get_orthogonal_selection((rows, slice(None))))

    if "gradients" in embeddings.group:
        return GradientEmbedding(read("gradients"), read("features"))
    return DenseRows(read("features"))


def embedding_row_bytes(embeddings: Artifact) -> int:
    """Bytes of one row as :func:`embedding_rows` holds it (features, and gradients if any)."""
    return sum(int(np.prod(embeddings[name].shape[1:])) * embeddings[name].dtype.itemsize
               for name in ("features", "gradients") if name in embeddings.group)


def _class_digest(embeddings: Artifact, content: np.ndarray, budgets: np.ndarray, kernel: str) -> str:
    """What one class's greedy depends on: its rows' features in order, its budgets, the kernel.

    A row's features are a function of the embedding parameters and the row's content key
    (:func:`dq_ops.embed.content_keys`: a computed row does not depend on its batch, a reused row
    is copied byte for byte), so the digest hashes those instead of the features: a refresh
    decides which classes changed without reading any features. ``content`` holds the class's
    content keys in row order. Two classes with the same digest get the same bins, whatever
    snapshot they belong to.
    """
    digest = hashlib.sha256(f"{kernel}|{budgets.tolist()}|{canonical_json(embeddings.params)}".encode())
    digest.update("\n".join(content.tolist()).encode())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class ClassBins:
    """What one class's bins are made from: its rows (positions in the split) and either its bin
    budgets (the exact greedy, :func:`dq_ops.bins.generate_class_bins`; ``keep_boundaries`` also
    returns the :class:`~dq_ops.bins.JoinBoundaries` the bins leave) or, to join new rows to bins
    made before, those bins' boundaries (:func:`dq_ops.bins.join_rows`; ``rows`` are the new rows)."""

    rows: np.ndarray
    budgets: np.ndarray | None = None
    boundaries: JoinBoundaries | None = None
    keep_boundaries: bool = False

    def bin_of(self, features: FeatureRows, num_bins: int, kernel: str,
               memory_budget_mb: int) -> tuple[np.ndarray, JoinBoundaries | None]:
        """The bin of each of ``rows`` (int32, in their order) and, for an exact greedy asked to
        keep them, the boundaries its bins leave."""
        if self.boundaries is not None:
            return join_rows(features, self.boundaries, kernel=kernel), None
        local = np.empty(len(self.rows), dtype=np.int32)
        for b, picked in enumerate(generate_class_bins(features, self.budgets, kernel=kernel, memory_budget_mb=memory_budget_mb)):
            local[picked] = b
        return local, join_boundaries(features, local, num_bins, kernel=kernel) if self.keep_boundaries else None


@dataclasses.dataclass(frozen=True)
class ClassBinsJob:
    """Some classes' bins as a picklable job: the embeddings by store URL and name, the classes."""

    store_url: str
    storage_options: dict[str, Any]
    embeddings: str
    classes: list[ClassBins]
    num_bins: int
    kernel: str
    memory_budget_mb: int


def classes_rows(embeddings: Artifact, groups: list[np.ndarray]) -> Iterator[FeatureRows]:
    """Each class's rows of ``groups``, in order, from one read of the features: classes
    interleave across every chunk, so reading class by class would decode each chunk once per class."""
    wanted = np.sort(np.concatenate(groups)) if groups else np.zeros(0, dtype=np.int64)
    rows = embedding_rows(embeddings, wanted)
    for members in groups:
        yield rows.take(np.searchsorted(wanted, members))


def _class_bins_worker(job: ClassBinsJob) -> list[tuple[np.ndarray, JoinBoundaries | None]]:
    """The job's classes' bins, run on a dask worker: their rows read in one pass, then class by class."""
    embeddings = Store(job.store_url, job.storage_options).open("embeddings", job.embeddings)
    return [work.bin_of(features, job.num_bins, job.kernel, job.memory_budget_mb)
            for work, features in zip(job.classes, classes_rows(embeddings, [work.rows for work in job.classes]))]


def class_batches(sizes: list[int], rows_per_batch: int) -> list[list[int]]:
    """Consecutive positions of ``sizes`` in batches of at most ``rows_per_batch`` rows (a larger
    class alone)."""
    batches: list[list[int]] = []
    rows = 0
    for position, size in enumerate(sizes):
        if not batches or rows + size > rows_per_batch:
            batches.append([])
            rows = 0
        batches[-1].append(position)
        rows += size
    return batches


class BinsStage(Stage):
    """GraphCut bins of the quantized split (``dq_ops.bins``), classes fanned out over a dask client.

    The (classes × bins) budget table is computed up front from the class sizes, which makes
    every class an independent greedy. A class whose digest (:func:`_class_digest`) matches a
    class of an earlier bins artifact with the same parameters takes that class's bins instead of
    re-running the greedy: the result is exactly what a full run computes, and a refresh re-bins
    only the classes whose samples (or budgets) changed. ``classes_rebinned`` lists them after
    :meth:`run`. ``memory_budget_mb`` changes only speed and stays out of the key.

    With ``refresh="incremental"`` the stage instead continues the bins its lineage (same
    dataset name and settings) published last: samples already binned keep their bins, new
    ones join by their GraphCut gain against the boundaries the last exact greedy left
    (:func:`dq_ops.bins.join_rows`; every class's are kept in the artifact as
    ``join_directions`` and ``join_thresholds``, so a join reads only the new samples'
    features), and a full exact rebuild happens once the samples joined or removed since the
    last one exceed ``rebuild_fraction`` of the data. Until then the boundaries stay those of
    the last rebuild (joined and removed samples do not move them). The previous bins are an
    input of a joining run's key (not of a rebuild's, so ``dq gc`` can drop what came before the
    last rebuild).
    """

    kind = "bins"
    version = 3

    def __init__(self, store: Store, dataset: Artifact, embeddings: Artifact, config: BinsConfig):
        super().__init__(store)
        self.dataset, self.embeddings, self.config = dataset, embeddings, config
        self.classes_rebinned: list[int] = []

    @property
    def incremental(self) -> bool:
        return self.config.refresh == "incremental"

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "num_bins": self.config.num_bins, "kernel": self.config.kernel, "budget_rule": self.config.budget_rule,
        }
        if self.incremental:
            params |= {"refresh": "incremental", "rebuild_fraction": self.config.rebuild_fraction}
        return params

    def _lineage(self) -> str:
        """The ref naming the bins last published for this dataset name and these settings."""
        base = self.dataset.record.get("snapshot_of", self.dataset.name)
        return f"{base}-{derive_key('bins-lineage', {'bins': self.key_params(), 'embeddings': self.embeddings.params})}"

    def previous(self) -> Artifact | None:
        """incremental: the bins this lineage published last, when this run joins samples to them
        (None: exact mode, a first run, or a full rebuild is due). Looked up once per stage: it
        compares every sample's (id, label) with the previous bins'."""
        return self._previous

    @functools.cached_property
    def _previous(self) -> Artifact | None:
        if not self.incremental:
            return None
        ref = self.store.read_ref(self.kind, self._lineage())
        if not ref or not self.store.exists(self.kind, ref["latest"]):
            return None
        previous = self.store.open(self.kind, ref["latest"])
        if "join_directions" not in previous.group:  # made before boundaries were kept
            return None
        joined, removed = self._changes(previous)
        return previous if joined + removed <= self.config.rebuild_fraction * len(self._carried_bins(previous)) else None

    def _changes(self, previous: Artifact) -> tuple[int, int]:
        """Samples joined and removed since the last rebuild, counting this run's."""
        carried = self._carried_bins(previous)
        kept = int((carried >= 0).sum())
        return (int(previous.group.attrs.get("joined_since_rebuild", 0)) + len(carried) - kept,
                int(previous.group.attrs.get("removed_since_rebuild", 0)) + previous["ids"].shape[0] - kept)

    def _carried_bins(self, previous: Artifact) -> np.ndarray:
        """Each sample's bin in ``previous``, matched by (id, label); -1 for a sample it lacks (new,
        or relabelled). Computed once per process for the last (previous, dataset) pair, which a
        run's cache key and its task both ask for: it goes through every sample of both (read-only)."""
        key = (previous.url, previous.fingerprint, self.dataset.url, self.dataset.fingerprint)
        with _CARRIED_LOCK:
            if key not in _CARRIED:
                earlier = dict(zip(labelled_ids(previous["ids"][:], np.asarray(previous["labels"][:])),
                                   np.asarray(previous["bin_of_sample"][:]).tolist()))
                ids = labelled_ids(split_column(self.dataset, "ids"), split_labels(self.dataset))
                carried = np.array([earlier.get(i, -1) for i in ids], dtype=np.int32)
                carried.flags.writeable = False
                _CARRIED.clear()
                _CARRIED[key] = carried
            return _CARRIED[key]

    def _continues(self, previous: Artifact | None) -> bool:
        """Whether ``previous`` was made from this very dataset and embeddings (nothing to join)."""
        return previous is not None and previous.record["inputs"][:2] == [self.dataset.fingerprint, self.embeddings.fingerprint]

    def inputs(self) -> list[Artifact]:
        previous = self.previous()
        extra = [previous] if previous is not None and not self._continues(previous) else []
        return [self.dataset, self.embeddings, *extra]

    def name(self) -> str:
        previous = self.previous()
        return previous.name if self._continues(previous) else super().name()

    def run(self, *, progress: Progress | None = None, client: ClientSource = None) -> Artifact:
        artifact = super().run(progress=progress, client=client)
        if self.incremental:
            self.store.write_ref(self.kind, self._lineage(), {"latest": artifact.name})
        return artifact

    def _earlier_classes(self) -> dict[str, tuple[Artifact, int]]:
        """Class digest → (earlier bins artifact with this stage's parameters, its class label);
        incremental: only artifacts that keep their boundaries."""
        found: dict[str, tuple[Artifact, int]] = {}
        for name in self.store.list(self.kind):
            earlier = self.store.open(self.kind, name)
            if earlier.params == self.key_params() and (not self.incremental or "join_directions" in earlier.group):
                for label, digest in zip(earlier.group.attrs["classes"], earlier.group.attrs["class_digests"]):
                    found.setdefault(digest, (earlier, label))
        return found

    def compute(self, group: zarr.Group, progress: Progress | None, client: ClientSource) -> None:
        previous = self.previous()
        if previous is not None:
            self._join(group, previous, progress, client)
        else:
            self._compute_exact(group, progress, client)
            group.attrs.update({"joined_since_rebuild": 0, "removed_since_rebuild": 0} if self.incremental else {})

    def _join(self, group: zarr.Group, previous: Artifact, progress: Progress | None, client: ClientSource) -> None:
        """Join the new (and relabelled) samples to ``previous``' bins by its boundaries; a class it
        lacks gets its own exact greedy; ``progress`` counts classes."""
        labels = split_labels(self.dataset)
        bin_of_sample = self._carried_bins(previous).copy()
        joined, removed = self._changes(previous)
        classes, groups = class_groups(labels, len(bin_of_sample))
        classes = np.array([-1]) if classes is None else classes
        num_bins = self.config.num_bins
        kept, boundaries = _Boundaries.read(previous), _Boundaries(num_bins)
        todo = []
        for c, members in enumerate(groups):
            current = bin_of_sample[members]
            if (current < 0).all():  # a class with no binned samples yet: its own exact greedy
                todo.append((c, ClassBins(members, budgets=bin_budgets([len(members)], num_bins, self.config.budget_rule)[0],
                                          keep_boundaries=True)))
                continue
            boundaries.add(int(classes[c]), kept.of(int(classes[c])))
            if (current < 0).any():
                todo.append((c, ClassBins(members[current < 0], boundaries=kept.of(int(classes[c])))))
        self.classes_rebinned = [int(classes[c]) for c, _ in todo]
        for (c, work), (local, made) in zip(todo, self._bin_classes([work for _, work in todo], len(groups), progress, client)):
            bin_of_sample[work.rows] = local
            if made is not None:
                boundaries.add(int(classes[c]), made)
        sizes = [[int((bin_of_sample[members] == b).sum()) for b in range(num_bins)] for members in groups]
        self._write(group, bin_of_sample, labels, classes, sizes, [], boundaries)
        group.attrs.update({"joined_since_rebuild": joined, "removed_since_rebuild": removed})

    def _bin_classes(self, classes: list[ClassBins], total: int, progress: Progress | None,
                     client: ClientSource) -> list[tuple[np.ndarray, JoinBoundaries | None]]:
        """Each of ``classes``' :meth:`ClassBins.bin_of` (``progress`` counts classes out of
        ``total``, the others done from the start). On the cluster in jobs of several classes
        when one runs or the rows are many; else here, their rows read in one pass and the classes
        on threads (BLAS releases the GIL; one BLAS thread each, limited once around them all),
        which beats one by one."""
        done = [total - len(classes)]

        def classes_finished(count: int) -> None:
            done[0] += count
            if progress:
                progress(done[0], total)

        classes_finished(0)
        kernel, memory = self.config.kernel, self.config.memory_budget_mb
        sizes = [len(work.rows) for work in classes]
        if classes and (is_running(client) or sum(sizes) > BINS_INLINE_ROWS):
            cluster = resolve_client(client)
            per_job = class_job_rows(cluster, embedding_row_bytes(self.embeddings), sum(sizes))
            jobs = [ClassBinsJob(self.store.url, self.store.storage_options, self.embeddings.name, [classes[i] for i in batch],
                                 self.config.num_bins, kernel, memory) for batch in class_batches(sizes, per_job)]
            return [local for batch in run_jobs(cluster, _class_bins_worker, jobs, on_done=lambda b: classes_finished(len(b)))
                    for local in batch]
        features = list(classes_rows(self.embeddings, [work.rows for work in classes]))

        def bin_class(i: int) -> tuple[np.ndarray, JoinBoundaries | None]:
            return classes[i].bin_of(features[i], self.config.num_bins, kernel, memory)

        with single_threaded_blas():
            return run_jobs(None, bin_class, list(range(len(classes))), on_done=lambda _: classes_finished(1),
                            threads=len(os.sched_getaffinity(0)))

    def _write(self, group: zarr.Group, bin_of_sample: np.ndarray, labels: np.ndarray | None, classes: np.ndarray,
               sizes: list[list[int]], digests: list[str], boundaries: _Boundaries | None) -> None:
        n = len(bin_of_sample)
        write_array(group, "bin_of_sample", bin_of_sample)
        write_array(group, "ids", split_column(self.dataset, "ids"))
        write_array(group, "labels", np.full(n, -1, dtype=np.int64) if labels is None else labels)
        if boundaries is not None:
            boundaries.write(group, [int(c) for c in classes])
        group.attrs.update({
            "num_bins": self.config.num_bins,
            "classes": [int(c) for c in classes],
            "bin_sizes": sizes,
            "class_digests": digests,
        })

    def _compute_exact(self, group: zarr.Group, progress: Progress | None, client: ClientSource) -> None:
        labels = split_labels(self.dataset)
        n = self.embeddings["features"].shape[0]
        if labels is not None and len(labels) != n:
            raise DQInputError(f"{self.embeddings.url}: {n} embeddings for {len(labels)} labelled samples in {self.dataset.url}")
        classes, groups = class_groups(labels, n)
        classes = np.array([-1]) if classes is None else classes
        budgets = bin_budgets([len(g) for g in groups], self.config.num_bins, self.config.budget_rule)
        kernel = self.config.kernel
        gradients = "gradients" in self.embeddings.group  # their rows depend on the label too
        content = content_keys(self.embeddings["ids"][:], labels if gradients else None)
        digests = [_class_digest(self.embeddings, content[members], budgets[c], kernel) for c, members in enumerate(groups)]

        bin_of_sample = np.empty(n, dtype=np.int32)
        boundaries = _Boundaries(self.config.num_bins) if self.incremental else None
        earlier = self._earlier_classes()
        todo = []
        read: dict[str, tuple[np.ndarray, np.ndarray, _Boundaries | None]] = {}  # an earlier artifact's, read once
        for c, members in enumerate(groups):
            if digests[c] in earlier:
                artifact, label = earlier[digests[c]]
                if artifact.name not in read:
                    read[artifact.name] = (np.asarray(artifact["labels"][:]), np.asarray(artifact["bin_of_sample"][:]),
                                           _Boundaries.read(artifact) if boundaries is not None else None)
                old_labels, old_bins, old_boundaries = read[artifact.name]
                bin_of_sample[members] = old_bins if label == -1 else old_bins[old_labels == label]
                if boundaries is not None and old_boundaries is not None:  # _earlier_classes kept them
                    boundaries.add(int(classes[c]), old_boundaries.of(label))
            else:
                todo.append(c)
        self.classes_rebinned = [int(classes[c]) for c in todo]
        work = [ClassBins(groups[c], budgets=budgets[c], keep_boundaries=boundaries is not None) for c in todo]
        for c, (local, made) in zip(todo, self._bin_classes(work, len(groups), progress, client)):
            bin_of_sample[groups[c]] = local
            if boundaries is not None and made is not None:
                boundaries.add(int(classes[c]), made)
        self._write(group, bin_of_sample, labels, classes, budgets.tolist(), digests, boundaries)


class _Boundaries:
    """Every class's :class:`~dq_ops.bins.JoinBoundaries`, as a bins artifact keeps them: arrays
    ``join_directions`` (classes, K−1, dim) and ``join_thresholds`` (classes, K−1), in the order
    of its ``classes`` attribute."""

    def __init__(self, num_bins: int) -> None:
        self.num_bins = num_bins
        self._of: dict[int, JoinBoundaries] = {}

    @classmethod
    def read(cls, bins: Artifact) -> _Boundaries:
        directions, thresholds = np.asarray(bins["join_directions"][:]), np.asarray(bins["join_thresholds"][:])
        kept = cls(directions.shape[1] + 1)
        for i, label in enumerate(bins.group.attrs["classes"]):
            kept.add(int(label), JoinBoundaries(directions[i], thresholds[i]))
        return kept

    def of(self, label: int) -> JoinBoundaries:
        return self._of[label]

    def add(self, label: int, boundaries: JoinBoundaries) -> None:
        self._of[label] = boundaries

    def write(self, group: zarr.Group, classes: list[int]) -> None:
        kept = [self._of[label] for label in classes]
        write_array(group, "join_thresholds", np.stack([b.thresholds for b in kept]))
        directions = write_array(group, "join_directions", shape=(len(kept), *kept[0].directions.shape), dtype=np.float64)
        step = directions.chunks[0]
        for start in range(0, len(kept), step):  # a chunk at a time: never a second copy of them all
            directions[start:start + step] = np.stack([b.directions for b in kept[start:start + step]])


def bins_as_lists(bins: Artifact) -> list[np.ndarray]:
    """The bins artifact as ``generate_bins`` returns them: sorted indices per bin."""
    bin_of_sample = np.asarray(bins["bin_of_sample"][:])
    return [np.flatnonzero(bin_of_sample == b) for b in range(int(bins.group.attrs["num_bins"]))]


def rounding_of(bins: Artifact) -> str:
    """How subsets of these bins round per-class sizes: the reference's per-bin rounding with the
    reference's bin budgets, per class otherwise (``dq_ops.sampling``)."""
    return "per-bin" if bins.params.get("budget_rule") == "reference" else "per-class"


# Coverage passes over more rows than this run on the cluster, when one is configured (one is
# running: always), cut into JOBS_PER_THREAD ranges of whole chunks per worker thread: each
# reads and decodes every chunk of its range, which here would be the subset stage's longest part.
COVERAGE_INLINE_ROWS = 131_072


@dataclasses.dataclass(frozen=True)
class CoverageJob:
    """The nearest selected rows of the coverage queries among one range of the features' rows;
    ``labels`` and ``selected`` (a mask per subset) are the range's. The embeddings group by URL:
    the flow opened it as an artifact (its chunks counted), so a job opens only its ``features``."""

    url: str
    storage_options: dict[str, Any]
    start: int
    stop: int
    labels: np.ndarray
    selected: np.ndarray


def _coverage_worker(job: CoverageJob, query_labels: np.ndarray, query_units: np.ndarray) -> np.ndarray:
    features = zarr.open_group(open_zarr_store(job.url, job.storage_options), mode="r")["features"]
    blocks = ((first - job.start, block) for first, block in stored_chunks(features, job.start, job.stop))
    return nearest_selected(blocks, job.labels, job.selected, query_labels, query_units)


def subsets_coverage(store: Store, embeddings: Artifact, labels: np.ndarray | None, subsets: Sequence[np.ndarray],
                     bins: list[np.ndarray], progress: Progress | None = None, client: ClientSource = None) -> list[dict[str, float]]:
    """:func:`dq_ops.coverage.coverage_of` for each of ``subsets`` (row indices), in one pass over
    the embeddings' ``features`` (the penultimate embedding, also in gradient mode) for all of
    them, read one stored chunk of rows at a time: here, or in ranges of rows on the cluster
    (``COVERAGE_INLINE_ROWS``), whose nearest distances combine by their minimum. ``progress``
    counts the rows gone through."""
    features = embeddings["features"]
    n = features.shape[0]
    labels = np.zeros(n, dtype=np.int64) if labels is None else labels
    queries = query_rows(n)
    query_labels, query_units = labels[queries], unit_rows(_query_features(embeddings, queries))
    subsets = [np.asarray(subset, dtype=np.int64) for subset in subsets]
    selected = np.zeros((len(subsets), n), dtype=bool)
    for mask, subset in zip(selected, subsets):
        mask[subset] = True
    done = [0]

    def rows_done(rows: int) -> None:
        done[0] = min(n, done[0] + rows)
        if progress:
            progress(done[0], n)

    rows_done(0)
    if is_running(client) or (client is not None and n > COVERAGE_INLINE_ROWS):
        cluster = resolve_client(client)
        step = features.chunks[0] * max(1, -(-n // (features.chunks[0] * JOBS_PER_THREAD * worker_threads(cluster))))
        jobs = [CoverageJob(embeddings.url, store.storage_options, start, min(n, start + step),
                            labels[start:start + step], selected[:, start:start + step]) for start in range(0, n, step)]
        shared = tuple(cluster.scatter([query_labels, query_units], broadcast=True))
        best = np.minimum.reduce(run_jobs(cluster, _coverage_worker, jobs, shared=shared,
                                          on_done=lambda _: rows_done(step), key=lambda job: f"coverage-{job.start}"))
    else:
        def blocks() -> Iterator[tuple[int, np.ndarray]]:
            for start, block in stored_chunks(features):
                yield start, block
                rows_done(len(block))

        best = nearest_selected(blocks(), labels, selected, query_labels, query_units)
    return [coverage_of(nearest, labels, subset, queries, bins).metrics() for nearest, subset in zip(best, subsets)]


# Beside each subset (Store.write_sidecar): its coverage, a measure of the subset rather than part
# of it, so measuring it never changes the subset's fingerprint.
COVERAGE_SIDECAR = "coverage.json"


def measure_coverage(store: Store, dataset: Artifact, embeddings: Artifact, bins: Artifact, subsets: Sequence[Artifact],
                     progress: Progress | None = None, client: ClientSource = None) -> list[dict[str, float]]:
    """The coverage of each of ``subsets`` (drawn from ``bins`` of ``embeddings``), measured in
    the embedding the bins were built on: kept in the subset's ``coverage.json``, and for the
    subsets without one measured together, in one pass over the features (:func:`subsets_coverage`)."""
    for subset in subsets:
        if not {embeddings.fingerprint, bins.fingerprint} <= set(subset.record["inputs"]):
            raise DQInputError(f"{subset.url} was not drawn from {bins.url} of {embeddings.url}: its coverage is not measured there")
    kept = [store.read_sidecar("subsets", subset.name, COVERAGE_SIDECAR) for subset in subsets]
    missing = [subset for subset, payload in zip(subsets, kept) if payload is None]
    measured = iter(subsets_coverage(store, embeddings, split_labels(dataset), [np.asarray(s["indices"][:]) for s in missing],
                                     bins_as_lists(bins), progress, client) if missing else [])
    coverage = []
    for subset, payload in zip(subsets, kept):
        if payload is None:
            payload = canonical_json(next(measured)).encode()
            store.write_sidecar("subsets", subset.name, COVERAGE_SIDECAR, payload)
        coverage.append(json.loads(payload))
    return coverage


# Stored chunks requested ahead of the one being used: a chunk's request and decoding wait on
# the store, so several in flight keep a pass over an array from waiting on each in turn.
CHUNKS_AHEAD = 3


def stored_chunks(array: zarr.Array, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, rows)`` of each stored chunk of rows of ``array`` from row ``start`` (a chunk
    boundary) to ``stop``, in order, with up to :data:`CHUNKS_AHEAD` chunks read ahead on threads
    (memory: that many decoded chunks)."""
    step, n = array.chunks[0], array.shape[0] if stop is None else stop
    with ThreadPoolExecutor(CHUNKS_AHEAD) as readers:
        pending: deque[tuple[int, Future[np.ndarray]]] = deque()
        for first in range(start, n, step):
            pending.append((first, readers.submit(lambda s: np.asarray(array[s:min(n, s + step)]), first)))
            if len(pending) > CHUNKS_AHEAD:
                ready, block = pending.popleft()
                yield ready, block.result()
        while pending:
            ready, block = pending.popleft()
            yield ready, block.result()


# The coverage queries' feature rows of the last embeddings artifact measured: a run's subsets
# (every keep ratio, DQ and each baseline) share them, and reading them touches every chunk.
_QUERIES: dict[str, np.ndarray] = {}
_QUERIES_LOCK = threading.Lock()


def _query_features(embeddings: Artifact, queries: np.ndarray) -> np.ndarray:
    """``features[queries]``, read chunk by chunk (one orthogonal read of them would decode every
    chunk at once), once per embeddings artifact and process."""
    key = f"{embeddings.url}|{embeddings.fingerprint}|{len(queries)}"
    with _QUERIES_LOCK:  # subset tasks may run side by side
        if key not in _QUERIES:
            features = embeddings["features"]
            rows = np.concatenate(
                [block[picked - start] for start, block in stored_chunks(features)
                 if (picked := queries[(queries >= start) & (queries < start + len(block))]).size]
                or [np.zeros((0, *features.shape[1:]), dtype=features.dtype)]
            )
            _QUERIES.clear()
            _QUERIES[key] = rows
        return _QUERIES[key]


class _SubsetStage(Stage):
    """A subset of the quantized split: ``indices`` (sorted) and ``ids``; subclasses pick the rows."""

    kind = "subsets"
    version = 4  # 4: coverage moved beside the subset (coverage.json)

    def __init__(self, store: Store, dataset: Artifact, embeddings: Artifact, bins: Artifact, ratio: float, seed: int):
        super().__init__(store)
        self.dataset, self.embeddings, self.bins, self.ratio, self.seed = dataset, embeddings, bins, ratio, seed

    def inputs(self) -> list[Artifact]:
        return [self.dataset, self.embeddings, self.bins]

    def select(self, bins: list[np.ndarray], labels: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def compute(self, group: zarr.Group, progress: Progress | None, client: ClientSource) -> None:
        bins, labels = bins_as_lists(self.bins), split_labels(self.dataset)
        indices = np.sort(np.asarray(self.select(bins, labels), dtype=np.int64))
        write_array(group, "indices", indices)
        write_array(group, "ids", split_column(self.dataset, "ids")[indices])
        write_array(group, "labels", split_column(self.dataset, "labels")[indices])
        group.attrs.update(self.params() | {"size": int(len(indices)), "dataset": self.dataset.name})


class SampleStage(_SubsetStage):
    """The DQ subset at ``ratio``, drawn from the bins by ``dq_ops.sampling.sample_bins`` with the
    sampling section's rule; random draws rank samples by a hash of (seed, sample id), so a
    refresh changes the selection only where the data or the bins changed."""

    def __init__(self, store: Store, dataset: Artifact, embeddings: Artifact, bins: Artifact, ratio: float, seed: int,
                 config: SamplingConfig):
        super().__init__(store, dataset, embeddings, bins, ratio, seed)
        self.config = config

    @property
    def rule(self) -> str:
        return self.config.rule_for(self.dataset.group.attrs["modality"])

    def params(self) -> dict[str, Any]:
        return {"method": "dq", "ratio": self.ratio, "seed": self.seed, "bin_weights": self.rule} | (
            {"adaptive_alpha": self.config.adaptive_alpha} if self.rule == "adaptive" else {})

    def select(self, bins: list[np.ndarray], labels: np.ndarray | None) -> np.ndarray:
        ids = np.asarray(self.dataset[f"{QUANTIZED_SPLIT}/ids"][:])
        return sample_bins(bins, labels, self.ratio, self.seed, ids=ids, weights=self._weights(bins, labels),
                           rounding=rounding_of(self.bins))

    def _weights(self, bins: list[np.ndarray], labels: np.ndarray | None) -> np.ndarray | None:
        # the penultimate embedding (also in gradient mode), read only for the rule that needs it
        return bin_intensities(self.rule, bins, labels, ratio=self.ratio, rounding=rounding_of(self.bins),
                               features=lambda: np.asarray(self.embeddings["features"][:]), alpha=self.config.adaptive_alpha)


class BaselineStage(_SubsetStage):
    """A comparison subset (random, k-center, herding) with exactly the DQ subset's per-class sizes."""

    def __init__(self, store: Store, dataset: Artifact, embeddings: Artifact, bins: Artifact, method: str, ratio: float, seed: int):
        if method not in BASELINES:
            raise DQInputError(f"unknown baseline {method!r}; expected one of {', '.join(BASELINES)}")
        super().__init__(store, dataset, embeddings, bins, ratio, seed)
        self.method = method

    def params(self) -> dict[str, Any]:
        return {"method": self.method, "ratio": self.ratio, "seed": self.seed}

    def select(self, bins: list[np.ndarray], labels: np.ndarray | None) -> np.ndarray:
        sizes = sample_sizes(bins, labels, self.ratio, rounding_of(self.bins))
        # A random draw depends on the class sizes alone: the (n, d) features stay in the store
        # (read whole, the flow process would hold several copies of them at once).
        rows = self.embeddings["features"].shape[0] if self.method == "random" else embedding_rows(self.embeddings)
        return BASELINES[self.method](rows, labels, self.ratio, self.seed, sizes=sizes)


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """One training run as a picklable job: artifacts by store URL and name, never arrays."""

    store_url: str
    storage_options: dict[str, Any]
    dataset: str  # snapshot name under datasets/
    subset: str | None  # None: the whole quantized split
    images: str | None  # a reconstructions artifact whose images replace the subset's pixels
    config: EvaluationConfig
    seed: int


def train_config(config: EvaluationConfig) -> TrainConfig:
    """The library recipe with the evaluation section's budget and shuffle window."""
    from dq_ops.train import TrainConfig

    return TrainConfig(epochs=config.epochs, min_steps=config.min_steps, max_steps=config.max_steps,
                       shuffle_window_mb=config.shuffle_window_mb)


def run_training(job: TrainJob, progress: Progress | None = None) -> dict[str, Any]:
    """Train ``job.config.architecture`` on the job's samples and test it; the ``TrainResult`` as a dict.

    Plain function of a :class:`TrainJob`, so a dask worker can run it: it streams its images from
    the store (:class:`dq_ops.train_data.ZarrRows`: the subset's rows of the split, the
    reconstructions, the test split), holding at most the shuffle window of training images and
    one evaluation batch; only labels are read whole. On a worker torch uses the worker's thread
    budget (dask sets ``OMP_NUM_THREADS``).
    """
    from dq_ops.train import train_and_evaluate
    from dq_ops.train_data import ZarrRows

    store = Store(job.store_url, job.storage_options)
    dataset = store.open("datasets", job.dataset)
    split = dataset[QUANTIZED_SPLIT]
    if job.subset is None:
        images = ZarrRows(split["images"])
        labels = np.asarray(split["labels"][:])
    else:
        rows = np.asarray(store.open("subsets", job.subset)["indices"][:])
        images = (ZarrRows(store.open("reconstructions", job.images)["images"]) if job.images is not None
                  else ZarrRows(split["images"], rows))
        labels = np.asarray(split["labels"].get_orthogonal_selection((rows,)))
    test = dataset["test"]
    class_names = dataset.group.attrs.get("class_names")
    result = train_and_evaluate(
        images, labels, ZarrRows(test["images"]), np.asarray(test["labels"][:]),
        model=job.config.architecture, num_classes=len(class_names) if class_names else None,
        config=train_config(job.config), seed=job.seed, progress=progress,
    )
    return dataclasses.asdict(result)


class EvaluateStage(Stage):
    """Train ``config.architecture`` from scratch on a subset (None: the whole split) and test it.

    ``images``: a reconstructions artifact whose ``images`` (one row per subset sample) replace
    the ingested pixels: the ``dq_pixels`` arm, trained on what patch dropping + MAE restore.
    The shuffle window enters the key only for samples more than it holds: below, training
    shuffles exactly and the result does not depend on it (``dq_ops.train_data``).
    With a dask ``client`` the training is one task on a worker (:func:`run_training`); without,
    it runs here. The result (``dq_ops.train.TrainResult`` fields) is stored in
    ``evaluations/<key>``' attributes.
    """

    kind = "evaluations"

    def __init__(
        self, store: Store, dataset: Artifact, subset: Artifact | None, config: EvaluationConfig, seed: int,
        images: Artifact | None = None,
    ):
        if "test" not in dataset.group:
            raise DQInputError(f"{dataset.url} has no 'test' split to evaluate on; ingest one or disable evaluation")
        super().__init__(store)
        self.dataset, self.subset, self.config, self.seed, self.images = dataset, subset, config, seed, images

    def params(self) -> dict[str, Any]:
        c = self.config
        params = {"architecture": c.architecture, "epochs": c.epochs, "min_steps": c.min_steps, "max_steps": c.max_steps, "seed": self.seed}
        images = self.dataset[f"{QUANTIZED_SPLIT}/images"]
        samples = images.shape[0] if self.subset is None else self.subset["indices"].shape[0]
        if samples * int(np.prod(images.shape[1:])) <= c.shuffle_window_mb * 2**20:
            return params  # the window holds them all (decided without importing torch)
        window = train_config(c).window_rows(images.shape[1:])
        return params | ({"shuffle_window_rows": window} if samples > window else {})

    def inputs(self) -> list[Artifact]:
        return [a for a in (self.dataset, self.subset, self.images) if a is not None]

    def compute(self, group: zarr.Group, progress: Progress | None, client: ClientSource) -> None:
        job = TrainJob(self.store.url, self.store.storage_options, self.dataset.name,
                       self.subset.name if self.subset else None, self.images.name if self.images else None,
                       self.config, self.seed)
        name = self.name()
        [result] = run_jobs(client, run_training, [job], key=lambda _: f"dq-train-{name}", progress=progress)
        group.attrs.update(result)


class TextEvaluateStage(Stage):
    """Text evaluation: classifiers fitted on the subset's sentence embeddings, scored on the
    held-out 'test' split (``dq_ops.text_eval``). ``test_accuracy`` is the logistic regression's."""

    kind = "evaluations"

    def __init__(self, store: Store, dataset: Artifact, subset: Artifact | None, embeddings: Artifact, test_embeddings: Artifact):
        if "test" not in dataset.group or split_labels(dataset) is None:
            raise DQInputError(f"{dataset.url}: text evaluation needs labels and a 'test' split (set dataset.test_fraction)")
        super().__init__(store)
        self.dataset, self.subset, self.embeddings, self.test_embeddings = dataset, subset, embeddings, test_embeddings

    def params(self) -> dict[str, Any]:
        return {"evaluation": "text"}

    def inputs(self) -> list[Artifact]:
        return [a for a in (self.dataset, self.embeddings, self.test_embeddings, self.subset) if a is not None]

    def compute(self, group: zarr.Group, progress: Progress | None, client: ClientSource) -> None:
        from dq_ops.text_eval import evaluate_text_subset

        labels = np.asarray(self.dataset[f"{QUANTIZED_SPLIT}/labels"][:])
        rows = np.arange(len(labels)) if self.subset is None else np.asarray(self.subset["indices"][:])
        started = time.perf_counter()
        result = evaluate_text_subset(
            np.asarray(self.embeddings["features"].get_orthogonal_selection((rows, slice(None)))), labels[rows],
            np.asarray(self.test_embeddings["features"][:]), np.asarray(self.dataset["test/labels"][:]),
        )
        group.attrs.update(dataclasses.asdict(result) | {
            "test_accuracy": result.logistic_regression_accuracy, "val_accuracy": None, "n_val": 0,
            "train_seconds": time.perf_counter() - started,
        })
