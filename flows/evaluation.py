"""The evaluation part of the flow: per keep ratio, paired draws of every arm and their trainings.

Evaluation seed s draws every sampled arm's subset and seeds its training, so two arms at the
same seed differ only by their method (:func:`~tasks.summary.paired_gaps`).
"""

from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger

from dq_ops.config import DQConfig
from tasks.common import StageResult
from tasks.evaluation import evaluate_arm, evaluate_text_arm
from tasks.patches import drop_patches, reconstruct_patches
from tasks.sampling import baseline_subset, sample_subset
from tasks.summary import ArmResult, arm_label


@dataclass(frozen=True)
class Draw:
    """What one (arm, seed) training reads: the subset drawn for it (None: the whole split) and,
    for ``dq_pixels``, the reconstruction of that subset's dropped patches."""

    seed: int
    subset: StageResult | None
    images: StageResult | None = None


def draw_arms(
    config: DQConfig, dataset: StageResult, embeddings: StageResult, bins: StageResult, ratio: float,
    published: StageResult, mae: StageResult | None,
) -> dict[str, list[Draw]]:
    """Per arm, one draw per evaluation seed s (paired draws).

    ``dq`` and ``dq_pixels`` share the DQ draw of seed s (the published subset when s is the config
    seed), ``random`` draws with seed s; k-center and herding are deterministic selections drawn once
    (config seed) and reused. ``dq_pixels`` trains on the MAE reconstruction of *its own* draw, so
    patch dropping + reconstruction run once per seed: its gap to ``dq`` at the same seed is the
    pixel stage's cost alone, on identical samples. Without an MAE (text data, patches disabled)
    ``dq_pixels`` is skipped. Every draw is a ``subsets/<key>`` artifact (method, ratio, seed).
    """
    store_url, arms = config.store_url, config.evaluation.arms
    draws: dict[str, list[Draw]] = {arm: [] for arm in arms if arm != "full" and (arm != "dq_pixels" or mae is not None)}
    if "dq_pixels" in arms and mae is None:
        get_run_logger().warning("evaluation arm 'dq_pixels' skipped: it needs an image dataset with patches enabled")
    for seed in config.evaluation.seeds:
        dq = published if seed == config.seed else sample_subset(store_url, dataset, embeddings, bins, ratio, seed, config.sampling)
        for arm in draws:
            if arm == "dq":
                draws[arm].append(Draw(seed, dq))
            elif arm == "dq_pixels":
                patches = drop_patches(store_url, dataset, dq, config.patches, config.embedding, config.cluster)
                draws[arm].append(Draw(seed, dq, reconstruct_patches(store_url, dataset, patches, mae, config.cluster)))
            else:
                draw_seed = seed if arm == "random" else config.seed
                draws[arm].append(Draw(seed, baseline_subset(store_url, dataset, embeddings, bins, arm, ratio, draw_seed)))
    return draws


def evaluate_arms(
    config: DQConfig, dataset: StageResult, ratio: float, draws: dict[str, list[Draw]],
    embeddings: tuple[StageResult, StageResult | None],
) -> list[ArmResult]:
    """Train every (arm, seed) at once (each one task on the dask cluster; text: one fit per draw). One row per arm."""
    texts = dataset.summary["modality"] == "texts"
    text_fits: dict[str | None, Any] = {}  # a text fit is deterministic: one per distinct subset

    def submit(arm: str, draw: Draw) -> Any:
        if not texts:
            return evaluate_arm.submit(config.store_url, dataset, arm_label(arm, ratio), draw.subset, config.evaluation,
                                       draw.seed, draw.images, config.cluster)
        key = draw.subset.url if draw.subset else None
        if key not in text_fits:
            text_fits[key] = evaluate_text_arm.submit(config.store_url, dataset, arm_label(arm, ratio), draw.subset,
                                                      *embeddings)
        return text_fits[key]

    futures = {arm: [submit(arm, d) for d in arm_draws] for arm, arm_draws in draws.items()}
    return [ArmResult.from_runs(arm, ratio, [d.seed for d in draws[arm]], [d.subset for d in draws[arm]],
                                [future.result() for future in arm_futures])
            for arm, arm_futures in futures.items()]
