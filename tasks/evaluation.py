"""Evaluation tasks: train one arm (a subset, or the full split) on the flow's machine; or, for text,
fit cheap classifiers on its sentence embeddings."""

from __future__ import annotations

from prefect import task

from dq_ops.config import EvaluationConfig
from dq_ops.stages import EvaluateStage, TextEvaluateStage
from dq_ops.store import Store
from tasks.common import ProgressArtifact, StageResult, stage_cache_key


def _train(
    store_url: str, dataset: StageResult, arm: str, subset: StageResult | None, params: EvaluationConfig, seed: int,
    images: StageResult | None = None,
) -> EvaluateStage:
    return EvaluateStage(Store(store_url), dataset.open(), subset.open() if subset else None, params, seed,
                         images.open() if images else None)


def _text(
    store_url: str, dataset: StageResult, arm: str, subset: StageResult | None, embeddings: StageResult,
    test_embeddings: StageResult,
) -> TextEvaluateStage:
    return TextEvaluateStage(Store(store_url), dataset.open(), subset.open() if subset else None,
                             embeddings.open(), test_embeddings.open())


@task(name="evaluate", task_run_name="train-{arm}-seed{seed}", cache_key_fn=stage_cache_key(_train))
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
    stage = _train(store_url, dataset, arm, subset, params, seed, images)
    artifact = stage.run(progress=ProgressArtifact(f"Training {params.architecture} on {arm} (seed {seed})"))
    return StageResult.from_artifact(stage.store, artifact, arm=arm, **dict(artifact.group.attrs))


@task(name="evaluate-text", task_run_name="text-eval-{arm}", cache_key_fn=stage_cache_key(_text))
def evaluate_text_arm(
    store_url: str,
    dataset: StageResult,
    arm: str,
    subset: StageResult | None,
    embeddings: StageResult,
    test_embeddings: StageResult,
) -> StageResult:
    """Held-out topic accuracy of classifiers fitted on the arm's sentence embeddings."""
    stage = _text(store_url, dataset, arm, subset, embeddings, test_embeddings)
    artifact = stage.run()
    return StageResult.from_artifact(stage.store, artifact, arm=arm, **dict(artifact.group.attrs))
