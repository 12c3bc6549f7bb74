r"""ADQ-style adaptive per-bin keep ratios (Li et al., "Adaptive Dataset Quantization", AAAI 2025).

DQ draws the same fraction from every bin. ADQ gives each bin n an importance
:math:`\hat I_n = \widehat{Rep}_n + \widehat{Div}_n` (each score normalised over the bins) and
allocates the subset's budget in the proportions

.. math::  r_n = \alpha \, \frac{\hat I_n}{\sum_m \hat I_m} + (1 - \alpha) \, \frac{N_n}{\sum_m N_m}

(:math:`N_n` = bin size; α = 0 is DQ's uniform rule). The paper scores representativeness by
texture and diversity by a contrastive model; here both come from the features the bins were
built on, with unit vectors :math:`u_i = f_i / \|f_i\|`, class centroids :math:`\mu_c` (mean
unit vector of class c) and :math:`G_{nc}` the members of bin n in class c:

- representativeness :math:`Rep_n = \operatorname{mean}_{i \in n} \cos(u_i, \mu_{c(i)})`, how
  typical the bin's samples are of their class (high for GraphCut's early bins);
- diversity :math:`Div_n = \operatorname{mean}_c \bigl(1 - \overline{\cos}(G_{nc})\bigr)`, with
  the mean pairwise cosine of a group of k unit vectors
  :math:`\overline{\cos} = (\|\sum_i u_i\|^2 - k) / (k(k - 1))` (0 for k < 2), how spread out
  the bin is within each class (high for the late bins);
- normalisation: :math:`\widehat{Rep}_n = Rep_n / \sum_m Rep_m`, same for Div (cosines of
  non-negative features, e.g. post-ReLU embeddings, keep both scores non-negative; negative
  values are clipped to 0).

:func:`adaptive_bin_weights` returns the :math:`r_n`, budget shares over the bins;
``dq_ops.sampling.bin_intensities("adaptive", ...)`` turns them into the per-sample intensities
:math:`r_n / N_n` that ``sample_bins(..., weights=...)`` apportions within every class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dq_ops.errors import DQInputError


def bin_scores(features: np.ndarray, labels: np.ndarray | None, bins: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(Rep_n, Div_n) per bin, unnormalised (formulas in the module docstring)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise DQInputError(f"adaptive bin scores need (n, d) features, got shape {features.shape}")
    labels = np.zeros(len(features), dtype=np.int64) if labels is None else np.asarray(labels)
    units = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    classes, class_of = np.unique(labels, return_inverse=True)
    centroids = np.zeros((len(classes), units.shape[1]))
    np.add.at(centroids, class_of, units)
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    rep, div = np.zeros(len(bins)), np.zeros(len(bins))
    for n, members in enumerate(bins):
        members = np.asarray(members)
        if members.size == 0:
            continue
        rep[n] = float(np.mean(np.sum(units[members] * centroids[class_of[members]], axis=1)))
        spreads = []
        for c in np.unique(class_of[members]):
            group = units[members[class_of[members] == c]]
            k = len(group)
            if k >= 2:
                total = group.sum(axis=0)
                spreads.append(1.0 - (total @ total - k) / (k * (k - 1)))
        div[n] = float(np.mean(spreads)) if spreads else 0.0
    return rep, div


def adaptive_bin_weights(
    features: np.ndarray, labels: np.ndarray | None, bins: Sequence[np.ndarray], alpha: float
) -> np.ndarray:
    """ADQ's per-bin budget proportions ``r_n`` (sum 1; module docstring for how they are drawn).

    ``alpha`` in [0, 1] mixes the importance share with the size share (module docstring).
    """
    if not 0.0 <= alpha <= 1.0:
        raise DQInputError(f"alpha must lie in [0, 1], got {alpha}")
    sizes = np.array([len(b) for b in bins], dtype=np.float64)
    if sizes.sum() == 0:
        raise DQInputError("adaptive bin weights: all bins are empty")
    rep, div = (np.clip(score, 0.0, None) for score in bin_scores(features, labels, bins))
    importance = sum(score / score.sum() for score in (rep, div) if score.sum() > 0)
    importance = importance / importance.sum() if np.sum(importance) > 0 else sizes / sizes.sum()
    return alpha * importance + (1.0 - alpha) * sizes / sizes.sum()
