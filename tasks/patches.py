"""Pixel-quantization tasks: patch dropping, the MAE, reconstruction, all on dask workers."""

from __future__ import annotations

from prefect import get_run_logger, task

from dq_ops.config import ClusterConfig, EmbeddingConfig, PatchConfig
from dq_ops.pixels import ChunkedResult, drop_patches_stage, mae_stage, reconstruct_stage
from dq_ops.store import Store
from tasks.cluster import dask_client
from tasks.common import ProgressArtifact, StageResult, cached_stage


def _log_resumed(result: ChunkedResult) -> None:
    if result.resumed_note:
        get_run_logger().info("%s: %s", result.artifact.url, result.resumed_note)


@task(name="patches", task_run_name="drop-patches-{subset.name}", cache_key_fn=cached_stage("patches"), retries=1)
def drop_patches(
    store_url: str, dataset: StageResult, subset: StageResult, params: PatchConfig, embedding: EmbeddingConfig,
    cluster: ClusterConfig,
) -> StageResult:
    """Keep the top 1 − θ patches of every subset image by Grad-CAM++; store only those.

    Chunked over the workers; a retry or a rerun after a crash resumes from the chunks already written.
    """
    store = Store(store_url)
    result = drop_patches_stage(
        store, dataset.open(), subset.open(), params, embedding, dask_client(cluster),
        chunk_rows=params.chunk_rows,
        progress=ProgressArtifact(f"Grad-CAM++ patch scores for {subset.summary.get('size')} images"),
    )
    _log_resumed(result)
    return StageResult.from_artifact(store, result.artifact, **dict(result.artifact.group.attrs))


@task(name="mae", task_run_name="mae-{dataset.name}", cache_key_fn=cached_stage("mae"), retries=1)
def prepare_mae(store_url: str, dataset: StageResult, params: PatchConfig, seed: int, cluster: ClusterConfig) -> StageResult:
    """Train the dataset's MAE on a worker (or take the configured checkpoint) and keep it in the store."""
    store = Store(store_url)
    artifact = mae_stage(store, dataset.open(), params, seed, dask_client(cluster))
    history = artifact["loss_history"][:]
    return StageResult.from_artifact(
        store, artifact,
        first_loss=float(history[0]) if len(history) else None,
        final_loss=float(history[-10:].mean()) if len(history) else None,
    )


@task(name="reconstruct", task_run_name="reconstruct-{patches.name}", cache_key_fn=cached_stage("reconstruct"), retries=1)
def reconstruct_patches(
    store_url: str, dataset: StageResult, patches: StageResult, mae: StageResult, cluster: ClusterConfig
) -> StageResult:
    """Restore every dropped patch with the MAE, chunk by chunk on the workers; kept pixels stay bit-exact."""
    store = Store(store_url)
    result = reconstruct_stage(
        store, dataset.open(), patches.open(), mae.open(), dask_client(cluster),
        progress=ProgressArtifact(f"MAE reconstruction of {patches.name}"),
    )
    _log_resumed(result)
    return StageResult.from_artifact(store, result.artifact, **dict(result.artifact.group.attrs))
