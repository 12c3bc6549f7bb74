"""Subset coverage (dq_ops.coverage): distances against a brute-force reference, blocks, bins, sampling."""

import numpy as np
import pytest

from dq_ops.coverage import UNCOVERED, coverage_from_blocks, query_rows, subset_coverage
from dq_ops.errors import DQInputError


def _brute_force(features, labels, subset):
    units = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-30)
    out = []
    for i in range(len(features)):
        same = [s for s in subset if labels[s] == labels[i]]
        out.append(min((np.linalg.norm(units[i] - units[s]) for s in same), default=UNCOVERED))
    return np.array(out)


def test_hand_computed_distances():
    # class 0 on the unit circle at 0°, 90°, 180°; class 1 at 45° and 225°
    angles = np.radians([0, 90, 180, 45, 225])
    features = np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.array([[1], [2], [3], [1], [5]])  # norms do not matter
    labels = np.array([0, 0, 0, 1, 1])
    cov = subset_coverage(features, labels, np.array([0, 3]))
    # 90° from its class's pick: √2; 180°: 2; 225° from 45°: 2; selected: 0
    expected = np.array([0.0, np.sqrt(2), 2.0, 0.0, 2.0])
    assert cov.mean == pytest.approx(expected.mean())
    assert cov.p95 == pytest.approx(np.percentile(expected, 95))
    assert cov.queries == 5


@pytest.mark.parametrize("buffered_rows", [1, 7, 1000])
def test_matches_brute_force_and_is_independent_of_blocks(buffered_rows, monkeypatch):
    """Whatever the blocks, and whether the selected rows are measured one at a time, a few at a
    time across block boundaries, or all at once."""
    import dq_ops.coverage

    monkeypatch.setattr(dq_ops.coverage, "MEASURE_BYTES", buffered_rows * 4 * 16)
    rng = np.random.default_rng(0)
    features = np.abs(rng.normal(size=(300, 16))).astype(np.float32)
    features[7] = 0.0  # an all-zero row stays a zero vector
    labels = rng.integers(0, 4, 300)
    subset = np.sort(rng.choice(300, 30, replace=False))
    reference = _brute_force(features.astype(np.float64), labels, subset)
    whole = subset_coverage(features, labels, subset)
    assert whole.mean == pytest.approx(reference.mean(), abs=1e-5)
    assert whole.p95 == pytest.approx(np.percentile(reference, 95), abs=1e-5)
    queries = query_rows(300)
    for step in (1, 17, 64, 300):
        blocks = [(start, features[start:start + step]) for start in range(0, 300, step)]
        blocked = coverage_from_blocks(blocks, labels, subset, queries, features[queries])
        assert blocked.mean == pytest.approx(whole.mean, abs=1e-6)
        assert blocked.p95 == pytest.approx(whole.p95, abs=1e-6)


def test_a_class_without_selected_samples_is_uncovered_and_shares_are_compared():
    features = np.eye(4, dtype=np.float32)
    labels = np.array([0, 0, 1, 1])
    cov = subset_coverage(features, labels, np.array([0, 1]))
    assert cov.mean == pytest.approx((0 + 0 + UNCOVERED + UNCOVERED) / 4)
    assert cov.class_share_error == pytest.approx(0.5)  # class 0: 100% of the subset, 50% of the split


def test_bins_touched_counts_the_bins_each_class_draws_from():
    features = np.ones((6, 2), dtype=np.float32)
    labels = np.array([0, 0, 0, 1, 1, 1])
    bins = [np.array([0, 3]), np.array([1, 4]), np.array([2, 5])]
    cov = subset_coverage(features, labels, np.array([0, 1, 5]), bins)
    assert cov.bins_touched == {0: 2, 1: 1}
    assert cov.metrics()["bins_touched_min"] == 1


def test_large_splits_are_measured_on_a_seeded_sample_of_queries():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(5000, 8)).astype(np.float32)
    labels = rng.integers(0, 3, 5000)
    subset = np.sort(rng.choice(5000, 250, replace=False))
    exact = subset_coverage(features, labels, subset)
    sampled = subset_coverage(features, labels, subset, max_queries=1000)
    assert sampled.queries == 1000 and sampled == subset_coverage(features, labels, subset, max_queries=1000)
    assert sampled.mean == pytest.approx(exact.mean, rel=0.05)


def test_bad_input_names_the_problem():
    with pytest.raises(DQInputError, match="labels"):
        subset_coverage(np.ones((3, 2)), np.array([0, 1]), np.array([0]))
    with pytest.raises(DQInputError, match="subset indices"):
        subset_coverage(np.ones((3, 2)), None, np.array([3]))
