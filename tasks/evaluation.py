"""Evaluation tasks: train one arm (a subset, or the full split) on the flow's machine; or, for text,
fit cheap classifiers on its sentence embeddings."""

from __future__ import annotations

from prefect import task

from dq_ops.config import EvaluationConfig
from dq_ops.stages import evaluate_stage, evaluate_text_stage
from dq_ops.store import Store
from tasks.common import ProgressArtifact, StageResult, cached_stage


@task(name="evaluate", task_run_name="train-{arm}-seed{seed}", cache_key_fn=cached_stage("evaluate"))
def evaluate_arm(
    store_url: str,
    dataset: StageResult,
    arm: str,
    subset: StageResult | None,
    params: EvaluationConfig,
    seed: int,
    images: StageResult | None = None,
) -> StageResult:
    """Train ``params.architecture`` on the arm's samples and measure final-epoch test accuracy."""
    store = Store(store_url)
    artifact = evaluate_stage(
        store, dataset.open(), subset.open() if subset else None, params, seed,
        images=images.open() if images else None,
        progress=ProgressArtifact(f"Training {params.architecture} on {arm} (seed {seed})"),
    )
    return StageResult.from_artifact(store, artifact, arm=arm, **dict(artifact.group.attrs))


@task(name="evaluate-text", task_run_name="text-eval-{arm}", cache_key_fn=cached_stage("evaluate-text"))
def evaluate_text_arm(
    store_url: str,
    dataset: StageResult,
    arm: str,
    subset: StageResult | None,
    embeddings: StageResult,
    test_embeddings: StageResult,
) -> StageResult:
    """Held-out topic accuracy of classifiers fitted on the arm's sentence embeddings."""
    store = Store(store_url)
    artifact = evaluate_text_stage(
        store, dataset.open(), subset.open() if subset else None, embeddings.open(), test_embeddings.open()
    )
    return StageResult.from_artifact(store, artifact, arm=arm, **dict(artifact.group.attrs))
