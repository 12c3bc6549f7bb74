"""Embedding task: stage 1 on dask workers, resumable chunk by chunk, incremental across snapshots."""

from __future__ import annotations

from prefect import get_run_logger
from prefect.runtime import task_run

from dq_ops.config import ClusterConfig, EmbeddingConfig
from dq_ops.embed import EmbeddingsStage
from dq_ops.store import Store
from tasks.cluster import cluster_client
from tasks.common import ProgressArtifact, StageResult, stage_task


def _stage(store_url: str, dataset: StageResult, split: str, params: EmbeddingConfig, seed: int, precision: str,
           **_: object) -> EmbeddingsStage:
    return EmbeddingsStage(Store(store_url), dataset.open(), split, params, seed=seed, precision=precision)


def _model_name(dataset: StageResult, params: EmbeddingConfig) -> str:
    """The model that embeds this dataset: the sentence model for texts, the backbone for images."""
    return params.text_model if dataset.summary.get("modality") == "texts" else params.backbone


def _run_name() -> str:
    """``embed-<dataset>-<split>-<model>``: the task-run name says which model runs."""
    arguments = task_run.parameters
    return f"embed-{arguments['dataset'].name}-{arguments['split']}-{_model_name(arguments['dataset'], arguments['params'])}"


@stage_task("embeddings", _run_name, _stage, retries=2, retry_delay_seconds=5)
def compute_embeddings(
    store_url: str,
    dataset: StageResult,
    split: str,
    params: EmbeddingConfig,
    seed: int,
    precision: str,
    cluster: ClusterConfig,
) -> StageResult:
    """Features of one split; only samples no earlier artifact holds go through the model, and a
    retry or a rerun after a crash resumes from the chunks already written.

    ``precision`` (what the cluster's workers compute in, ``dq_ops.cluster.cluster_precision``)
    is part of the key: CUDA workers compute in bf16/fp16 and their features differ from CPU ones.
    """
    stage = _stage(store_url, dataset, split, params, seed, precision)
    progress = ProgressArtifact(f"Embedding {dataset.name}/{split} with {_model_name(dataset, params)}")
    artifact = stage.run(client=cluster_client(cluster), progress=progress)
    if stage.chunks_resumed:
        get_run_logger().info("resumed: %d of %d chunks already done", stage.chunks_resumed, stage.chunks_total)
    if stage.chunks_copied:
        get_run_logger().info("%d of %d chunks copied from the earlier embeddings as stored", stage.chunks_copied, stage.chunks_total)
    features = artifact["features"]
    return StageResult.from_artifact(
        stage.store, artifact,
        rows=int(features.shape[0]),
        dim=int(features.shape[1]),
        embedded_samples=stage.work_done,
        chunks_resumed=stage.chunks_resumed,
    )
