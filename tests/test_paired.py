"""Paired gap of two arms: mean, Student-t interval and verdict on hand-computed examples."""

from __future__ import annotations

import pytest

from dq_ops.errors import DQInputError
from dq_ops.paired import paired_gap, summarize_accuracies


def test_gap_ahead_with_hand_computed_t_interval():
    # d = a − b = [0.01, 0.02, 0.03, 0.02, 0.02]: mean 0.02, sd = sqrt(2e-4 / 4) = 0.0070711,
    # SE = sd / sqrt(5) = 0.0031623, t(0.975, df=4) = 2.776445, half-width 0.0087798.
    a = [0.51, 0.62, 0.73, 0.82, 0.92]
    b = [0.50, 0.60, 0.70, 0.80, 0.90]
    gap = paired_gap(a, b)
    assert gap.n == 5
    assert gap.mean == pytest.approx(0.02)
    assert gap.ci_low == pytest.approx(0.0112202, abs=1e-6)
    assert gap.ci_high == pytest.approx(0.0287798, abs=1e-6)
    assert gap.verdict == "ahead"
    assert gap.sentence("dq", "random").startswith("dq is ahead of random by 2.00 points (95% CI +1.12 to +2.88, 5 paired")


def test_swapped_arms_are_behind_by_the_mirrored_interval():
    gap = paired_gap([0.50, 0.60, 0.70, 0.80, 0.90], [0.51, 0.62, 0.73, 0.82, 0.92])
    assert gap.mean == pytest.approx(-0.02)
    assert (gap.ci_low, gap.ci_high) == pytest.approx((-0.0287798, -0.0112202), abs=1e-6)
    assert gap.verdict == "behind"


def test_interval_containing_zero_is_indistinguishable():
    # d = [0.01, 0.02, 0.04]: mean 0.023333, sd 0.015275, SE 0.0088192, t(0.975, 2) = 4.302653.
    gap = paired_gap([0.80, 0.82, 0.84], [0.79, 0.80, 0.80])
    assert gap.mean == pytest.approx(0.0233333, abs=1e-6)
    assert (gap.ci_low, gap.ci_high) == pytest.approx((-0.0146127, 0.0612794), abs=1e-6)
    assert gap.verdict == "indistinguishable"
    assert "indistinguishable" in gap.sentence("dq", "random")


def test_a_single_pair_has_no_interval():
    gap = paired_gap([0.85], [0.80])
    assert gap.mean == pytest.approx(0.05) and gap.ci_low is None and gap.ci_high is None
    assert gap.verdict == "indistinguishable"
    assert "single draw" in gap.sentence("dq", "random")


@pytest.mark.parametrize("a, b", [([0.1, 0.2], [0.1]), ([], [])])
def test_unpaired_input_is_refused(a, b):
    with pytest.raises(DQInputError, match="paired accuracies"):
        paired_gap(a, b)


def test_summary_is_mean_and_sample_std_per_arm():
    summary = summarize_accuracies({"dq": [0.8, 0.9], "random": [0.85]})
    assert list(summary) == ["dq", "random"]
    assert summary["dq"].mean == pytest.approx(0.85) and summary["dq"].std == pytest.approx(0.0707107)
    assert summary["random"].std == 0.0 and summary["dq"].as_percent() == "85.00 ± 7.07"
