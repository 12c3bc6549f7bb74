"""Bin sampling: the reference's per-bin, per-class round() rule, seeding, the weighted variant."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dq_ops.errors import DQInputError
from dq_ops.sampling import keep_count, sample_bins, sample_sizes

GOLDEN = Path(__file__).parent / "data" / "graphcut_reference.npz"


@pytest.fixture(scope="module")
def golden_bins() -> tuple[list[np.ndarray], np.ndarray]:
    """The reference's own bins of 2000 Fashion-MNIST samples, with their labels."""
    with np.load(GOLDEN) as z:
        bin_of_sample = z["fmnist_pooled_classwise__bin_of_sample"]
        labels = z["fmnist_pooled_classwise__labels"]
    return [np.flatnonzero(bin_of_sample == b) for b in range(bin_of_sample.max() + 1)], labels


def test_keep_count_is_bankers_rounding():
    assert [keep_count(500, 0.125), keep_count(100, 0.125), keep_count(20, 0.125)] == [62, 12, 2]
    assert keep_count(7, 1.0) == 7


def test_reference_cifar10_subset_size():
    # CIFAR-10 layout: 10 bins × 10 classes × 500 samples; 12.5% keeps 62 (not 62.5) per cell.
    labels = np.tile(np.repeat(np.arange(10), 500), 10)
    bins = [np.arange(b * 5000, (b + 1) * 5000) for b in range(10)]
    assert len(sample_bins(bins, labels, 0.125, seed=0)) == 6200
    assert sample_sizes(bins, labels, 0.125).tolist() == [620] * 10


def test_draws_round_ratio_of_every_bin_and_class(golden_bins):
    bins, labels = golden_bins
    subset = sample_bins(bins, labels, 0.3, seed=1)
    assert subset.dtype == np.int64 and np.all(np.diff(subset) > 0)
    chosen = np.zeros(len(labels), dtype=bool)
    chosen[subset] = True
    for members in bins:
        for c in np.unique(labels[members]):
            cell = members[labels[members] == c]
            assert chosen[cell].sum() == keep_count(len(cell), 0.3)
    assert np.all(np.isin(subset, np.concatenate(bins)))
    assert sample_sizes(bins, labels, 0.3).tolist() == np.bincount(labels[subset]).tolist()


def test_without_labels_draws_per_bin(golden_bins):
    bins, _ = golden_bins
    subset = sample_bins(bins, None, 0.25, seed=0)
    for members in bins:
        assert np.isin(members, subset).sum() == keep_count(len(members), 0.25)
    assert sample_sizes(bins, None, 0.25).tolist() == [len(subset)]


def test_seeded_deterministic_and_nested_across_ratios(golden_bins):
    bins, labels = golden_bins
    a = sample_bins(bins, labels, 0.1, seed=7)
    assert np.array_equal(a, sample_bins(bins, labels, 0.1, seed=7))
    assert not np.array_equal(a, sample_bins(bins, labels, 0.1, seed=8))
    # The same seed draws the same permutations whatever the ratio: smaller subsets nest.
    small, large = sample_bins(bins, labels, 0.05, seed=7), sample_bins(bins, labels, 0.4, seed=7)
    assert np.all(np.isin(small, a)) and np.all(np.isin(a, large))
    # Order of the indices inside a bin does not change the draw.
    shuffled = [np.random.default_rng(b).permutation(m) for b, m in enumerate(bins)]
    assert np.array_equal(a, sample_bins(shuffled, labels, 0.1, seed=7))
    assert np.array_equal(sample_bins(bins, labels, 1.0, seed=3), np.arange(len(labels)))


def test_draws_are_uniform_within_a_cell():
    bins = [np.arange(10), np.arange(10, 20)]
    counts = np.zeros(20)
    for seed in range(2000):
        counts[sample_bins(bins, None, 0.3, seed=seed)] += 1
    # Every sample is drawn with probability 0.3: 600 of 2000 (binomial sd ≈ 20.5).
    assert np.all(np.abs(counts - 600) < 5 * 20.5)


def test_weighted_allocation_follows_weights_caps_and_redistributes():
    labels = np.zeros(600, dtype=int)
    bins = [np.arange(0, 100), np.arange(100, 300), np.arange(300, 600)]
    # The class keeps 50 + 100 + 150 = 300, allocated ∝ w_b · n_b = (100, 200, 600).
    subset = sample_bins(bins, labels, 0.5, seed=0, weights=[1, 1, 2])
    assert [np.isin(b, subset).sum() for b in bins] == [33, 67, 200]
    # (8, 1, 1): bin 0 is capped at its 100; the other 200 go ∝ (200, 300).
    subset = sample_bins(bins, labels, 0.5, seed=0, weights=[8, 1, 1])
    assert [np.isin(b, subset).sum() for b in bins] == [100, 80, 120]
    # A zero weight takes nothing.
    subset = sample_bins(bins, labels, 0.25, seed=0, weights=[0, 1, 1])
    assert [np.isin(b, subset).sum() for b in bins] == [0, 60, 90]


def test_weights_move_samples_between_bins_of_a_class_never_between_classes(golden_bins):
    bins, labels = golden_bins
    weights = np.arange(1.0, len(bins) + 1)  # later bins drawn more intensely
    uniform = sample_bins(bins, labels, 0.2, seed=4)
    weighted = sample_bins(bins, labels, 0.2, seed=4, weights=weights)
    classes = np.unique(labels)
    assert [np.sum(labels[weighted] == c) for c in classes] == sample_sizes(bins, labels, 0.2).tolist()
    assert [np.sum(labels[uniform] == c) for c in classes] == sample_sizes(bins, labels, 0.2).tolist()
    for c in classes:
        cells = [b[labels[b] == c] for b in bins]
        wanted = weights * np.array([len(cell) for cell in cells])
        wanted = wanted / wanted.sum() * np.sum(labels[weighted] == c)
        taken = np.array([np.isin(cell, weighted).sum() for cell in cells])
        assert np.all(np.abs(taken - np.minimum(wanted, [len(cell) for cell in cells])) < 1 + 1e-9)
    # equal weights are the uniform rule up to rounding: the same class sizes, per-bin counts within one
    equal = sample_bins(bins, labels, 0.2, seed=4, weights=np.ones(len(bins)))
    for b in bins:
        for c in classes:
            cell = b[labels[b] == c]
            assert abs(np.isin(cell, equal).sum() - np.isin(cell, uniform).sum()) <= 1


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_rejects_ratios_outside_unit_interval(golden_bins, ratio):
    bins, labels = golden_bins
    with pytest.raises(DQInputError, match="ratio"):
        sample_bins(bins, labels, ratio, seed=0)


@pytest.mark.parametrize(
    ("bins", "labels", "weights", "message"),
    [
        ([np.array([0, 1]), np.array([1, 2])], None, None, "overlap"),
        ([np.array([0, 5])], np.zeros(3), None, "sample 5 but there are only 3 labels"),
        ([np.array([], dtype=int)], None, None, "empty"),
        ([], None, None, "no bins"),
        ([np.array([0, 1]), np.array([2, 3])], None, [1.0], "one weight per bin"),
        ([np.array([0, 1]), np.array([2, 3])], None, [1.0, -1.0], "non-negative"),
        ([np.array([0, 1]), np.array([2, 3])], None, [0.0, 0.0], "not all zero"),
        ([np.array([0]), np.array([1, 2, 3])], None, [1.0, 0.0], "fewer than the 2 requested"),
    ],
)
def test_rejects_bad_bins_and_weights(bins, labels, weights, message):
    with pytest.raises(DQInputError, match=message):
        sample_bins(bins, labels, 0.5, seed=0, weights=weights)


def test_a_samples_draw_depends_on_its_id_not_on_its_position_or_neighbours():
    """Stable sampling: inserting and removing other samples never changes whether a kept
    sample is drawn, unless its own (bin, class) group's count changes."""
    ids = np.array([f"img-{i}" for i in range(400)])
    labels = np.repeat([0, 1], 200)
    first = sample_bins([np.arange(400)], labels, 0.25, seed=3, ids=ids)
    # Shuffle the rows, drop none: the same ids are drawn.
    order = np.random.default_rng(0).permutation(400)
    shuffled = sample_bins([np.arange(400)], labels[order], 0.25, seed=3, ids=ids[order])
    assert set(ids[order][shuffled]) == set(ids[first])
    # Grow class 1 only: class 0's selection does not move.
    grown_ids = np.concatenate([ids, [f"new-{i}" for i in range(20)]])
    grown_labels = np.concatenate([labels, np.ones(20, dtype=int)])
    grown = sample_bins([np.arange(420)], grown_labels, 0.25, seed=3, ids=grown_ids)
    assert set(grown_ids[grown][grown_labels[grown] == 0]) == set(ids[first][labels[first] == 0])
    # Another seed draws another subset.
    assert set(sample_bins([np.arange(400)], labels, 0.25, seed=4, ids=ids)) != set(first)


def test_per_class_rounding_keeps_small_classes_that_per_bin_rounding_empties():
    labels = np.repeat([0, 1], 120)
    bins = [np.concatenate([np.arange(b * 12, b * 12 + 12), 120 + np.arange(b * 12, b * 12 + 12)]) for b in range(10)]
    assert len(sample_bins(bins, labels, 0.04, seed=0)) == 0  # round(0.48) = 0 in every cell
    subset = sample_bins(bins, labels, 0.04, seed=0, rounding="per-class")
    assert [np.sum(labels[subset] == c) for c in (0, 1)] == [5, 5] == sample_sizes(bins, labels, 0.04, "per-class").tolist()
    assert len({int(np.searchsorted([12 * b for b in range(1, 10)], i % 120, side="right")) for i in subset}) >= 5


@pytest.mark.parametrize("weights", [None, np.arange(1.0, 11.0)])
def test_per_class_apportionment_is_nested_across_ratios(golden_bins, weights):
    bins, labels = golden_bins
    previous = np.array([], dtype=np.int64)
    for ratio in (0.01, 0.03, 0.05, 0.1, 0.2, 0.35, 0.5, 0.8, 1.0):
        subset = sample_bins(bins, labels, ratio, seed=2, weights=weights, rounding="per-class")
        assert np.all(np.isin(previous, subset))
        classes = np.unique(labels)
        assert [np.sum(labels[subset] == c) for c in classes] == sample_sizes(bins, labels, ratio, "per-class").tolist()
        previous = subset


def test_rounding_is_checked(golden_bins):
    bins, labels = golden_bins
    with pytest.raises(DQInputError, match="rounding"):
        sample_bins(bins, labels, 0.1, seed=0, rounding="nearest")


def test_apportionment_equals_seat_by_seat_sainte_lague():
    from dq_ops.sampling import apportion

    rng = np.random.default_rng(3)
    for _ in range(200):
        k = int(rng.integers(1, 8))
        wanted = rng.integers(0, 5, k) * rng.choice([1.0, 0.5, 2.0], k)  # integer-ish values make exact ties
        caps = rng.integers(0, 12, k)
        total = int(rng.integers(0, caps[wanted > 0].sum() + 1))
        seats = np.zeros(k, dtype=int)
        for _ in range(total):
            priority = np.where((seats < caps) & (wanted > 0), wanted / (seats + 0.5), -1.0)
            seats[int(np.argmax(priority))] += 1
        assert apportion(wanted, caps, total) == seats.tolist()


def test_named_bin_weight_rules(golden_bins):
    from dq_ops.sampling import bin_intensities

    bins, labels = golden_bins
    assert bin_intensities("uniform", bins, labels) is None
    assert bin_intensities("later-bins", bins, labels).tolist() == list(range(1, len(bins) + 1))
    later = sample_bins(bins, labels, 0.2, seed=1, weights=bin_intensities("later-bins", bins, labels), rounding="per-class")
    uniform = sample_bins(bins, labels, 0.2, seed=1, rounding="per-class")
    assert np.isin(bins[-1], later).sum() > np.isin(bins[-1], uniform).sum() > 0
    with pytest.raises(DQInputError, match="features"):
        bin_intensities("adaptive", bins, labels)
    with pytest.raises(DQInputError, match="unknown bin weights"):
        bin_intensities("hardest", bins, labels)


def test_budget_aware_takes_the_first_bins_of_small_budgets_and_later_bins_of_large_ones():
    from dq_ops.sampling import bin_intensities

    # class 0: 1,000 samples, class 1: 40, over 10 bins of a tenth of each class (bin b: b-th tenth)
    labels = np.repeat([0, 1], [1000, 40])
    bins = [np.concatenate([np.arange(100 * b, 100 * b + 100), 1000 + np.arange(4 * b, 4 * b + 4)]) for b in range(10)]
    weights = bin_intensities("budget-aware", bins, labels, ratio=0.1, rounding="per-class")
    assert weights.shape == (2, 10)
    assert weights[0].tolist() == list(range(1, 11))  # k = 100 >= 10 bins: later-bins
    subset = sample_bins(bins, labels, 0.1, seed=3, weights=weights, rounding="per-class")
    small = subset[labels[subset] == 1]
    assert sorted((small - 1000) // 4) == [0, 1, 2, 3]  # k = 4 < 10 bins: one from each of the first four
    large = subset[labels[subset] == 0]
    assert len(large) == 100 and np.bincount(large // 100, minlength=10)[-1] > np.bincount(large // 100, minlength=10)[0]
    # class sizes never depend on the rule
    assert sample_sizes(bins, labels, 0.1, "per-class").tolist() == [len(large), len(small)]
    with pytest.raises(DQInputError, match="keep ratio"):
        bin_intensities("budget-aware", bins, labels)
    with pytest.raises(DQInputError, match="one row per class"):
        sample_bins(bins, labels, 0.1, seed=0, weights=np.ones((3, 10)), rounding="per-class")
