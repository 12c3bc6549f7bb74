"""Bin generation task: GraphCut bins of the quantized split, classes fanned out over dask."""

from __future__ import annotations

from dq_ops.config import BinsConfig, ClusterConfig
from dq_ops.stages import BinsStage
from dq_ops.store import Store
from tasks.cluster import cluster_client
from tasks.common import ProgressArtifact, StageResult, stage_task


def _stage(store_url: str, dataset: StageResult, embeddings: StageResult, params: BinsConfig, **_: object) -> BinsStage:
    return BinsStage(Store(store_url), dataset.open(), embeddings.open(), params)


@stage_task("bins", "bins-{params.num_bins}-{params.kernel}", _stage)
def generate_bins_task(
    store_url: str,
    dataset: StageResult,
    embeddings: StageResult,
    params: BinsConfig,
    cluster: ClusterConfig | None = None,
) -> StageResult:
    """Bins over the embeddings; with a cluster configured, one dask task per class. Classes
    whose members did not change since an earlier run take their earlier bins."""
    stage = _stage(store_url, dataset, embeddings, params)
    artifact = stage.run(
        client=cluster_client(cluster),
        progress=ProgressArtifact(f"GraphCut bins ({params.num_bins}) per class"),
    )
    attrs = artifact.group.attrs
    return StageResult.from_artifact(
        stage.store, artifact, bin_sizes=attrs["bin_sizes"], classes=attrs["classes"], classes_rebinned=stage.classes_rebinned
    )
