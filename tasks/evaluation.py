"""Evaluation tasks: one (arm, seed) training as one dask task (MLflow logging stays in the flow);
or, for text, cheap classifiers fitted on the draw's sentence embeddings in the flow's process."""

from __future__ import annotations

from dq_ops.config import ClusterConfig, EvaluationConfig
from dq_ops.stages import EvaluateStage, TextEvaluateStage
from dq_ops.store import Store
from tasks.cluster import cluster_client
from tasks.common import ProgressArtifact, StageResult, stage_task


def _train(
    store_url: str, dataset: StageResult, arm: str, subset: StageResult | None, params: EvaluationConfig, seed: int,
    images: StageResult | None = None, cluster: ClusterConfig | None = None,
) -> EvaluateStage:
    return EvaluateStage(Store(store_url), dataset.open(), subset.open() if subset else None, params, seed,
                         images.open() if images else None)


def _text(
    store_url: str, dataset: StageResult, arm: str, subset: StageResult | None, embeddings: StageResult,
    test_embeddings: StageResult,
) -> TextEvaluateStage:
    return TextEvaluateStage(Store(store_url), dataset.open(), subset.open() if subset else None,
                             embeddings.open(), test_embeddings.open())


@stage_task("evaluate", "train-{arm}-seed{seed}", _train)
def evaluate_arm(
    store_url: str,
    dataset: StageResult,
    arm: str,
    subset: StageResult | None,
    params: EvaluationConfig,
    seed: int,
    images: StageResult | None = None,
    cluster: ClusterConfig | None = None,
) -> StageResult:
    """Train ``params.architecture`` on the arm's samples and measure final-epoch test accuracy,
    on a worker of ``cluster`` when given (the flow submits every (arm, seed) at once)."""
    stage = _train(store_url, dataset, arm, subset, params, seed, images)
    artifact = stage.run(client=cluster_client(cluster),  # started only to train
                         progress=ProgressArtifact(f"Training {params.architecture} on {arm} (seed {seed})"))
    return StageResult.from_artifact(stage.store, artifact, arm=arm, **dict(artifact.group.attrs))


@stage_task("evaluate-text", "text-eval-{arm}", _text)
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
