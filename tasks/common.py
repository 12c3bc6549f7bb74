"""What every stage task shares: the result it hands downstream and its cache key.

Cache keys come from the stages themselves (:func:`stage_cache_key`): the store is the one
source of truth, Prefect's cache only remembers where the store's answer is.

Tasks pass :class:`StageResult` values (store URL, artifact name, fingerprint and a few small
figures), never arrays: Prefect hashes and persists task inputs and results.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext
from prefect.runtime import flow_run

from dq_ops.errors import FULL_ERRNOS, REFUSED_ERRNOS, DQInputError
from dq_ops.stage import Stage
from dq_ops.store import Artifact, Store
from dq_ops.urls import redact_credentials
from tasks.offline import set_offline_env  # noqa: F401  (the flow calls it; defined without Prefect imports)
from tasks.progress import stage_advanced, stage_started


@dataclass(frozen=True)
class StageResult:
    """A stage's output as seen by the flow: where it is, what it is, and small figures.

    ``computed_in`` is the flow run that computed it; a result served from Prefect's cache keeps
    the id of the run that made it, which tells the flow what this run actually did.
    """

    kind: str
    name: str
    store_url: str
    fingerprint: str
    summary: dict[str, Any] = field(default_factory=dict)
    computed_in: str | None = None

    @property
    def url(self) -> str:
        return f"{self.store_url.rstrip('/')}/{self.kind}/{self.name}"

    def open(self) -> Artifact:
        return Store(self.store_url).open(self.kind, self.name)

    def computed_now(self) -> bool:
        """Whether the current flow run computed this result (rather than a cache hit)."""
        return self.computed_in is not None and self.computed_in == str(flow_run.get_id())

    @classmethod
    def from_artifact(cls, store: Store, artifact: Artifact, **summary: Any) -> StageResult:
        return cls(artifact.kind, artifact.name, store.url, artifact.fingerprint, dict(summary), str(flow_run.get_id()))


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """A ``retry_condition_fn``: retries are for transient faults (a lost worker, a flaky object
    store); bad input (:class:`~dq_ops.errors.DQInputError`) and a full disk or a write refused
    (read-only, permission denied) fail at once, a retry cannot fix them."""
    try:
        state.result()
    except DQInputError:
        return False
    except OSError as exc:
        return exc.errno not in FULL_ERRNOS + REFUSED_ERRNOS
    except Exception:
        return True
    return True


def store_identity(url: str) -> str:
    """A store's URL as every run of it names it: a local path absolute (links resolved), no password."""
    if "://" not in url or url.startswith("file://"):
        return str(Path(url.removeprefix("file://")).resolve())
    return redact_credentials(url.rstrip("/"))


def store_tag(url: str) -> str:
    """8 hex digits naming a store (:func:`store_identity`): part of every cache key, so the same
    stage against another store is computed there, never served from the first one."""
    return hashlib.sha256(store_identity(url).encode()).hexdigest()[:8]


def served_only_if(context: TaskRunContext, key: str, still_done: Callable[[Any], bool]) -> str:
    """``key``, unless the result cached under it is not what the store finds done
    (``still_done(cached result)`` is false: its artifact deleted, damaged or replaced; for
    ingest, the dataset's latest snapshot read from another source state): then a one-off key,
    so the task runs again. The store decides, the cache follows."""
    result_store = getattr(context, "result_store", None)
    if result_store is not None and result_store.exists(key) and not still_done(result_store.read(key).result):
        return f"{key}-rebuild-{uuid.uuid4().hex[:8]}"
    return key


def started(context: TaskRunContext) -> None:
    """Every task run computes its cache key first, cached or not: the moment a stage starts."""
    stage_started(str(context.task_run.id), context.task_run.name)


def stage_cache_key(build: Callable[..., Stage]) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    """A Prefect ``cache_key_fn`` for a stage task: ``<kind>-<stage name>-<store tag>``.

    ``build(**task_arguments)`` makes the task's :class:`~dq_ops.stage.Stage`; its name already
    covers the stage version, the result-changing settings and the input fingerprints, so
    Prefect's cache and the store agree on what is done.
    """

    def key_fn(context: TaskRunContext, arguments: dict[str, Any]) -> str:
        started(context)
        stage = build(**arguments)
        name = stage.name()

        def still_done(cached: Any) -> bool:
            done = stage.stored(name)
            return not isinstance(cached, StageResult) or (done is not None and done.fingerprint == cached.fingerprint)

        return served_only_if(context, f"{stage.kind}-{name}-{store_tag(stage.store.url)}", still_done)

    return key_fn


def stage_task(name: str, task_run_name: str | Callable[[], str], build: Callable[..., Stage], *, retries: int = 1,
               **options: Any) -> Callable[[Callable[..., StageResult]], Any]:
    """The Prefect task decorator of a stage: its cache key from ``build`` (:func:`stage_cache_key`)
    and retries for transient faults only (:func:`retry_unless_bad_input`)."""
    return task(name=name, task_run_name=task_run_name, cache_key_fn=stage_cache_key(build), retries=retries,
                retry_condition_fn=retry_unless_bad_input, **options)


class ProgressArtifact:
    """Progress of one stage task: a Prefect progress artifact, and a :func:`~tasks.progress.stage_advanced`
    event for the ``dq`` terminal's bar.

    Fed by a dq_ops ``progress(done, total)`` callback (from the task's thread, or from the dask
    client's thread for work reported by a worker). Each artifact update is an API call, so
    updates are throttled to whole-percent steps at most once per :attr:`interval_s`, plus the
    final 100%: a stage reporting every small batch would otherwise spend more time on its
    progress than on its work. The terminal throttles its own.
    """

    interval_s = 1.0

    def __init__(self, description: str):
        from prefect.artifacts import create_progress_artifact

        run = TaskRunContext.get().task_run  # made in a task's body
        self._run, self._name = str(run.id), run.name
        self._id = create_progress_artifact(0.0, description=description)
        self._last = 0
        self._last_at = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        from prefect.artifacts import update_progress_artifact

        stage_advanced(self._run, self._name, done, total)
        percent = int(100 * done / max(total, 1))
        now = time.monotonic()
        if percent > self._last and (percent >= 100 or now - self._last_at >= self.interval_s):
            self._last, self._last_at = percent, now
            update_progress_artifact(self._id, float(percent))
