"""Ingest task: read the configured source into ``datasets/<name>`` (``dq_ops.ingest.IngestStage``).

The stage's key is the dataset settings plus a signature of the source files (paths, sizes,
modification times), so a scheduled re-quantization of a refreshed source re-ingests it, while an
unchanged source is neither read nor re-written. A re-ingest whose content did not change finds
the same snapshot, and everything downstream stays cached.
"""

from __future__ import annotations

from prefect import get_run_logger

from dq_ops.config import ClusterConfig, DatasetConfig
from dq_ops.ingest import IngestStage, snapshot_summary
from dq_ops.store import Store
from tasks.cluster import cluster_client
from tasks.common import ProgressArtifact, StageResult, stage_task

# Bad items named one by one in the task's log; the rest are counted.
SKIPPED_LOGGED = 5


def _stage(config: DatasetConfig, store_url: str, **_: object) -> IngestStage:
    return IngestStage(Store(store_url), config)


@stage_task("ingest", "ingest-{config.name}", _stage, retries=2, retry_delay_seconds=5)
def ingest_dataset(config: DatasetConfig, store_url: str, cluster: ClusterConfig) -> StageResult:
    """The dataset snapshot of the source as it is now, with per-split counts; a sharded source
    is decoded on the cluster's workers (``dq_ops.ingest``)."""
    stage = _stage(config, store_url)
    progress = ProgressArtifact(f"Ingesting {config.name} from {config.url}")
    snapshot = stage.run(progress=progress, client=cluster_client(cluster))
    for split, reuse in stage.shards.items():
        get_run_logger().info("%s: %s", split, reuse)
    if stage.skipped:
        shown = "; ".join(str(item) for item in stage.skipped[:SKIPPED_LOGGED])
        more = f" and {len(stage.skipped) - SKIPPED_LOGGED} more" if len(stage.skipped) > SKIPPED_LOGGED else ""
        get_run_logger().warning("%d bad items skipped: %s%s", len(stage.skipped), shown, more)
    return StageResult.from_artifact(stage.store, snapshot, **snapshot_summary(snapshot), dataset=config.name)
