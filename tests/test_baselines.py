"""Coreset baselines: sizes shared with DQ, brute-force references, what each one optimises."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dq_ops.baselines import select_herding, select_kcenter, select_random
from dq_ops.errors import DQInputError
from dq_ops.features import gradient_embedding
from dq_ops.sampling import keep_count, sample_sizes

GOLDEN = Path(__file__).parent / "data" / "graphcut_reference.npz"
SELECTORS = [select_random, select_kcenter, select_herding]


@pytest.fixture(scope="module")
def real() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2000 real Fashion-MNIST feature rows (4×4-pooled pixels), labels, and the reference's bins."""
    with np.load(GOLDEN) as z:
        return (
            z["fmnist_pooled_classwise__features"] / 255.0,
            z["fmnist_pooled_classwise__labels"],
            z["fmnist_pooled_classwise__bin_of_sample"],
        )


def brute_kcenter(x: np.ndarray, k: int, first: int) -> np.ndarray:
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    chosen = [first]
    for _ in range(k - 1):
        mins = d[:, chosen].min(axis=1)
        mins[chosen] = -1
        chosen.append(int(mins.argmax()))
    return np.array(chosen)


def brute_herding(x: np.ndarray, k: int) -> np.ndarray:
    mu = x.mean(axis=0)
    chosen: list[int] = []
    for t in range(k):
        target = (t + 1) * mu - x[chosen].sum(axis=0)
        dist = ((target - x) ** 2).sum(axis=1)
        dist[chosen] = np.inf
        chosen.append(int(dist.argmin()))
    return np.array(chosen)


@pytest.mark.parametrize("select", SELECTORS)
def test_class_wise_sizes_sorted_deterministic(real, select):
    x, labels, _ = real
    subset = select(x, labels, 0.125, seed=3)
    assert subset.dtype == np.int64 and np.all(np.diff(subset) > 0)
    assert np.bincount(labels[subset], minlength=10).tolist() == [keep_count(n, 0.125) for n in np.bincount(labels)]
    assert np.array_equal(subset, select(x, labels, 0.125, seed=3))
    assert len(select(x, None, 0.1, seed=3)) == keep_count(len(x), 0.1)


@pytest.mark.parametrize("select", SELECTORS)
def test_sizes_match_a_dq_subset(real, select):
    x, labels, bin_of_sample = real
    bins = [np.flatnonzero(bin_of_sample == b) for b in range(10)]
    sizes = sample_sizes(bins, labels, 0.125)
    subset = select(x, labels, 0.125, seed=0, sizes=sizes)
    assert np.bincount(labels[subset], minlength=10).tolist() == sizes.tolist()


def test_random_depends_on_seed_and_nests_across_ratios(real):
    x, labels, _ = real
    a, b = select_random(x, labels, 0.1, seed=0), select_random(x, labels, 0.1, seed=1)
    assert not np.array_equal(a, b)
    assert np.all(np.isin(a, select_random(x, labels, 0.3, seed=0)))


def test_random_needs_only_the_row_count(real):
    x, labels, bin_of_sample = real
    sizes = sample_sizes([np.flatnonzero(bin_of_sample == b) for b in range(10)], labels, 0.125)
    for class_labels, class_sizes in ((labels, sizes), (None, None)):
        assert np.array_equal(select_random(len(x), class_labels, 0.125, seed=5, sizes=class_sizes),
                              select_random(x, class_labels, 0.125, seed=5, sizes=class_sizes))


def test_kcenter_matches_brute_force_and_covers_better_than_random(real):
    x, _, _ = real
    x = x[:300]
    subset = select_kcenter(x, None, 0.1, seed=11)
    first = int(np.random.default_rng([11, 0]).integers(len(x)))
    expected = brute_kcenter(x.astype(np.float64), 30, first)
    assert np.array_equal(subset, np.sort(expected))

    def radius(chosen: np.ndarray) -> float:
        return float(np.sqrt(((x[:, None, :] - x[None, chosen, :]) ** 2).sum(-1).min(axis=1).max()))

    assert radius(subset) < radius(select_random(x, None, 0.1, seed=11))


def test_herding_matches_brute_force_and_tracks_the_mean(real):
    x, labels, _ = real
    members = np.flatnonzero(labels == 3)
    subset = select_herding(x[members], None, 0.1, seed=0)
    assert np.array_equal(subset, np.sort(brute_herding(x[members].astype(np.float64), len(subset))))

    def mean_error(chosen: np.ndarray) -> float:
        return float(np.linalg.norm(x[members][chosen].mean(axis=0) - x[members].mean(axis=0)))

    assert mean_error(subset) < mean_error(select_random(x[members], None, 0.1, seed=0)) / 3


@pytest.mark.parametrize("select", [select_kcenter, select_herding])
def test_gradient_embedding_input_matches_explicit_features(real, select):
    x, labels, _ = real
    emb = gradient_embedding(x[:300], labels[:300], num_classes=10, seed=2)
    g, e = emb.g.astype(np.float64), emb.e.astype(np.float64)
    explicit = np.concatenate([g, (g[:, :, None] * e[:, None, :]).reshape(len(g), -1)], axis=1)
    assert np.array_equal(select(emb, labels[:300], 0.2, seed=5), select(explicit, labels[:300], 0.2, seed=5))


@pytest.mark.parametrize("select", SELECTORS)
def test_rejects_bad_input(real, select):
    x, labels, _ = real
    with pytest.raises(DQInputError, match="ratio"):
        select(x, labels, 0.0, seed=0)
    with pytest.raises(DQInputError, match="1999 labels"):
        select(x, labels[:-1], 0.1, seed=0)
    bad = x.copy()
    bad[42, 3] = np.nan
    with pytest.raises(DQInputError, match="sample 42"):
        select(bad, labels, 0.1, seed=0)
    with pytest.raises(DQInputError, match="class 0"):
        select(x, labels, 0.1, seed=0, sizes=[10_000] + [1] * 9)
