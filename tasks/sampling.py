"""Subset tasks: the DQ subset drawn from the bins, and the comparison baselines."""

from __future__ import annotations

from dq_ops.stages import BaselineStage, SampleStage
from dq_ops.store import Store
from tasks.common import StageResult, stage_task


def _dq(store_url: str, dataset: StageResult, bins: StageResult, ratio: float, seed: int) -> SampleStage:
    return SampleStage(Store(store_url), dataset.open(), bins.open(), ratio, seed)


def _baseline(
    store_url: str, dataset: StageResult, embeddings: StageResult, bins: StageResult, method: str, ratio: float, seed: int
) -> BaselineStage:
    return BaselineStage(Store(store_url), dataset.open(), embeddings.open(), bins.open(), method, ratio, seed)


@stage_task("sample", "sample-dq-{ratio}", _dq)
def sample_subset(store_url: str, dataset: StageResult, bins: StageResult, ratio: float, seed: int) -> StageResult:
    """Draw ``ratio`` of every bin and class, stable per sample id; bins are reused for every ratio."""
    stage = _dq(store_url, dataset, bins, ratio, seed)
    artifact = stage.run()
    return StageResult.from_artifact(stage.store, artifact, method="dq", ratio=ratio, size=artifact.group.attrs["size"])


@stage_task("baseline", "sample-{method}-{ratio}", _baseline)
def baseline_subset(
    store_url: str, dataset: StageResult, embeddings: StageResult, bins: StageResult, method: str, ratio: float, seed: int
) -> StageResult:
    """A random / k-center / herding subset with DQ's per-class sizes, for comparison."""
    stage = _baseline(store_url, dataset, embeddings, bins, method, ratio, seed)
    artifact = stage.run()
    return StageResult.from_artifact(stage.store, artifact, method=method, ratio=ratio, size=artifact.group.attrs["size"])
