"""Bin sampling (DQ stage 3): draw the subset from precomputed bins.

Uniform rule (reference ``quantize_bin.py`` / DeepCore ``Uniform`` with ``balance=True``): from
every bin b and every class c draw ``round(ratio · n_bc)`` samples uniformly without replacement,
with Python's ``round`` (banker's: round(62.5) = 62, so the reference's 12.5% CIFAR-10 subset
has 6,200 samples, not 6,250). The subset is the union.

Randomness is **stable**: every sample gets the draw key ``sha256(f"{seed}:{id}")`` (its first
8 bytes as an integer; ``id`` is the stable sample id from ingest, or the sample index when no
ids are given), and each (bin, class) group keeps the samples with the smallest keys. Whether a
sample is drawn depends on its own id and on its group, not on its position or on which other
samples exist: when a dataset is refreshed, the selection changes only where the data or the
bins changed. Keys do not depend on the ratio, so for a fixed seed the subset at a smaller ratio
is contained in the subset at a larger one, and any ratio can be drawn later from the same bins.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from dq_ops.errors import DQInputError
from dq_ops.features import class_groups


def keep_count(n: int, ratio: float) -> int:
    """Samples kept from a group of ``n`` at ``ratio``: ``round(ratio · n)``, Python (banker's) round."""
    return round(ratio * n)


def check_ratio(ratio: float) -> float:
    """Return ``ratio`` as a float after checking that it lies in (0, 1]."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.integer, np.floating)):
        raise DQInputError(f"ratio must be a number in (0, 1], got {ratio!r}")
    if not 0.0 < float(ratio) <= 1.0:
        raise DQInputError(f"ratio must lie in (0, 1], got {ratio}")
    return float(ratio)


def draw_keys(ids: Sequence[str] | np.ndarray, seed: int) -> np.ndarray:
    """Stable per-sample draw keys: the first 8 bytes of ``sha256(f"{seed}:{id}")`` as uint64."""
    return np.array(
        [int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") for i in ids], dtype=np.uint64
    )


def sample_bins(
    bins: Sequence[np.ndarray],
    labels: np.ndarray | None,
    ratio: float,
    seed: int,
    *,
    ids: Sequence[str] | np.ndarray | None = None,
    weights: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """Draw ``ratio`` of the data from the bins; sorted int64 sample indices.

    ``labels``: (n,) labels of all samples (bins index into them) for class-balanced draws, or
    None to draw per bin only. ``ids``: the samples' stable ids (all samples, like labels), which
    make the draw stable across refreshes (module docstring); default: the sample indices.

    ``weights=None`` is the reference's uniform rule (module docstring). With ``weights`` (one
    non-negative score per bin, e.g. ADQ's bin importance) the total ``round(ratio · Σ|bin|)`` is
    allocated across bins in proportion to the weights, capped at each bin's size, with what
    capped bins cannot hold redistributed over the others (water-filling); integer counts by
    largest remainder (ties to the lower bin). Inside a bin the count is split over classes in
    proportion to their sizes, again by largest remainder. The draw itself is the same
    smallest-keys rule as the uniform one.
    """
    ratio = check_ratio(ratio)
    bins = _checked_bins(bins, labels)
    sizes = np.array([len(b) for b in bins])
    counts = None
    if weights is not None:
        total = keep_count(int(sizes.sum()), ratio)
        counts = _largest_remainder(_water_fill(sizes, _checked_weights(weights, len(bins)), total))
    every = np.concatenate(bins)
    names = every.astype(str) if ids is None else np.asarray(ids)[every]
    if ids is not None and len(ids) <= every.max():
        raise DQInputError(f"bins hold sample {every.max()} but there are only {len(ids)} ids")
    keys = np.zeros(int(every.max()) + 1, dtype=np.uint64)
    keys[every] = draw_keys(names, seed)
    picked: list[np.ndarray] = []
    for b, members in enumerate(bins):
        member_labels = None if labels is None else np.asarray(labels)[members]
        _, groups = class_groups(member_labels, len(members))
        group_sizes = np.array([len(g) for g in groups])
        if counts is None:
            take = [keep_count(int(k), ratio) for k in group_sizes]
        else:
            take = _largest_remainder(counts[b] * group_sizes / max(len(members), 1))
        for group, k in zip(groups, take):
            candidates = members[group]
            picked.append(candidates[np.argsort(keys[candidates], kind="stable")[:k]])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def sample_sizes(bins: Sequence[np.ndarray], labels: np.ndarray | None, ratio: float) -> np.ndarray:
    """Per-class sizes of :func:`sample_bins`' uniform subset, aligned with ``np.unique(labels)``.

    Pass them as ``sizes=`` to a baseline in :mod:`dq_ops.baselines` for a subset of exactly
    the same size per class (per-bin rounding makes them differ from ``round(ratio · n_c)``).
    Without labels: a one-element array with the total.
    """
    ratio = check_ratio(ratio)
    bins = _checked_bins(bins, labels)
    if labels is None:
        return np.array([sum(keep_count(len(b), ratio) for b in bins)], dtype=np.int64)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    out = np.zeros(len(classes), dtype=np.int64)
    for members in bins:
        present, counts = np.unique(labels[members], return_counts=True)
        out[np.searchsorted(classes, present)] += [keep_count(int(k), ratio) for k in counts]
    return out


def _checked_bins(bins: Sequence[np.ndarray], labels: np.ndarray | None) -> list[np.ndarray]:
    if len(bins) == 0:
        raise DQInputError("bins: no bins given")
    out = [np.asarray(b) for b in bins]
    for b, members in enumerate(out):
        if members.ndim != 1 or (members.size and not np.issubdtype(members.dtype, np.integer)):
            raise DQInputError(f"bin {b} must be a 1-D array of sample indices, got {members.dtype} {members.shape}")
    out = [np.sort(m).astype(np.int64) for m in out]  # draws must not depend on the order given
    every = np.concatenate(out)
    if every.size == 0:
        raise DQInputError("bins: all bins are empty")
    if every.min() < 0:
        raise DQInputError(f"bins hold a negative sample index {every.min()}")
    if labels is not None and every.max() >= len(labels):
        raise DQInputError(f"bins hold sample {every.max()} but there are only {len(labels)} labels")
    if np.unique(every).size != every.size:
        raise DQInputError("bins overlap: a sample appears in more than one bin (or twice in one)")
    return out


def _checked_weights(weights: Sequence[float] | np.ndarray, num_bins: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (num_bins,):
        raise DQInputError(f"weights: expected one weight per bin ({num_bins}), got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise DQInputError(f"weights must be finite, non-negative and not all zero, got {w.tolist()}")
    return w


def _water_fill(caps: np.ndarray, weights: np.ndarray, total: int) -> np.ndarray:
    """Real-valued allocation of ``total`` ∝ weights, capped at ``caps``, overflow redistributed."""
    alloc = np.zeros(len(caps))
    active = weights > 0
    left = float(total)
    while left > 0 and active.any():
        share = left * weights * active / weights[active].sum()
        full = active & (share >= caps - alloc)
        if not full.any():
            alloc += share
            break
        left -= float((caps - alloc)[full].sum())
        alloc[full] = caps[full]
        active &= ~full
    if alloc.sum() < total - 1e-6:
        held = int(caps[weights > 0].sum())
        raise DQInputError(f"weights: the bins with positive weight hold {held} samples, fewer than the {total} requested")
    return alloc


def _largest_remainder(shares: np.ndarray) -> list[int]:
    """Integers with the same (rounded) total, each floor or ceil of its share; ties to the lower index."""
    shares = np.asarray(shares, dtype=np.float64)
    base = np.floor(shares + 1e-9)
    extra = int(round(shares.sum() - base.sum()))
    order = np.argsort(-(shares - base), kind="stable")
    base[order[:extra]] += 1
    return [int(k) for k in base]
