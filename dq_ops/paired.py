"""Paired comparison of two subset-selection arms trained on the same seeds.

Evaluation seed s draws each sampled arm's subset with seed s and trains on it with seed s, so
the accuracies of two arms at the same s form a pair. With the per-seed differences
``d_s = a_s − b_s`` (n pairs):

    mean gap    d̄ = (1/n) Σ_s d_s
    std error   SE = sd(d) / √n,          sd with ddof = 1
    95% CI      d̄ ± t_{0.975, n−1} · SE  (Student's t quantile, ``scipy.stats.t.ppf``)

This is the paired t-interval: it treats the differences as an i.i.d. sample from a normal
distribution, which is what averaging over independent subset draws and training seeds gives
approximately. With n = 1 there is no spread to estimate: the gap is reported without an interval.

Verdict: ``ahead`` when the interval lies entirely above 0, ``behind`` when entirely below,
``indistinguishable`` when it contains 0 (or does not exist). An interval that merely touches 0
counts as containing it.

:func:`summarize_accuracies` gives each arm's mean ± sample standard deviation over its seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from dq_ops.errors import DQInputError

Verdict = Literal["ahead", "behind", "indistinguishable"]
CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedGap:
    """Gap ``a − b`` of two arms over ``n`` paired seeds (same units as the inputs, e.g. fractions)."""

    mean: float
    ci_low: float | None  # None when n = 1
    ci_high: float | None
    n: int
    confidence: float = CONFIDENCE

    @property
    def verdict(self) -> Verdict:
        if self.ci_low is not None and self.ci_low > 0:
            return "ahead"
        if self.ci_high is not None and self.ci_high < 0:
            return "behind"
        return "indistinguishable"

    def sentence(self, a: str, b: str) -> str:
        """One sentence for a report, in percentage points, e.g.
        "dq is ahead of random by 1.20 points (95% CI 0.40 to 2.00, 5 paired draws)"."""
        points = f"{100 * abs(self.mean):.2f} points"
        if self.ci_low is None:
            return (f"{a} − {b} = {100 * self.mean:+.2f} points on a single draw: "
                    f"one draw cannot tell them apart (use several evaluation seeds)")
        interval = f"{self.confidence:.0%} CI {100 * self.ci_low:+.2f} to {100 * self.ci_high:+.2f}, {self.n} paired draws"
        if self.verdict == "ahead":
            return f"{a} is ahead of {b} by {points} ({interval})"
        if self.verdict == "behind":
            return f"{a} is behind {b} by {points} ({interval})"
        return f"{a} and {b} are indistinguishable: gap {100 * self.mean:+.2f} points ({interval})"


def paired_gap(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> PairedGap:
    """The mean of ``a[s] − b[s]`` and its Student-t confidence interval (module docstring).

    ``a`` and ``b`` are the two arms' accuracies listed in the same seed order.
    """
    a_values = np.asarray(a, dtype=np.float64)
    b_values = np.asarray(b, dtype=np.float64)
    if a_values.ndim != 1 or a_values.shape != b_values.shape:
        raise DQInputError(f"paired accuracies need two equal-length lists, got {a_values.shape} and {b_values.shape}")
    if a_values.size == 0:
        raise DQInputError("paired accuracies: no seeds")
    if not 0 < confidence < 1:
        raise DQInputError(f"confidence must lie in (0, 1), got {confidence}")
    differences = a_values - b_values
    n = differences.size
    mean = float(differences.mean())
    if n == 1:
        return PairedGap(mean=mean, ci_low=None, ci_high=None, n=1, confidence=confidence)
    from scipy import stats  # slow to import: only runs with several seeds need it

    half_width = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * float(differences.std(ddof=1)) / math.sqrt(n)
    return PairedGap(mean=mean, ci_low=mean - half_width, ci_high=mean + half_width, n=n, confidence=confidence)


@dataclass(frozen=True)
class AccuracySummary:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) over seeds, as fractions."""

    mean: float
    std: float
    n: int

    def as_percent(self) -> str:
        """``"85.12 ± 0.31"`` (percentage points)."""
        return f"{100 * self.mean:.2f} ± {100 * self.std:.2f}"


def summarize_accuracies(accuracies: Mapping[str, Sequence[float]]) -> dict[str, AccuracySummary]:
    """Per arm (e.g. ``"dq@10%"``), the mean ± std of its accuracies over seeds; arms keep their order."""
    summary = {}
    for arm, values in accuracies.items():
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            raise DQInputError(f"arm {arm!r} has no accuracies")
        std = float(values.std(ddof=1)) if values.size > 1 else 0.0
        summary[arm] = AccuracySummary(mean=float(values.mean()), std=std, n=int(values.size))
    return summary
