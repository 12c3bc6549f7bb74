"""Subset tasks: the DQ subset drawn from the bins, and the comparison baselines."""

from __future__ import annotations

from prefect import task

from dq_ops.stages import baseline_subset_stage, sample_subset_stage
from dq_ops.store import Store
from tasks.common import StageResult, cached_stage, retry_unless_bad_input


@task(name="sample", task_run_name="sample-dq-{ratio}", cache_key_fn=cached_stage("sample"), retries=1, retry_condition_fn=retry_unless_bad_input)
def sample_subset(store_url: str, dataset: StageResult, bins: StageResult, ratio: float, seed: int) -> StageResult:
    """Uniform draw of ``ratio`` from every bin and class; bins are reused for every ratio."""
    store = Store(store_url)
    artifact = sample_subset_stage(store, dataset.open(), bins.open(), ratio, seed)
    return StageResult.from_artifact(store, artifact, method="dq", ratio=ratio, size=artifact.group.attrs["size"])


@task(name="baseline", task_run_name="sample-{method}-{ratio}", cache_key_fn=cached_stage("baseline"), retries=1, retry_condition_fn=retry_unless_bad_input)
def baseline_subset(
    store_url: str, dataset: StageResult, embeddings: StageResult, bins: StageResult, method: str, ratio: float, seed: int
) -> StageResult:
    """A random / k-center / herding subset with DQ's per-class sizes, for comparison."""
    store = Store(store_url)
    artifact = baseline_subset_stage(store, dataset.open(), embeddings.open(), bins.open(), method, ratio, seed)
    return StageResult.from_artifact(store, artifact, method=method, ratio=ratio, size=artifact.group.attrs["size"])
