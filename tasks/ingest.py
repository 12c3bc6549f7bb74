"""Ingest task: read the configured source into ``datasets/<name>``.

Cache key: the dataset settings plus a signature of the source files (paths, sizes, modification
times), so a scheduled re-quantization of a refreshed dataset re-ingests it and everything
downstream, while an unchanged source is served from the cache.
"""

from __future__ import annotations

import hashlib
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from dq_ops.config import DatasetConfig
from dq_ops.ingest import ingest
from dq_ops.store import Store
from dq_ops.urls import filesystem
from tasks.common import ProgressArtifact, StageResult, cached_stage, retry_unless_bad_input


def source_signature(url: str) -> str:
    """sha256 over (path, size, modification time) of every file under ``url``.

    Cheap on any fsspec filesystem (a listing, no reads); any added, removed, resized or
    rewritten file changes it.
    """
    fs, root = filesystem(url)
    paths = fs.find(root, withdirs=False, detail=True) if fs.isdir(root) else {root: fs.info(root)}
    digest = hashlib.sha256()
    for path, info in sorted(paths.items()):
        mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
        digest.update(f"{path}|{info.get('size')}|{mtime}\n".encode())
    return digest.hexdigest()


_stage_key = cached_stage("ingest")


def _ingest_key(context: TaskRunContext, arguments: dict[str, Any]) -> str:
    """The stage key over the dataset settings plus the source's current signature."""
    return _stage_key(context, arguments | {"source": source_signature(arguments["config"].url)})


@task(
    name="ingest",
    task_run_name="ingest-{config.name}",
    cache_key_fn=_ingest_key,
    retries=2,
    retry_condition_fn=retry_unless_bad_input,
    retry_delay_seconds=5,
)
def ingest_dataset(config: DatasetConfig, store_url: str) -> StageResult:
    """Ingest the source and return the dataset artifact with per-split counts."""
    progress = ProgressArtifact(f"Ingesting {config.name} from {config.url}")
    result = ingest(config, Store(store_url), progress=progress)
    return StageResult(
        "datasets",
        result.name,
        store_url,
        result.fingerprint,
        {
            "modality": result.modality,
            "counts": result.counts,
            "class_names": result.class_names,
            "skipped": [str(item) for item in result.skipped],
        },
    )
