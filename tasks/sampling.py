"""Subset tasks: the DQ subset drawn from the bins, the comparison baselines, and the coverage
of a run's subsets, measured together."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from dq_ops.config import ClusterConfig, SamplingConfig
from dq_ops.stages import COVERAGE_SIDECAR, BaselineStage, SampleStage, measure_coverage
from dq_ops.store import Store
from tasks.cluster import cluster_client
from tasks.common import ProgressArtifact, StageResult, retry_unless_bad_input, served_only_if, stage_task, started, store_tag


def _dq(store_url: str, dataset: StageResult, embeddings: StageResult, bins: StageResult, ratio: float, seed: int,
        config: SamplingConfig) -> SampleStage:
    return SampleStage(Store(store_url), dataset.open(), embeddings.open(), bins.open(), ratio, seed, config)


def _baseline(
    store_url: str, dataset: StageResult, embeddings: StageResult, bins: StageResult, method: str, ratio: float, seed: int,
) -> BaselineStage:
    return BaselineStage(Store(store_url), dataset.open(), embeddings.open(), bins.open(), method, ratio, seed)


def _result(stage: SampleStage | BaselineStage, method: str) -> StageResult:
    artifact = stage.run()
    return StageResult.from_artifact(stage.store, artifact, method=method, ratio=stage.ratio, size=artifact.group.attrs["size"])


@stage_task("sample", "sample-dq-{ratio}", _dq)
def sample_subset(store_url: str, dataset: StageResult, embeddings: StageResult, bins: StageResult, ratio: float,
                  seed: int, config: SamplingConfig) -> StageResult:
    """Draw ``ratio`` of every bin and class by the sampling section's rule; bins are reused for
    every ratio."""
    return _result(_dq(store_url, dataset, embeddings, bins, ratio, seed, config), "dq")


@stage_task("baseline", "sample-{method}-{ratio}", _baseline)
def baseline_subset(
    store_url: str, dataset: StageResult, embeddings: StageResult, bins: StageResult, method: str, ratio: float, seed: int,
) -> StageResult:
    """A random / k-center / herding subset with DQ's per-class sizes, for comparison."""
    return _result(_baseline(store_url, dataset, embeddings, bins, method, ratio, seed), method)


def _coverage_key(context: TaskRunContext, arguments: dict[str, Any]) -> str:
    """The coverage task's cache key: its subsets' fingerprints and the store; served only while
    every subset still has its ``coverage.json`` (the store says what is measured)."""
    started(context)
    store_url, subsets = arguments["store_url"], arguments["subsets"]
    store = Store(store_url)
    digest = hashlib.sha256("|".join(s.fingerprint for s in subsets).encode()).hexdigest()[:16]
    return served_only_if(context, f"coverage-{digest}-{store_tag(store_url)}", lambda _: all(
        store.exists("subsets", s.name) and store.read_sidecar("subsets", s.name, COVERAGE_SIDECAR) is not None for s in subsets))


@task(name="coverage", task_run_name="coverage", cache_key_fn=_coverage_key, retries=1, retry_condition_fn=retry_unless_bad_input)
def subset_coverage(store_url: str, dataset: StageResult, embeddings: StageResult, bins: StageResult,
                    subsets: list[StageResult], cluster: ClusterConfig | None = None) -> list[StageResult]:
    """``subsets`` with their coverage (``summary["coverage"]``), kept beside each subset and
    measured together, in one pass over the embeddings, for those without
    (``dq_ops.stages.measure_coverage``); on the cluster for a large split."""
    store, artifacts = Store(store_url), [s.open() for s in subsets]
    missing = sum(store.read_sidecar("subsets", a.name, COVERAGE_SIDECAR) is None for a in artifacts)
    progress = ProgressArtifact(f"coverage of {missing} subsets, one pass over the embeddings") if missing else None
    coverage = measure_coverage(store, dataset.open(), embeddings.open(), bins.open(), artifacts, progress, cluster_client(cluster))
    return [dataclasses.replace(s, summary=s.summary | {"coverage": c}) for s, c in zip(subsets, coverage)]
