"""Pixel-quantization tasks: patch dropping, the MAE, reconstruction."""

from __future__ import annotations

from prefect import task

from dq_ops.config import EmbeddingConfig, PatchConfig
from dq_ops.stages import drop_patches_stage, mae_stage, reconstruct_stage
from dq_ops.store import Store
from tasks.common import ProgressArtifact, StageResult, cached_stage, retry_unless_bad_input


@task(name="patches", task_run_name="drop-patches-{subset.name}", cache_key_fn=cached_stage("patches"), retries=1, retry_condition_fn=retry_unless_bad_input)
def drop_patches(
    store_url: str, dataset: StageResult, subset: StageResult, params: PatchConfig, embedding: EmbeddingConfig
) -> StageResult:
    """Keep the top 1 − θ patches of every subset image by Grad-CAM++; store only those."""
    store = Store(store_url)
    artifact = drop_patches_stage(
        store, dataset.open(), subset.open(), params, embedding,
        progress=ProgressArtifact(f"Grad-CAM++ patch scores for {subset.summary.get('size')} images"),
    )
    return StageResult.from_artifact(store, artifact, **dict(artifact.group.attrs))


@task(name="mae", task_run_name="mae-{dataset.name}", cache_key_fn=cached_stage("mae"), retries=1, retry_condition_fn=retry_unless_bad_input)
def prepare_mae(store_url: str, dataset: StageResult, params: PatchConfig, seed: int) -> StageResult:
    """Train the dataset's MAE (or take the configured checkpoint) and keep it in the store."""
    store = Store(store_url)
    artifact = mae_stage(store, dataset.open(), params, seed, progress=ProgressArtifact("Training the MAE"))
    history = artifact["loss_history"][:]
    return StageResult.from_artifact(
        store, artifact,
        first_loss=float(history[0]) if len(history) else None,
        final_loss=float(history[-10:].mean()) if len(history) else None,
    )


@task(name="reconstruct", task_run_name="reconstruct-{patches.name}", cache_key_fn=cached_stage("reconstruct"), retries=1, retry_condition_fn=retry_unless_bad_input)
def reconstruct_patches(store_url: str, dataset: StageResult, patches: StageResult, mae: StageResult) -> StageResult:
    """Restore every dropped patch with the MAE; kept pixels stay bit-exact."""
    store = Store(store_url)
    artifact = reconstruct_stage(store, dataset.open(), patches.open(), mae.open())
    return StageResult.from_artifact(store, artifact, **dict(artifact.group.attrs))
