"""Pixel-quantization tasks: patch dropping, the MAE, reconstruction, all on dask workers."""

from __future__ import annotations

from prefect import get_run_logger

from dq_ops.config import ClusterConfig, EmbeddingConfig, PatchConfig
from dq_ops.pixels import DropPatchesStage, MAEStage, ReconstructStage
from dq_ops.stage import ChunkedStage
from dq_ops.store import Store
from tasks.cluster import cluster_client
from tasks.common import ProgressArtifact, StageResult, stage_task


def _drop(store_url: str, dataset: StageResult, subset: StageResult, params: PatchConfig, embedding: EmbeddingConfig,
          **_: object) -> DropPatchesStage:
    return DropPatchesStage(Store(store_url), dataset.open(), subset.open(), params, embedding)


def _mae(store_url: str, dataset: StageResult, params: PatchConfig, seed: int, **_: object) -> MAEStage:
    return MAEStage(Store(store_url), dataset.open(), params, seed)


def _reconstruct(store_url: str, dataset: StageResult, patches: StageResult, mae: StageResult, **_: object) -> ReconstructStage:
    return ReconstructStage(Store(store_url), dataset.open(), patches.open(), mae.open())


def _log_resumed(stage: ChunkedStage) -> None:
    if stage.chunks_resumed:
        get_run_logger().info("resumed: %d of %d chunks already done", stage.chunks_resumed, stage.chunks_total)


@stage_task("patches", "drop-patches-{subset.name}", _drop)
def drop_patches(
    store_url: str, dataset: StageResult, subset: StageResult, params: PatchConfig, embedding: EmbeddingConfig,
    cluster: ClusterConfig,
) -> StageResult:
    """Keep the top 1 − θ patches of every subset image by Grad-CAM++; store only those.

    Chunked over the workers; a retry or a rerun after a crash resumes from the chunks already written.
    """
    stage = _drop(store_url, dataset, subset, params, embedding)
    artifact = stage.run(client=cluster_client(cluster),
                         progress=ProgressArtifact(f"Grad-CAM++ patch scores for {subset.summary.get('size')} images"))
    _log_resumed(stage)
    return StageResult.from_artifact(stage.store, artifact, **dict(artifact.group.attrs))


@stage_task("mae", "mae-{dataset.name}", _mae)
def prepare_mae(store_url: str, dataset: StageResult, params: PatchConfig, seed: int, cluster: ClusterConfig) -> StageResult:
    """Train the dataset's MAE as one task on a worker (or take the configured checkpoint) and keep it in the store."""
    stage = _mae(store_url, dataset, params, seed)
    artifact = stage.run(client=cluster_client(cluster), progress=ProgressArtifact("Training the MAE on a dask worker"))
    history = artifact["loss_history"][:]
    return StageResult.from_artifact(
        stage.store, artifact,
        first_loss=float(history[0]) if len(history) else None,
        final_loss=float(history[-10:].mean()) if len(history) else None,
    )


@stage_task("reconstruct", "reconstruct-{patches.name}", _reconstruct)
def reconstruct_patches(
    store_url: str, dataset: StageResult, patches: StageResult, mae: StageResult, cluster: ClusterConfig
) -> StageResult:
    """Restore every dropped patch with the MAE, chunk by chunk on the workers; kept pixels stay bit-exact."""
    stage = _reconstruct(store_url, dataset, patches, mae)
    artifact = stage.run(client=cluster_client(cluster), progress=ProgressArtifact(f"MAE reconstruction of {patches.name}"))
    _log_resumed(stage)
    return StageResult.from_artifact(stage.store, artifact, **dict(artifact.group.attrs))
