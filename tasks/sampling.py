"""Subset tasks: the DQ subset drawn from the bins, and the comparison baselines."""

from __future__ import annotations

from dq_ops.config import ClusterConfig, SamplingConfig
from dq_ops.stages import BaselineStage, SampleStage
from dq_ops.store import Store
from tasks.cluster import cluster_client
from tasks.common import ProgressArtifact, StageResult, stage_task


def _dq(store_url: str, dataset: StageResult, embeddings: StageResult, bins: StageResult, ratio: float, seed: int,
        config: SamplingConfig, **_: object) -> SampleStage:
    return SampleStage(Store(store_url), dataset.open(), embeddings.open(), bins.open(), ratio, seed, config)


def _baseline(
    store_url: str, dataset: StageResult, embeddings: StageResult, bins: StageResult, method: str, ratio: float, seed: int,
    **_: object,
) -> BaselineStage:
    return BaselineStage(Store(store_url), dataset.open(), embeddings.open(), bins.open(), method, ratio, seed)


def _result(stage: SampleStage | BaselineStage, method: str, cluster: ClusterConfig | None) -> StageResult:
    artifact = stage.run(progress=ProgressArtifact(f"{method} subset at {stage.ratio:.1%}: coverage over the embeddings"),
                         client=cluster_client(cluster))
    attrs = artifact.group.attrs
    return StageResult.from_artifact(stage.store, artifact, method=method, ratio=stage.ratio, size=attrs["size"],
                                     coverage=dict(attrs["coverage"]))


@stage_task("sample", "sample-dq-{ratio}", _dq)
def sample_subset(store_url: str, dataset: StageResult, embeddings: StageResult, bins: StageResult, ratio: float,
                  seed: int, config: SamplingConfig, cluster: ClusterConfig | None = None) -> StageResult:
    """Draw ``ratio`` of every bin and class by the sampling section's rule; bins are reused for
    every ratio. The coverage pass of a large split runs on the cluster."""
    return _result(_dq(store_url, dataset, embeddings, bins, ratio, seed, config), "dq", cluster)


@stage_task("baseline", "sample-{method}-{ratio}", _baseline)
def baseline_subset(
    store_url: str, dataset: StageResult, embeddings: StageResult, bins: StageResult, method: str, ratio: float, seed: int,
    cluster: ClusterConfig | None = None,
) -> StageResult:
    """A random / k-center / herding subset with DQ's per-class sizes, for comparison."""
    stage = _baseline(store_url, dataset, embeddings, bins, method, ratio, seed)
    return _result(stage, method, cluster)
