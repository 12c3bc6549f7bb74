"""Ingest task: read the configured source into ``datasets/<name>``.

Cache key: the dataset settings plus a signature of the source files (paths, sizes, modification
times) and the store, so a scheduled re-quantization of a refreshed source re-ingests it, while
an unchanged source is served from the cache. A re-ingest whose content did not change finds
the same snapshot, and everything downstream stays cached.
"""

from __future__ import annotations

import hashlib
from typing import Any

from prefect import task

from dq_ops.config import ClusterConfig, DatasetConfig
from dq_ops.ingest import INGEST_VERSION, ingest
from dq_ops.store import Store
from dq_ops.urls import filesystem, is_glob
from tasks.cluster import dask_client
from tasks.common import ProgressArtifact, StageResult, retry_unless_bad_input, source_cache_key


def source_signature(url: str) -> str:
    """sha256 over (path, size, modification time) of every file under ``url``.

    Cheap on any fsspec filesystem (a listing, no reads); any added, removed, resized or
    rewritten file changes it.
    """
    fs, root = filesystem(url)
    if is_glob(root):
        paths = fs.glob(root, detail=True)
    else:
        paths = fs.find(root, withdirs=False, detail=True) if fs.isdir(root) else {root: fs.info(root)}
    digest = hashlib.sha256()
    for path, info in sorted(paths.items()):
        mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
        digest.update(f"{path}|{info.get('size')}|{mtime}\n".encode())
    return digest.hexdigest()


def _ingest_material(config: DatasetConfig, store_url: str, **_: object) -> dict[str, Any]:
    """The dataset settings plus the source's current signature (where it runs is no part of it)."""
    return {"config": config.model_dump(mode="json"), "source": source_signature(config.url), "version": INGEST_VERSION}


@task(
    name="ingest",
    task_run_name="ingest-{config.name}",
    cache_key_fn=source_cache_key("ingest", _ingest_material),
    retries=2,
    retry_condition_fn=retry_unless_bad_input,
    retry_delay_seconds=5,
)
def ingest_dataset(config: DatasetConfig, store_url: str, cluster: ClusterConfig) -> StageResult:
    """Ingest the source and return the dataset snapshot with per-split counts; a sharded source
    is decoded on the cluster's workers (``dq_ops.ingest``)."""
    progress = ProgressArtifact(f"Ingesting {config.name} from {config.url}")
    store = Store(store_url)
    result = ingest(config, store, progress=progress, client=lambda: dask_client(cluster))
    return StageResult.from_artifact(
        store, store.open("datasets", result.name),
        **{
            "modality": result.modality,
            "counts": result.counts,
            "class_names": result.class_names,
            "skipped": [str(item) for item in result.skipped],
            "dataset": result.dataset,
        },
    )
