"""Embedding task: stage 1 on dask workers, resumable chunk by chunk."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.runtime import task_run

from dq_ops.config import ClusterConfig, EmbeddingConfig
from dq_ops.embed import embed_dataset
from dq_ops.store import Store
from tasks.cluster import dask_client
from tasks.common import ProgressArtifact, StageResult, cached_stage, retry_unless_bad_input


def _model_name(dataset: StageResult, params: EmbeddingConfig) -> str:
    """The model that embeds this dataset: the sentence model for texts, the backbone for images."""
    return params.text_model if dataset.summary.get("modality") == "texts" else params.backbone


def _run_name() -> str:
    arguments = task_run.parameters
    return f"embed-{arguments['dataset'].name}-{arguments['split']}-{_model_name(arguments['dataset'], arguments['params'])}"


@task(
    name="embeddings",
    task_run_name=_run_name,
    cache_key_fn=cached_stage("embeddings"),
    retries=2,
    retry_condition_fn=retry_unless_bad_input,
    retry_delay_seconds=5,
)
def compute_embeddings(
    store_url: str,
    dataset: StageResult,
    split: str,
    params: EmbeddingConfig,
    seed: int,
    cluster: ClusterConfig,
    accelerator: str,
) -> StageResult:
    """Features of one split; a retry or a rerun after a crash resumes from the chunks already written.

    ``accelerator`` (the resolved cluster kind) is part of the cache key, because CUDA workers
    compute in bf16/fp16 and their features differ from CPU features.
    """
    store = Store(store_url)
    progress = ProgressArtifact(f"Embedding {dataset.name}/{split} with {_model_name(dataset, params)}")
    first_report = True

    def report(done: int, total: int) -> None:
        nonlocal first_report
        if first_report and done:  # the first report counts chunks an interrupted run finished
            get_run_logger().info("resumed: %d of %d chunks already done", done, total)
        first_report = False
        progress(done, total)

    result = embed_dataset(store, dataset.name, split, params, dask_client(cluster), seed=seed, progress=report)
    features = result.artifact["features"]
    return StageResult.from_artifact(
        store, result.artifact,
        rows=int(features.shape[0]),
        dim=int(features.shape[1]),
        rows_computed=result.rows_computed,
        samples_per_s=result.samples_per_second,
    )
