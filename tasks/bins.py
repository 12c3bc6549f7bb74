"""Bin generation task: GraphCut bins of the quantized split, classes fanned out over dask."""

from __future__ import annotations

from prefect import task

from dq_ops.config import BinsConfig, ClusterConfig
from dq_ops.stages import generate_bins_stage
from dq_ops.store import Store
from tasks.cluster import dask_client
from tasks.common import ProgressArtifact, StageResult, cached_stage, retry_unless_bad_input


@task(name="bins", task_run_name="bins-{params.num_bins}-{params.kernel}", cache_key_fn=cached_stage("bins"), retries=1, retry_condition_fn=retry_unless_bad_input)
def generate_bins_task(
    store_url: str,
    dataset: StageResult,
    embeddings: StageResult,
    params: BinsConfig,
    cluster: ClusterConfig | None = None,
) -> StageResult:
    """Bins over the embeddings; with a cluster configured, one dask task per class."""
    store = Store(store_url)
    artifact = generate_bins_stage(
        store, dataset.open(), embeddings.open(), params,
        client=dask_client(cluster) if cluster is not None else None,
        progress=ProgressArtifact(f"GraphCut bins ({params.num_bins}) per class"),
    )
    sizes = artifact.group.attrs["bin_sizes"]
    return StageResult.from_artifact(store, artifact, bin_sizes=sizes, classes=artifact.group.attrs["classes"])
