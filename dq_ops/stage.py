"""The one shape every pipeline step has: key → already stored? → compute → commit.

A :class:`Stage` turns input artifacts into one output artifact. It declares

* ``kind``: the artifact kind it writes (``dq_ops.store.ARTIFACT_KINDS``);
* ``version``: bumped whenever its algorithm changes what it writes, so upgrading dq recomputes
  exactly the stages whose results changed;
* :meth:`params`: the settings that change its result, with files named by path (backbone
  weights, checkpoints) entering by content digest. Settings that change only speed or
  placement (batch sizes, memory budgets, clusters, worker counts) stay out;
* :meth:`inputs`: the artifacts it reads (their fingerprints enter the key);
* :meth:`compute`: fill a staging group.

Its key is ``name = derive_key(kind, {"stage_version": version, **params}, input fingerprints)``,
which names the output artifact; :meth:`run` returns the stored artifact when the store already
holds it. The store is the one source of truth: Prefect's cache key for a stage task is this same
name plus the store's URL (``tasks.common``), and a cached result is only served while the store
still holds the very artifact it names.

A :class:`ChunkedStage` is a stage whose work splits into row chunks run by dask workers (or
inline without a client): each chunk job reads its rows through URLs, writes its rows into a
resumable staging group and marks ``done[chunk]`` last, so a killed run resumes where it stopped.
This is datatrove's pipeline step with completion markers, applied to Zarr chunks.

Every stage runs its work the same way, through :func:`run_jobs`: a list of picklable jobs, run
on the dask cluster when there is one and in this process otherwise, with the same progress,
error and cancellation rules everywhere. A job is a frozen dataclass that names artifacts by
store URL and name (row indices at most, never pixels or features); the function it runs is a
module-level function beside its stage, or in the stage module's ``*_work`` companion when it
needs model libraries (``dq_ops.pixel_work``), named there by ``"module:function"`` so that
the stage module never imports it.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import numpy as np
import zarr

from dq_ops.progress import Progress
from dq_ops.store import Artifact, DQDamagedError, DQStoreError, Store, derive_key, open_zarr_store

if TYPE_CHECKING:  # distributed is slow to import: only where a cluster runs
    from distributed import Client

    # A dask client, or a function that starts one: stages call it only when they have cluster work.
    ClientSource = Client | Callable[[], Client] | None

log = logging.getLogger(__name__)

Job = TypeVar("Job")
Result = TypeVar("Result")
REPORT_INTERVAL_S = 1.0  # a worker's progress reaches the client at most this often (and once at the end)


def resolve_client(client: ClientSource) -> Client | None:
    """The client itself, or the one ``client()`` starts (a cluster is started only when needed)."""
    return client() if callable(client) else client


def is_running(client: ClientSource) -> bool:
    """Whether ``client`` is a client (a cluster already runs) rather than a way to start one."""
    return client is not None and not callable(client)


class Stage(ABC):
    """One pipeline step writing ``kind/<name>``; see the module docstring."""

    kind: ClassVar[str]
    version: ClassVar[int] = 1

    def __init__(self, store: Store):
        self.store = store

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Settings that change the result (JSON-serialisable)."""

    @abstractmethod
    def inputs(self) -> list[Artifact]:
        """Artifacts the stage reads; their fingerprints enter its key."""

    @abstractmethod
    def compute(self, group: zarr.Group, progress: Progress | None, client: ClientSource) -> None:
        """Write the result into ``group`` (a fresh staging group); start ``client`` only for cluster work."""

    def key_params(self) -> dict[str, Any]:
        return {"stage_version": self.version, **self.params()}

    def input_fingerprints(self) -> list[str]:
        return [artifact.fingerprint for artifact in self.inputs()]

    def name(self) -> str:
        """The output artifact's name: a hash of version, parameters and input fingerprints."""
        return derive_key(self.kind, self.key_params(), self.input_fingerprints())

    def stored(self, name: str | None = None) -> Artifact | None:
        """The stage's result when the store holds it complete and intact, else None: the one
        answer to "is this stage done?" (Prefect's cache serves a result only while it agrees).
        ``name``: :meth:`name`, when the caller has it already."""
        try:
            return self.store.open(self.kind, name or self.name())
        except DQStoreError:  # absent, incomplete or damaged: computed (again)
            return None

    def run(self, *, progress: Progress | None = None, client: ClientSource = None) -> Artifact:
        """The stored result, computed and committed first if the store lacks it.

        Two runs computing the same artifact at once: the second waits for the first's stage
        lock, then finds the artifact stored (``Store.lock``).
        """
        name = self.name()
        stored = self.stored(name)
        if stored is not None:
            return stored
        with self.store.writing(), self.store.lock("stage", self.kind, name):
            if not self._stored_intact(name):
                params, inputs = self.key_params(), self.input_fingerprints()
                # damage met in an input names it (Store.reading)
                with self.store.reading(self.inputs), self.store.write(self.kind, name, params, inputs) as group:
                    self.compute(group, progress, client)
        return self.store.open(self.kind, name)

    def _stored_intact(self, name: str) -> bool:
        """Whether the store holds this stage's artifact intact; a damaged one is recomputed (and
        replaced when the new one is published), with one log line saying so."""
        try:
            self.store.open(self.kind, name)
        except DQDamagedError as exc:
            log.warning("%s is damaged (%s): recomputing it", exc.url, exc.problem)
            return False
        except DQStoreError:
            return False
        return True


class ChunkJob(Protocol):
    """What every chunk job carries besides its own inputs: where to write and which rows."""

    staging_url: str
    storage_options: dict[str, Any]
    index: int
    start: int
    stop: int


def run_jobs(
    client: ClientSource,
    function: Callable[..., Result] | str,
    jobs: Sequence[Job],
    *,
    shared: tuple[Any, ...] = (),
    on_done: Callable[[Result], None] | None = None,
    key: Callable[[Job], str] | None = None,
    threads: int = 1,
    progress: Progress | None = None,
) -> list[Result]:
    """``function(job, *shared)`` for every job; the results, in job order. The one way a stage runs its work.

    * Where: on the workers of ``client`` (a running client, or a function that starts one,
      called only when there are jobs); without one, in this process, one job after the other,
      or on up to ``threads`` threads for work that releases the GIL.
    * ``function``: a module-level function, or ``"module:function"``, imported where the job
      runs, so the caller need not import the work's libraries (finding an artifact done never
      loads torch).
    * ``shared``: further arguments, the same for every job (e.g. data scattered to the workers once).
    * ``on_done(result)``: after each job, in the order they finish, in this thread (progress).
    * ``key(job)``: the stem of the job's dask task key; a fresh token follows it on every call,
      so a rerun never meets its cancelled predecessors. Default: a random key.
    * ``progress``: for one job that reports its own ``progress(done, total)`` (a training), called
      as ``function(job, *shared, progress)``. On a worker each report is a dask event, and this
      thread, waiting for the result, hands the latest one to ``progress`` about once per
      :data:`REPORT_INTERVAL_S`.

    A failed job cancels the jobs after it in job order (those not started never start); those
    before it run on, so the error raised, as the job raised it, is the one running the jobs in
    order would have met first. An interruption (an error from ``on_done``, Ctrl-C) cancels every
    job not started. What finished jobs wrote stays (a resumable stage picks it up on a rerun).
    """
    if progress is not None and len(jobs) != 1:
        raise ValueError("a job reports its own progress only when it runs alone")
    cluster = resolve_client(client) if jobs else None
    if cluster is not None:
        return _run_on_cluster(cluster, function, jobs, shared, on_done, key, progress)
    run = _imported(function)
    if threads > 1 and len(jobs) > 1:
        pool = ThreadPoolExecutor(min(threads, len(jobs)))
        try:
            futures = [pool.submit(run, job, *shared) for job in jobs]

            def cancel(pending: list[Future]) -> None:
                for future in pending:
                    future.cancel()

            return _collect(futures, as_completed(futures), lambda future: future.exception() is not None, cancel, on_done)
        finally:
            pool.shutdown(cancel_futures=True)  # jobs not started yet never start (as on the cluster)
    results = []
    for job in jobs:
        results.append(run(job, *shared) if progress is None else run(job, *shared, progress))
        if on_done is not None:
            on_done(results[-1])
    return results


def _run_on_cluster(cluster: Client, function: Callable[..., Result] | str, jobs: Sequence[Job], shared: tuple[Any, ...],
                    on_done: Callable[[Result], None] | None, key: Callable[[Job], str] | None,
                    progress: Progress | None) -> list[Result]:
    """:func:`run_jobs` on ``cluster``'s workers."""
    import distributed

    token = uuid.uuid4().hex[:8]
    keys = [None if key is None else f"{key(job)}-{token}" for job in jobs]
    topic = None if progress is None else f"{keys[0] or f'dq-{token}'}-progress"
    latest: list[list[int]] = []
    if topic is not None:
        cluster.subscribe_topic(topic, lambda event: latest.append(event[1]))  # called on the client's event loop
    futures: list[distributed.Future] = []
    try:
        futures = [cluster.submit(_run_job, function, topic, job, *shared, key=job_key, pure=False)
                   for job, job_key in zip(jobs, keys)]
        while progress is not None:
            try:
                distributed.wait(futures, timeout=REPORT_INTERVAL_S)  # never raises the job's own error: result() does
                break
            except TimeoutError:
                if latest:
                    progress(*latest[-1])
        return _collect(futures, distributed.as_completed(futures), lambda future: future.status == "error",
                        cluster.cancel, on_done)
    finally:
        cluster.cancel([future for future in futures if not future.done()])  # interrupted: nothing left running
        if topic is not None:
            cluster.unsubscribe_topic(topic)


def _collect(futures: list[Any], finished: Iterable[Any], failed: Callable[[Any], bool],
             cancel: Callable[[list[Any]], Any], on_done: Callable[[Any], None] | None) -> list[Any]:
    """The results of ``futures`` (thread or dask futures) in order, ``finished`` yielding each as
    it completes; the error rule of :func:`run_jobs`."""
    position = {id(future): k for k, future in enumerate(futures)}
    first_failed = len(futures)
    for future in finished:
        k = position[id(future)]
        if k > first_failed or future.cancelled():
            continue
        if failed(future):
            first_failed = k
            cancel([f for f in futures[k + 1:] if not f.done()])
        elif on_done is not None:
            on_done(future.result())
    if first_failed < len(futures):
        futures[first_failed].result()  # re-raises the job's own exception (a worker's, with its traceback)
    return [future.result() for future in futures]


def _imported(function: Callable[..., Result] | str) -> Callable[..., Result]:
    """``function``, or the function a ``"module:function"`` string names, imported here."""
    if callable(function):
        return function
    module, name = function.split(":")
    return getattr(importlib.import_module(module), name)


def _run_job(function: Callable[..., Result] | str, topic: str | None, job: Any, *shared: Any) -> Result:
    """Worker side of :func:`run_jobs`: ``function(job, *shared)``, or with a ``topic``
    ``function(job, *shared, progress)`` whose reports go out as dask events."""
    run = _imported(function)
    if topic is None:
        return run(job, *shared)
    from distributed import get_worker

    worker, last = get_worker(), [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - last[0] >= REPORT_INTERVAL_S:
            last[0] = now
            worker.log_event(topic, [int(done), int(total)])

    return run(job, *shared, progress)


def run_chunk(job: ChunkJob, worker: str) -> int:
    """Worker side of a chunk job: run it with the function ``worker`` names, then mark it done
    (last, so a done chunk is complete)."""
    count = _imported(worker)(job)
    zarr.open_group(open_zarr_store(job.staging_url, job.storage_options), mode="r+")["done"][job.index] = True
    return count


class _CopiesStopped(Exception):
    """Raised in the copies running beside a cluster's jobs once those failed (ChunkedStage)."""


class ChunkedStage(Stage):
    """A stage computed as independent row chunks on dask workers, resumable chunk by chunk.

    Subclasses define the staging layout (:meth:`create_layout`, :meth:`layout_matches`), the
    number of rows and rows per chunk, one picklable job per chunk (:meth:`job`) and the module-
    level function that runs a job (:attr:`worker`, returning a count, e.g. rows computed). The
    function is named by import path and imported where it runs, so a stage module need not
    import its model libraries: finding an artifact done never loads torch. Every job runs
    through :func:`run_jobs`; those a stage keeps in the calling process (:meth:`inline`, which
    only plans; :meth:`prepare_inline` does their shared work) run there, on threads when they
    only move bytes (:meth:`moves_bytes_only`); those it copies together (:meth:`copy_ahead`) run
    while the cluster runs the others. After a run, ``chunks_resumed`` / ``chunks_total`` say how much
    an earlier run had done and ``work_done`` sums what the workers returned.
    """

    worker: ClassVar[str]  # "module:function" taking a job, returning a count
    chunks_resumed: int = 0
    chunks_total: int = 0
    work_done: int = 0

    @abstractmethod
    def num_rows(self) -> int: ...

    @abstractmethod
    def chunk_rows(self) -> int: ...

    @abstractmethod
    def create_layout(self, group: zarr.Group) -> None:
        """Create the output arrays (rows filled by chunk jobs)."""

    @abstractmethod
    def layout_matches(self, group: zarr.Group) -> bool:
        """Whether a staging group left by an earlier run has this run's layout."""

    @abstractmethod
    def job(self, staging_url: str, index: int, start: int, stop: int) -> ChunkJob: ...

    def finalize(self, group: zarr.Group) -> None:
        """Called once every chunk is written, before the commit (e.g. summary attributes)."""

    def inline(self, jobs: list[ChunkJob], cluster_running: bool) -> tuple[list[ChunkJob], list[ChunkJob]]:
        """Split the pending jobs into those to run in this process (cheap ones, which spare a
        cluster start; the stage may hand them precomputed inputs) and those for the cluster.
        ``cluster_running``: whether the caller handed a running client rather than a way to
        start one. Default: everything on the cluster."""
        return [], jobs

    def prepare_inline(self, jobs: list[ChunkJob]) -> list[ChunkJob]:
        """Work the jobs kept in this process share, done once before they run (e.g. one batched
        model pass over rows scattered across their chunks); returns the jobs to run. Default:
        the jobs as they are."""
        return jobs

    def copy_ahead(self, jobs: list[ChunkJob], on_done: Callable[[int], None]) -> list[ChunkJob]:
        """Of the jobs kept in this process, those this stage can finish together, sharing what
        each job would open or request on its own (e.g. chunks taken as stored bytes from an
        earlier artifact), on a thread of its own while the cluster runs the other jobs (before
        the rest without one); calls ``on_done`` with each one's count and returns the ones done,
        which are then marked done at once. Default: none."""
        return []

    def moves_bytes_only(self, job: ChunkJob) -> bool:
        """Whether a job run in this process only copies or writes rows (no model): such jobs run
        on threads, since decoding, encoding and file writes release the GIL; the others run one
        at a time, each free to use every core. Default: False."""
        return False

    def compute(self, group: zarr.Group, progress: Progress | None, client: Any) -> None:
        raise NotImplementedError("a ChunkedStage computes through run()")

    def run(self, *, progress: Progress | None = None, client: ClientSource = None) -> Artifact:
        """As :meth:`Stage.run`; the stage lock also keeps a second run out of the resumable
        staging group while the first writes it (it waits, then finds the artifact stored)."""
        name = self.name()
        stored = self.stored(name)
        if stored is not None:
            return stored
        # a worker's write error comes back here (pickled with its errno): disk full names the store
        with self.store.writing(), self.store.lock("stage", self.kind, name):
            if self._stored_intact(name):
                return self.store.open(self.kind, name)
            with self.store.reading(self.inputs):  # damage met in an input names it
                return self._run_chunks(name, progress, client)

    def _run_chunks(self, name: str, progress: Progress | None, client: ClientSource) -> Artifact:
        n, chunk_rows = self.num_rows(), self.chunk_rows()
        n_chunks = -(-n // chunk_rows)
        group, url = self.store.resumable(self.kind, name)
        done_array = group.get("done")
        if done_array is None or done_array.shape != (n_chunks,) or not self.layout_matches(group):
            # Nothing usable from an earlier run (none, another layout, an interrupted commit).
            self.store.discard_resumable(self.kind, name)
            group, url = self.store.resumable(self.kind, name)
            self.create_layout(group)
            group.create_array("done", shape=(n_chunks,), dtype=bool, chunks=(1,), fill_value=False)
        done = np.asarray(group["done"][:])
        self.chunks_total, self.chunks_resumed = n_chunks, int(done.sum())
        finished = self.chunks_resumed
        if progress is not None:
            progress(finished, n_chunks)
        jobs = [self.job(url, k, k * chunk_rows, min(n, (k + 1) * chunk_rows)) for k in np.flatnonzero(~done).tolist()]
        self.work_done = 0
        here, remote = self.inline(jobs, cluster_running=is_running(client))
        counting, stopped = threading.Lock(), threading.Event()

        def ran(count: int) -> None:
            nonlocal finished
            if stopped.is_set():  # the cluster's jobs failed or were interrupted: the copies stop too
                raise _CopiesStopped
            with counting:
                self.work_done += count
                finished += 1
                if progress is not None:
                    progress(finished, n_chunks)

        cluster = resolve_client(client) if remote else None
        # The copies only move bytes in this process: with a cluster, beside its jobs.
        with ThreadPoolExecutor(1) as beside:
            copying = beside.submit(self.copy_ahead, here, ran) if cluster is not None else None
            try:
                run_jobs(cluster, run_chunk, remote if cluster is not None else [], shared=(self.worker,), on_done=ran,
                         key=lambda job: f"dq-{self.kind}-{name}-{job.index}")
            except BaseException:
                stopped.set()
                raise
            copied = copying.result() if copying is not None else self.copy_ahead(here, ran)
        if copied:
            group["done"].set_orthogonal_selection((np.array([job.index for job in copied]),), True)
            done_ahead = {job.index for job in copied}
            here = [job for job in here if job.index not in done_ahead]
        here = self.prepare_inline(here) if here else here
        if cluster is None:  # no cluster: everything runs here
            here = here + remote
        threaded = [job for job in here if self.moves_bytes_only(job)]
        run_jobs(None, run_chunk, threaded, shared=(self.worker,), on_done=ran, threads=len(os.sched_getaffinity(0)))
        run_jobs(None, run_chunk, [job for job in here if not self.moves_bytes_only(job)], shared=(self.worker,), on_done=ran)
        group = self.store.resumable(self.kind, name)[0]
        self.finalize(group)
        del group["done"]
        return self.store.commit_resumable(self.kind, name, self.key_params(), self.input_fingerprints())
