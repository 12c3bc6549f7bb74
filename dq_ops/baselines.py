"""Coreset baselines that DQ is compared with: random, k-center greedy, herding.

One calling convention: ``select_*(features, labels, ratio, seed, *, sizes=None)`` returns sorted
int64 sample indices. With labels, selection runs per class (classes in sorted order, members in
ascending index order) with ``round(ratio · n_c)`` samples each (Python round, as
:func:`dq_ops.sampling.keep_count`); ``sizes`` (one count per class of ``np.unique(labels)``,
or one total without labels) overrides that, e.g. with :func:`dq_ops.sampling.sample_sizes` so a
baseline subset has exactly the size of a DQ subset. ``features`` is an (n, d) array or a
:class:`~dq_ops.features.GradientEmbedding`. Everything is deterministic given ``seed`` (class c,
by position among the sorted classes, draws from ``np.random.default_rng([seed, c])``) and uses
O(n·d) memory (no pairwise matrix).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from dq_ops.errors import DQInputError
from dq_ops.features import FeatureRows, checked_rows, class_groups, single_threaded_blas
from dq_ops.sampling import check_ratio, keep_count


def select_random(
    features: np.ndarray | FeatureRows | int,
    labels: np.ndarray | None,
    ratio: float,
    seed: int,
    *,
    sizes: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Uniform random subset: a seeded permutation prefix per class (nested across ratios).

    The draw depends on the class sizes alone, so ``features`` may be just the row count: a
    caller that holds no features then need not read them (n·d values for nothing)."""
    return _per_class(features, labels, ratio, seed, sizes, lambda rows, k, rng: rng.permutation(len(rows))[:k])


def select_kcenter(
    features: np.ndarray | FeatureRows,
    labels: np.ndarray | None,
    ratio: float,
    seed: int,
    *,
    sizes: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    r"""k-center greedy (Sener & Savarese 2018; DeepCore ``kCenterGreedy``), Euclidean distance.

    Start from one seeded random sample, then repeatedly add
    :math:`x^* = \operatorname{argmax}_x \min_{s \in S} \|f_x - f_s\|^2` (lowest index on ties).
    The minimum distances are updated incrementally, ``‖f_x - f_s‖² = |f_x|² + |f_s|² - 2 f_x·f_s``:
    O(n·d) per pick and O(n) extra memory.
    """
    return _per_class(features, labels, ratio, seed, sizes, _kcenter)


def select_herding(
    features: np.ndarray | FeatureRows,
    labels: np.ndarray | None,
    ratio: float,
    seed: int,
    *,
    sizes: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    r"""Herding (Welling 2009; Chen et al. 2010): match the class mean μ greedily.

    Step t adds :math:`x^* = \operatorname{argmin}_x \|(t+1)\mu - (\sum_{s \in S} f_s + f_x)\|^2`,
    i.e. the minimiser of ``|f_x|² - 2(t+1) μ·f_x + 2 (Σ_S f_s)·f_x`` (lowest index on ties),
    with the running ``Σ_S f_s·f_x`` updated by one product per pick. DeepCore's ``herding``
    takes the argmax of that distance; the argmin is the published algorithm. Deterministic:
    ``seed`` is accepted for the common signature and unused.
    """
    return _per_class(features, labels, ratio, seed, sizes, _herding)


def _per_class(
    features: np.ndarray | FeatureRows,
    labels: np.ndarray | None,
    ratio: float,
    seed: int,
    sizes: Sequence[int] | np.ndarray | None,
    select: Callable[[FeatureRows, int, np.random.Generator], np.ndarray],
) -> np.ndarray:
    ratio = check_ratio(ratio)
    # A row count (select_random's) stands for features no selector reads: a class's rows are its indices.
    rows = np.arange(features) if isinstance(features, int) else checked_rows(features)
    classes, groups = class_groups(labels, len(rows))
    if sizes is None:
        counts = [keep_count(len(g), ratio) for g in groups]
    else:
        counts = np.asarray(sizes).reshape(-1).tolist()
        if len(counts) != len(groups):
            raise DQInputError(f"sizes: expected {len(groups)} per-class counts, got {len(counts)}")
        for c, (k, g) in enumerate(zip(counts, groups)):
            if not 0 <= k <= len(g):
                culprit = "the samples" if classes is None else f"class {classes[c].item()!r}"
                raise DQInputError(f"sizes: {k} samples requested from {culprit} ({len(g)} samples)")
    picked = []
    with single_threaded_blas():
        for c, (idx, k) in enumerate(zip(groups, counts)):
            if k > 0:
                class_rows = rows if classes is None else rows.take(idx)
                # One generator per class: a class's draw depends on the seed and its position only.
                picked.append(idx[select(class_rows, int(k), np.random.default_rng([seed, c]))])
    return np.sort(np.concatenate(picked)).astype(np.int64) if picked else np.zeros(0, dtype=np.int64)


def _kcenter(rows: FeatureRows, k: int, rng: np.random.Generator) -> np.ndarray:
    rows = rows.scaled(np.ones(len(rows)))  # float64 once, not per product
    sq = rows.sq_norms()
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(len(rows))
    mins = np.full(len(rows), np.inf)
    for t in range(1, k):
        p = int(chosen[t - 1])
        dist = sq + sq[p] - 2.0 * rows.dot(rows.row(p))
        np.minimum(mins, np.maximum(dist, 0.0), out=mins)
        mins[p] = -1.0  # chosen samples never return, even among duplicates
        chosen[t] = int(mins.argmax())
    return chosen


def _herding(rows: FeatureRows, k: int, rng: np.random.Generator) -> np.ndarray:
    rows = rows.scaled(np.ones(len(rows)))
    sq = rows.sq_norms()
    mu_dot = rows.dot(rows.weighted_sum(np.full(len(rows), 1.0 / len(rows))))
    selected_dot = np.zeros(len(rows))
    taken = np.zeros(len(rows), dtype=bool)
    chosen = np.empty(k, dtype=np.int64)
    for t in range(k):
        objective = sq - 2.0 * (t + 1) * mu_dot + 2.0 * selected_dot
        objective[taken] = np.inf
        p = int(objective.argmin())
        chosen[t] = p
        taken[p] = True
        selected_dot += rows.dot(rows.row(p))
    return chosen
