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

from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from dq_ops.errors import DQInputError
from dq_ops.features import single_threaded_blas

UNCOVERED = 2.0  # the diameter of the unit sphere: samples of a class with nothing selected
MAX_QUERIES = 5_000
MEASURE_BYTES = 64 * 2**20  # selected unit rows (float32) measured together


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


def unit_rows(rows: np.ndarray) -> np.ndarray:
    """``rows / |rows|`` in float32 (an all-zero row stays 0)."""
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
    """Coverage of ``queries`` (rows of the split, with their ``query_features``) by ``subset``:
    :func:`nearest_selected` over ``blocks`` (``(first_row, features)`` blocks that together cover
    the split's rows in order), then :func:`coverage_of`. ``labels``: one per row of the split
    (all equal for an unlabelled split)."""
    subset, queries, labels = _checked(labels, subset, queries, query_features)
    selected = np.zeros((1, len(labels)), dtype=bool)
    selected[0, subset] = True
    return coverage_of(nearest_selected(blocks, labels, selected, labels[queries], unit_rows(query_features))[0],
                       labels, subset, queries, bins)


def _checked(labels: np.ndarray, subset: np.ndarray, queries: np.ndarray,
             query_features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    subset = np.asarray(subset, dtype=np.int64)
    queries = np.asarray(queries, dtype=np.int64)
    labels = np.asarray(labels)
    if subset.size and (subset.min() < 0 or subset.max() >= len(labels)):
        raise DQInputError(f"coverage: subset indices must lie in [0, {len(labels)}), got {subset.min()}..{subset.max()}")
    if len(query_features) != len(queries):
        raise DQInputError(f"coverage: {len(queries)} queries but {len(query_features)} query feature rows")
    return subset, queries, labels


def nearest_selected(
    blocks: Iterable[tuple[int, np.ndarray]],
    labels: np.ndarray,
    selected: np.ndarray,
    query_labels: np.ndarray,
    query_units: np.ndarray,
) -> np.ndarray:
    """Per subset and query, the squared distance from the query's unit row to the nearest
    selected unit row of its class among the blocks' rows (``UNCOVERED²`` where there is none):
    shape ``(subsets, queries)``. ``selected`` holds one boolean mask per subset, ``(subsets,
    rows)``; rows are numbered from the first block's, and ``labels`` has one entry per row, so a
    split's row ranges can be measured apart and their results combined by ``np.minimum``. One
    pass over the blocks serves every subset: reading the blocks is what a pass costs.

    The blocks' unit rows are gathered into one buffer (``MEASURE_BYTES``) with each subset's
    mask; per full buffer and class c, with :math:`Q_c` the class's unit query rows and
    :math:`S_c` its buffered unit rows, ``‖q − s‖² = |q|² + |s|² − 2 q·s`` over
    :math:`Q_c S_c^T`, one product that every subset then takes its masked minimum of (a row in
    several subsets is multiplied once). Every row is buffered, selected or not: what each
    product multiplies then depends on the rows alone, never on which subsets share the pass,
    so over the same row ranges a subset's figures are the same bytes whichever subsets it is
    measured with (BLAS rounds a product differently with its shape). The queries are grouped
    by class once (their rows and squared norms reused by every buffer) and a buffer's rows by
    one stable sort of their labels, so the work per buffer is the products, whatever the
    number of classes. The products are small (a class's queries by its rows in one
    buffer) and many: one BLAS thread each (a second one spin-waits between calls, which on
    shared cores costs more than it saves). The next block is fetched (read and decoded by the
    iterable) while the current one is measured.
    """
    # Per class: the positions of its queries (ascending, as a boolean mask would give them),
    # their unit rows and squared norms.
    query_classes, query_order, query_starts = _groups(np.asarray(query_labels))
    query_groups = {}
    for c, members in zip(query_classes.tolist(), np.split(query_order, query_starts[1:])):
        q = query_units[members]
        query_groups[c] = (members, q, (q * q).sum(1)[:, None])
    capacity = max(1, MEASURE_BYTES // (4 * max(1, query_units.shape[1])))
    nearest = _Nearest(labels, query_groups, (len(selected), len(query_labels)), capacity, query_units.shape[1])
    with single_threaded_blas():
        for start, block in _read_ahead(blocks):
            nearest.add(np.arange(start, start + len(block)), unit_rows(block), selected[:, start:start + len(block)])
    return nearest.finish()


class _Nearest:
    """The running nearest distances of :func:`nearest_selected`: unit rows (and which subsets
    selected each) buffered until ``capacity``, then measured class by class at once (a few rows
    per class and block would cost a product call each)."""

    def __init__(self, labels: np.ndarray, query_groups: dict, shape: tuple[int, int], capacity: int, dims: int):
        self.labels, self.query_groups = labels, query_groups
        self.best = np.full(shape, UNCOVERED ** 2)
        self.buffer = np.empty((capacity, dims), dtype=np.float32)
        self.masks = np.empty((shape[0], capacity), dtype=bool)
        self.buffered: list[np.ndarray] = []  # the rows in the buffer, in order
        self.held = 0

    def add(self, rows: np.ndarray, units: np.ndarray, masks: np.ndarray) -> None:
        while rows.size:
            take = min(len(rows), len(self.buffer) - self.held)
            self.buffer[self.held:self.held + take] = units[:take]
            self.masks[:, self.held:self.held + take] = masks[:, :take]
            self.buffered.append(rows[:take])
            self.held += take
            rows, units, masks = rows[take:], units[take:], masks[:, take:]
            if self.held == len(self.buffer):
                self._measure()

    def finish(self) -> np.ndarray:
        if self.held:
            self._measure()
        return self.best

    def _measure(self) -> None:
        chosen, masks = self.buffer[:self.held], self.masks[:, :self.held]
        classes, order, starts = _groups(self.labels[np.concatenate(self.buffered)])
        for c, members in zip(classes.tolist(), np.split(order, starts[1:])):
            if c not in self.query_groups:
                continue
            mine, q, q_squared = self.query_groups[c]
            s = chosen[members]
            squared = q_squared + (s * s).sum(1)[None, :] - 2.0 * (q @ s.T)  # (queries of c, its rows)
            # Each subset's minimum over the rows it selected (UNCOVERED² where it has none here).
            theirs = np.where(masks[:, None, members], squared[None], UNCOVERED ** 2).min(axis=2)
            self.best[:, mine] = np.minimum(self.best[:, mine], theirs)
        self.buffered.clear()
        self.held = 0


def coverage_of(best: np.ndarray, labels: np.ndarray, subset: np.ndarray, queries: np.ndarray,
                bins: Sequence[np.ndarray] | None = None) -> Coverage:
    """The coverage metrics from the queries' squared distances ``best`` (:func:`nearest_selected`
    over the whole split); a selected query is at distance 0."""
    selected_queries = np.isin(queries, subset)
    distances = np.sqrt(np.clip(best, 0.0, None))
    distances[selected_queries] = 0.0
    classes, split_counts = np.unique(labels, return_counts=True)
    subset_class = np.searchsorted(classes, labels[subset])  # each selected sample's class, as a position in classes
    subset_share = np.bincount(subset_class, minlength=len(classes)) / len(subset) if subset.size else np.zeros(len(classes))
    touched: dict[int, int] = {}
    if bins is not None:
        bin_of = np.full(len(labels), -1)
        for b, members in enumerate(bins):
            bin_of[np.asarray(members, dtype=np.int64)] = b
        picked = bin_of[subset]
        in_a_bin = picked >= 0
        class_and_bin = np.unique(subset_class[in_a_bin] * len(bins) + picked[in_a_bin])
        bins_per_class = np.bincount(class_and_bin // len(bins), minlength=len(classes))
        touched = {int(c): int(n) for c, n in zip(classes, bins_per_class)}
    return Coverage(
        mean=float(distances.mean()) if len(distances) else 0.0,
        p95=float(np.percentile(distances, 95)) if len(distances) else 0.0,
        queries=len(queries), bins_touched=touched,
        class_share_error=float(np.abs(subset_share - split_counts / len(labels)).max()),
    )


def _groups(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct ``values`` (sorted), the positions that sort ``values`` stably (each value's
    positions ascending) and where each value's run starts in that order."""
    order = np.argsort(values, kind="stable")
    distinct, starts = np.unique(values[order], return_index=True)
    return distinct, order, starts


def _read_ahead(blocks: Iterable[tuple[int, np.ndarray]]) -> Iterator[tuple[int, np.ndarray]]:
    """``blocks`` with the next one fetched on a thread while the caller works on the current one
    (reading and decoding a stored chunk release the GIL)."""
    iterator = iter(blocks)
    with ThreadPoolExecutor(1) as reader:
        ahead = reader.submit(next, iterator, None)
        while (block := ahead.result()) is not None:
            ahead = reader.submit(next, iterator, None)
            yield block


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
