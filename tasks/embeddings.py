"""Embedding task: stage 1 on dask workers, resumable chunk by chunk."""

from __future__ import annotations

from prefect import task

from dq_ops.config import ClusterConfig, EmbeddingConfig
from dq_ops.embed import embed_dataset
from dq_ops.store import Store
from tasks.cluster import dask_client
from tasks.common import ProgressArtifact, StageResult, cached_stage, retry_unless_bad_input


@task(
    name="embeddings",
    task_run_name="embed-{dataset.name}-{split}-{params.backbone}",
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
    result = embed_dataset(
        store, dataset.name, split, params, dask_client(cluster), seed=seed,
        progress=ProgressArtifact(f"Embedding {dataset.name}/{split} with {params.backbone}"),
    )
    features = result.artifact["features"]
    return StageResult.from_artifact(
        store, result.artifact,
        rows=int(features.shape[0]),
        dim=int(features.shape[1]),
        rows_computed=result.rows_computed,
        samples_per_s=result.samples_per_second,
    )
