r"""Subset quality without training: how well a subset covers its split in embedding space.

With unit rows :math:`u_i = f_i / \|f_i\|` (the geometry the cosine bins are built in; an
all-zero row stays 0) and a subset S, each sample i of class c(i) is *covered* at distance

.. math::  d_i = \min_{s \in S,\ c(s) = c(i)} \|u_i - u_s\| = \min_s \sqrt{2 - 2\cos(f_i, f_s)}

(0 for a selected sample; a class the subset lacks counts its samples at the largest possible
distance, 2). Coverage is the mean and the 95th percentile of :math:`d_i` over the split — the
k-center objective is the maximum, which one outlier decides. Alongside: ``bins_touched``, per
class, the number of bins holding at least one selected sample of it, and
``class_share_error``, the largest gap between a class's share of the subset and of the split.

Cost is bounded whatever the dataset size: a split larger than ``max_queries`` is measured on a
seeded uniform sample of that many query samples (an unbiased estimate of the mean and of the
percentile), and the features are read block by block (:func:`coverage_from_blocks`), so memory
holds the queries and one block.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from dq_ops.errors import DQInputError

UNCOVERED = 2.0  # the diameter of the unit sphere: samples of a class with nothing selected
MAX_QUERIES = 5_000


@dataclass(frozen=True)
class Coverage:
    """Coverage of a split by a subset (module docstring)."""

    mean: float  # mean nearest-selected distance over the (sampled) split
    p95: float  # its 95th percentile
    queries: int  # samples the distances were measured on
    bins_touched: dict[int, int]  # class label → bins holding at least one selected sample of it
    class_share_error: float  # max over classes of |share in subset − share in split|

    def metrics(self) -> dict[str, float]:
        """Flat numbers for a report or a tracker."""
        touched = list(self.bins_touched.values())
        return {"coverage_mean": self.mean, "coverage_p95": self.p95, "class_share_error": self.class_share_error,
                **({"bins_touched_min": min(touched), "bins_touched_mean": float(np.mean(touched))} if touched else {})}


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


def query_rows(n: int, max_queries: int = MAX_QUERIES, seed: int = 0) -> np.ndarray:
    """The sorted rows coverage is measured on: all ``n``, or a seeded sample of ``max_queries``."""
    if max_queries < 1:
        raise DQInputError(f"coverage: max_queries must be >= 1, got {max_queries}")
    return np.arange(n) if n <= max_queries else np.sort(np.random.default_rng(seed).choice(n, max_queries, replace=False))


def coverage_from_blocks(
    blocks: Iterable[tuple[int, np.ndarray]],
    labels: np.ndarray,
    subset: np.ndarray,
    queries: np.ndarray,
    query_features: np.ndarray,
    bins: Sequence[np.ndarray] | None = None,
) -> Coverage:
    """Coverage of ``queries`` (rows of the split, with their ``query_features``) by ``subset``.

    ``blocks`` yields ``(first_row, features)`` blocks that together cover the split's rows in
    order; only their selected rows are used. ``labels``: one per row of the split (all equal
    for an unlabelled split).
    """
    subset = np.asarray(subset, dtype=np.int64)
    queries = np.asarray(queries, dtype=np.int64)
    labels = np.asarray(labels)
    if subset.size and (subset.min() < 0 or subset.max() >= len(labels)):
        raise DQInputError(f"coverage: subset indices must lie in [0, {len(labels)}), got {subset.min()}..{subset.max()}")
    if len(query_features) != len(queries):
        raise DQInputError(f"coverage: {len(queries)} queries but {len(query_features)} query feature rows")
    selected = np.zeros(len(labels), dtype=bool)
    selected[subset] = True
    units = _unit(query_features)
    query_labels = labels[queries]
    best = np.full(len(queries), UNCOVERED ** 2)
    for start, block in blocks:
        rows = start + np.flatnonzero(selected[start:start + len(block)])
        if rows.size == 0:
            continue
        chosen = _unit(np.asarray(block)[rows - start])
        for c in np.unique(labels[rows]):
            mine, theirs = query_labels == c, labels[rows] == c
            if not mine.any():
                continue
            q, s = units[mine], chosen[theirs]
            # ‖q − s‖² = |q|² + |s|² − 2 q·s for unit (or zero) rows
            squared = (q * q).sum(1)[:, None] + (s * s).sum(1)[None, :] - 2.0 * (q @ s.T)
            best[mine] = np.minimum(best[mine], squared.min(axis=1))
    distances = np.sqrt(np.clip(best, 0.0, None))
    distances[selected[queries]] = 0.0
    classes = np.unique(labels)
    split_share = np.array([np.mean(labels == c) for c in classes])
    subset_share = np.array([np.mean(labels[subset] == c) for c in classes]) if subset.size else np.zeros(len(classes))
    touched: dict[int, int] = {}
    if bins is not None:
        bin_of = np.full(len(labels), -1)
        for b, members in enumerate(bins):
            bin_of[np.asarray(members, dtype=np.int64)] = b
        for c in classes:
            picked = bin_of[subset[labels[subset] == c]]
            touched[int(c)] = int(np.unique(picked[picked >= 0]).size)
    return Coverage(
        mean=float(distances.mean()) if len(distances) else 0.0,
        p95=float(np.percentile(distances, 95)) if len(distances) else 0.0,
        queries=len(queries), bins_touched=touched,
        class_share_error=float(np.abs(subset_share - split_share).max()),
    )


def subset_coverage(
    features: np.ndarray,
    labels: np.ndarray | None,
    subset: np.ndarray,
    bins: Sequence[np.ndarray] | None = None,
    *,
    max_queries: int = MAX_QUERIES,
    seed: int = 0,
) -> Coverage:
    """Coverage of all ``len(features)`` samples by the rows ``subset`` (module docstring).

    ``bins`` (the split's DQ bins) gives ``bins_touched``; without them it is empty.
    """
    features = np.asarray(features)
    if features.ndim != 2:
        raise DQInputError(f"coverage needs (n, d) features, got shape {features.shape}")
    if labels is not None and len(labels) != len(features):
        raise DQInputError(f"coverage: {len(features)} feature rows but {len(labels)} labels")
    queries = query_rows(len(features), max_queries, seed)
    labels = np.zeros(len(features), dtype=np.int64) if labels is None else labels
    return coverage_from_blocks([(0, features)], labels, subset, queries, features[queries], bins)
