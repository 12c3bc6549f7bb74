"""What every stage task shares: the result it hands downstream and its cache key.

Tasks pass :class:`StageResult` values (store URL, artifact name, fingerprint and a few small
figures), never arrays: Prefect hashes and persists task inputs and results.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from prefect.context import TaskRunContext
from pydantic import BaseModel

from dq_ops.errors import DQInputError
from dq_ops.store import Artifact, DQStoreError, Store, derive_key
from tasks.offline import set_offline_env  # noqa: F401  (the flow calls it; defined without Prefect imports)


@dataclass(frozen=True)
class StageResult:
    """A stage's output as seen by the flow: where it is, what it is, and small figures."""

    kind: str
    name: str
    store_url: str
    fingerprint: str
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"{self.store_url.rstrip('/')}/{self.kind}/{self.name}"

    def open(self) -> Artifact:
        return Store(self.store_url).open(self.kind, self.name)

    def is_current(self) -> bool:
        """Whether the store still holds this very artifact (same fingerprint)."""
        try:
            return self.open().fingerprint == self.fingerprint
        except DQStoreError:
            return False

    @classmethod
    def from_artifact(cls, store: Store, artifact: Artifact, **summary: Any) -> StageResult:
        return cls(artifact.kind, artifact.name, store.url, artifact.fingerprint, dict(summary))


def _key_material(value: Any) -> Any:
    """What of an argument enters a cache key: fingerprints for artifacts, data for settings."""
    if isinstance(value, StageResult):
        return value.fingerprint
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_key_material(v) for v in value]
    if isinstance(value, dict):
        return {k: _key_material(v) for k, v in value.items()}
    return value


def stage_key(stage: str, arguments: dict[str, Any]) -> str:
    """A stage's cache key: hash of its settings and the fingerprints of its input artifacts.

    Arguments that only say where or how to run (``store_url``, ``cluster``) are left out, so a
    store moved to another URL or a different cluster still hits the cache.
    """
    material = {k: _key_material(v) for k, v in sorted(arguments.items()) if k not in ("cluster", "store_url")}
    return f"{stage}-{derive_key(stage, material)}"


def cached_stage(stage: str):
    """A Prefect ``cache_key_fn`` for a stage task returning a :class:`StageResult`.

    When the artifact a cached result points to was deleted or replaced in the store since, the
    key gets a one-off suffix so that the task runs again instead of returning a stale result.
    """

    def key_fn(context: TaskRunContext, arguments: dict[str, Any]) -> str:
        key = stage_key(stage, arguments)
        result_store = getattr(context, "result_store", None)
        if result_store is not None and result_store.exists(key):
            cached = result_store.read(key).result
            if isinstance(cached, StageResult) and not cached.is_current():
                return f"{key}-rebuild-{uuid.uuid4().hex[:8]}"
        return key

    return key_fn


class ProgressArtifact:
    """Progress of one stage: a Prefect progress artifact, and a bar on an interactive terminal.

    Fed by a dq_ops ``progress(done, total)`` callback. Artifact updates are throttled to
    whole-percent steps: each one is an API call.
    """

    def __init__(self, description: str):
        from prefect.artifacts import create_progress_artifact
        from tqdm import tqdm

        self._id = create_progress_artifact(0.0, description=description)
        self._last = 0
        self._bar = tqdm(desc=description, disable=None, leave=False)  # disable=None: off unless a TTY

    def __call__(self, done: int, total: int) -> None:
        from prefect.artifacts import update_progress_artifact

        self._bar.total = total
        self._bar.update(done - self._bar.n)
        percent = int(100 * done / max(total, 1))
        if percent > self._last:
            self._last = percent
            update_progress_artifact(self._id, float(percent))
        if done >= total:
            self._bar.close()


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry crashes and I/O hiccups, never bad input (it would only
    fail the same way again, after the retry delays)."""
    return not isinstance(state.data, DQInputError)
