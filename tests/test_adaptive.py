"""ADQ-style adaptive bin weights on a hand-computed example, and fed to sample_bins."""

from __future__ import annotations

import numpy as np
import pytest

from dq_ops.adaptive import adaptive_bin_weights, bin_scores
from dq_ops.errors import DQInputError
from dq_ops.sampling import sample_bins

# One class; bin 0 = two copies of (1, 0); bin 1 = (0, 1) and (1, 0).
FEATURES = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
LABELS = np.zeros(4, dtype=np.int64)
BINS = [np.array([0, 1]), np.array([2, 3])]


def test_scores_by_hand():
    # Centroid of the unit vectors: (0.75, 0.25)/|.| = (0.948683, 0.316228).
    # Rep: bin 0 = 0.948683; bin 1 = (0.316228 + 0.948683)/2 = 0.632456.
    # Div: bin 0: |(2, 0)|² = 4, k = 2 → mean cos (4 − 2)/2 = 1 → 0; bin 1: |(1, 1)|² = 2 → mean cos 0 → 1.
    rep, div = bin_scores(FEATURES, LABELS, BINS)
    assert rep == pytest.approx([0.948683, 0.632456], abs=1e-6)
    assert div == pytest.approx([0.0, 1.0])


@pytest.mark.parametrize("alpha, expected", [(0.0, [0.5, 0.5]), (0.5, [0.4, 0.6]), (1.0, [0.3, 0.7])])
def test_weights_mix_importance_with_bin_sizes(alpha, expected):
    # Normalised Rep (0.6, 0.4) + Div (0, 1) = (0.6, 1.4) → importance share (0.3, 0.7); sizes (0.5, 0.5).
    assert adaptive_bin_weights(FEATURES, LABELS, BINS, alpha) == pytest.approx(expected)


def test_sample_bins_takes_the_weights():
    from dq_ops.sampling import bin_intensities

    rng = np.random.default_rng(0)
    features = np.abs(rng.normal(size=(400, 8)))
    labels = np.repeat([0, 1], 200)
    bins = [np.arange(b, 400, 4) for b in range(4)]
    shares = adaptive_bin_weights(features, labels, bins, alpha=0.5)
    weights = bin_intensities("adaptive", bins, labels, features=lambda: features, alpha=0.5)
    assert weights == pytest.approx(shares / 100)  # every bin holds 100 samples
    subset = sample_bins(bins, labels, 0.1, seed=0, weights=weights, rounding="per-class")
    assert len(subset) == 40 and np.unique(subset).size == 40
    assert [np.sum(labels[subset] == c) for c in (0, 1)] == [20, 20]


def test_alpha_out_of_range_is_refused():
    with pytest.raises(DQInputError, match="alpha"):
        adaptive_bin_weights(FEATURES, LABELS, BINS, 1.5)
