"""Bin sampling (DQ stage 3): draw the subset from precomputed bins.

Uniform rule (reference ``quantize_bin.py`` / DeepCore ``Uniform`` with ``balance=True``): from
every bin b and every class c draw ``round(ratio · n_bc)`` samples uniformly without replacement,
with Python's ``round`` (banker's: round(62.5) = 62, so the reference's 12.5% CIFAR-10 subset
has 6,200 samples, not 6,250). The subset is the union. That per-bin rounding reproduces the
reference (``rounding="per-bin"``), but it gives a class of 12 samples per bin nothing at 1%.
``rounding="per-class"`` (the pipeline's default, with ``bins.budget_rule: per-class``) keeps
``k_c = round(ratio · n_c)`` of class c and apportions it over the class's bins in proportion
to ``w_b · n_bc`` (``w_b`` = 1, or the bin weights), capped at ``n_bc``, by the Sainte-Laguë
divisor method: seats go one at a time to the bin with the largest ``w_b · n_bc / (s_b + ½)``
(s_b: seats it holds; ties to the lower bin). On balanced bins both rules give the same counts.

Randomness is **stable**: every sample gets the draw key ``sha256(f"{seed}:{id}")`` (its first
8 bytes as an integer; ``id`` is the stable sample id from ingest, or the sample index when no
ids are given), and each (bin, class) group keeps the samples with the smallest keys. Whether a
sample is drawn depends on its own id and on its group, not on its position or on which other
samples exist: when a dataset is refreshed, the selection changes only where the data or the
bins changed. Keys do not depend on the ratio, so for a fixed seed and fixed weights the subset
at a smaller ratio is contained in the subset at a larger one (seats are handed out one at a
time, so a larger total never takes a seat away), and any ratio can be drawn later from the same
bins. ``budget-aware`` weights change with a class's budget (where it reaches the class's number
of bins), so nesting holds on either side of that point, not across it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from dq_ops.adaptive import adaptive_bin_weights
from dq_ops.errors import DQInputError
from dq_ops.features import class_groups

Rounding = Literal["per-bin", "per-class"]
BinWeights = Literal["uniform", "later-bins", "budget-aware", "adaptive"]


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
    """Stable per-sample draw keys: the first 8 bytes of ``sha256(f"{seed}:{id}")`` as uint64.

    One hash per sample is the cost, so the rest stays out of the loop: the seed's prefix is
    hashed once and copied, the ids are Python strings (a NumPy array's elements would be
    formatted one by one), and the 8-byte prefixes are read as big-endian integers at once."""
    prefix = hashlib.sha256(f"{seed}:".encode())
    digests = bytearray()
    for sample_id in ids.tolist() if isinstance(ids, np.ndarray) else ids:
        digest = prefix.copy()
        digest.update(f"{sample_id}".encode())
        digests += digest.digest()[:8]
    return np.frombuffer(digests, dtype=">u8").astype(np.uint64)


def sample_bins(
    bins: Sequence[np.ndarray],
    labels: np.ndarray | None,
    ratio: float,
    seed: int,
    *,
    ids: Sequence[str] | np.ndarray | None = None,
    weights: Sequence[float] | np.ndarray | None = None,
    rounding: Rounding = "per-bin",
) -> np.ndarray:
    """Draw ``ratio`` of the data from the bins; sorted int64 sample indices.

    ``labels``: (n,) labels of all samples (bins index into them) for class-balanced draws, or
    None to draw per bin only. ``ids``: the samples' stable ids (all samples, like labels), which
    make the draw stable across refreshes (module docstring); default: the sample indices.

    ``rounding`` and ``weights`` decide how many samples each (bin, class) cell gives (module
    docstring): ``weights=None`` with ``"per-bin"`` is the reference's uniform rule. ``weights``
    (non-negative intensities: one per bin, shape (B,), or one row per class, shape (C, B), rows
    in the order of ``np.unique(labels)``) moves samples between the bins of a class and never
    between classes: every class keeps the size :func:`sample_sizes` reports for ``rounding``, so
    a baseline drawn with those sizes matches the subset class by class. The draw inside a cell
    is the same smallest-keys rule whatever the counts.
    """
    ratio = check_ratio(ratio)
    bins = _checked_bins(bins, labels)
    cells_per_class = _cells(bins, labels)
    intensities = np.ones(len(bins)) if weights is None else _checked_weights(weights, len(bins), len(cells_per_class))
    every = np.concatenate(bins)
    if ids is not None and len(ids) <= every.max():
        raise DQInputError(f"bins hold sample {every.max()} but there are only {len(ids)} ids")
    names = every.astype(str) if ids is None else np.asarray(ids)[every]
    keys = np.zeros(int(every.max()) + 1, dtype=np.uint64)
    keys[every] = draw_keys(names, seed)
    picked: list[np.ndarray] = []
    rounding = _checked_rounding(rounding)
    for c, cells in enumerate(cells_per_class):
        sizes = np.array([len(cell) for cell in cells])
        if weights is None and rounding == "per-bin":
            take = [keep_count(int(n), ratio) for n in sizes]
        else:
            row = intensities[c] if intensities.ndim == 2 else intensities
            take = apportion(row * sizes, sizes, _class_size(sizes, ratio, rounding))
        for cell, k in zip(cells, take):
            picked.append(cell[np.argsort(keys[cell], kind="stable")[:k]])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def bin_intensities(
    rule: BinWeights, bins: Sequence[np.ndarray], labels: np.ndarray | None, *,
    ratio: float | None = None, rounding: Rounding = "per-class",
    features: Callable[[], np.ndarray] | None = None, alpha: float = 0.5,
) -> np.ndarray | None:
    """The ``weights`` of :func:`sample_bins` for a named rule (None: uniform).

    GraphCut fills a class's bins from its dense core (bin 0: the most typical samples) to its
    rare and boundary samples (the last bin).

    - ``"later-bins"``: ``w_b = b + 1``, which shifts a class's draw towards the rare samples.
    - ``"budget-aware"``: per class, from its budget ``k_c`` (``ratio`` and ``rounding`` as
      :func:`sample_sizes`) and its ``B_c`` non-empty bins. ``k_c < B_c``: one sample from each of
      the first ``k_c`` non-empty bins, the class's most typical samples (``w_b = 1 / n_bc``, so
      every bin asks for one seat and ties go to the earlier bin); ``k_c ≥ B_c``: ``later-bins``.
      Sorscher et al. (NeurIPS 2022): with few examples per class, typical ones train best; with
      many, the hard ones add most.
    - ``"adaptive"``: ADQ's budget shares ``r_b`` (:func:`dq_ops.adaptive.adaptive_bin_weights` with
      ``alpha``, on ``features()``, the (n, d) features the bins were built on) as per-sample
      intensities ``r_b / |bin b|``.
    """
    later = np.arange(1.0, len(bins) + 1)
    if rule == "uniform":
        return None
    if rule == "later-bins":
        return later
    if rule == "budget-aware":
        if ratio is None:
            raise DQInputError("bin weights 'budget-aware' need the keep ratio")
        ratio = check_ratio(ratio)
        rows = []
        for cells in _cells(_checked_bins(bins, labels), labels):
            sizes = np.array([len(cell) for cell in cells], dtype=np.float64)
            typical = np.divide(1.0, sizes, out=np.zeros_like(sizes), where=sizes > 0)
            rows.append(typical if _class_size(sizes, ratio, rounding) < np.count_nonzero(sizes) else later)
        return np.array(rows)
    if rule == "adaptive":
        if features is None:
            raise DQInputError("bin weights 'adaptive' need the features the bins were built on")
        shares = adaptive_bin_weights(features(), labels, bins, alpha)
        return shares / np.maximum([len(b) for b in bins], 1)
    raise DQInputError(f"unknown bin weights {rule!r}; expected uniform, later-bins, budget-aware or adaptive")


def apportion(wanted: np.ndarray, caps: np.ndarray, total: int) -> list[int]:
    """``total`` seats over cells in proportion to ``wanted``, at most ``caps[i]`` each, by
    Sainte-Laguë: seat by seat to the largest ``wanted_i / (seats_i + ½)``, ties to the lower index.

    Computed at once: cell i's j-th seat has the quotient ``wanted_i / (j + ½)``, and the seats
    handed out are the ``total`` largest quotients (ties to the lower cell), which is the same.
    """
    wanted, caps = np.asarray(wanted, dtype=np.float64), np.asarray(caps, dtype=np.int64)
    caps = np.where(wanted > 0, caps, 0)
    if total > caps.sum():
        raise DQInputError(f"weights: the bins with positive weight hold {int(caps.sum())} samples, "
                           f"fewer than the {total} requested")
    cell = np.repeat(np.arange(len(wanted)), caps)
    seat = np.arange(len(cell)) - np.repeat(np.cumsum(caps) - caps, caps)
    quotient = wanted[cell] / (seat + 0.5)
    chosen = np.lexsort((cell, -quotient))[:total]
    return np.bincount(cell[chosen], minlength=len(wanted)).tolist()


def _cells(bins: list[np.ndarray], labels: np.ndarray | None) -> list[list[np.ndarray]]:
    """Per class (sorted), its members in each bin (ascending)."""
    every = np.concatenate(bins)
    bin_of = np.zeros(int(every.max()) + 1, dtype=np.int64)
    for b, members in enumerate(bins):
        bin_of[members] = b
    _, groups = class_groups(None if labels is None else np.asarray(labels)[every], len(every))
    return [[members[bin_of[members] == b] for b in range(len(bins))] for members in (np.sort(every[g]) for g in groups)]


def _class_size(cell_sizes: np.ndarray, ratio: float, rounding: Rounding) -> int:
    if _checked_rounding(rounding) == "per-bin":
        return sum(keep_count(int(n), ratio) for n in cell_sizes)
    return keep_count(int(cell_sizes.sum()), ratio)


def _checked_rounding(rounding: str) -> Rounding:
    if rounding not in ("per-bin", "per-class"):
        raise DQInputError(f"rounding must be 'per-bin' or 'per-class', got {rounding!r}")
    return rounding  # type: ignore[return-value]


def sample_sizes(
    bins: Sequence[np.ndarray], labels: np.ndarray | None, ratio: float, rounding: Rounding = "per-bin"
) -> np.ndarray:
    """Per-class sizes of :func:`sample_bins`' subsets (any weights), aligned with ``np.unique(labels)``.

    Pass them as ``sizes=`` to a baseline in :mod:`dq_ops.baselines` for a subset of exactly
    the same size per class (per-bin rounding makes them differ from ``round(ratio · n_c)``).
    Without labels: a one-element array with the total.
    """
    ratio = check_ratio(ratio)
    cells = _cells(_checked_bins(bins, labels), labels)
    return np.array([_class_size(np.array([len(c) for c in cell]), ratio, rounding) for cell in cells], dtype=np.int64)


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
    ordered = np.sort(every)
    if (ordered[1:] == ordered[:-1]).any():
        raise DQInputError("bins overlap: a sample appears in more than one bin (or twice in one)")
    return out


def _checked_weights(weights: Sequence[float] | np.ndarray, num_bins: int, num_classes: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape not in ((num_bins,), (num_classes, num_bins)):
        raise DQInputError(f"weights: expected one weight per bin ({num_bins},) or one row per class "
                           f"({num_classes}, {num_bins}), got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any() or (w.sum(axis=-1) <= 0).any():
        raise DQInputError(f"weights must be finite, non-negative and not all zero, got {w.tolist()}")
    return w
