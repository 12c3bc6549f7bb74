r"""GraphCut bin generation (DQ stage 2): split a dataset into K non-overlapping bins.

**Objective** (the reference code's GraphCut + NaiveGreedy). Similarity
``sim(i, x) = 0.5 + 0.5·cos(f_i, f_x)`` (``kernel="cosine"``) or ``sim(i, x) = f_i·f_x``
(``kernel="dot"``). For one class, R is the set of its samples not yet in a bin; bin b grows
S ⊂ R one sample at a time up to its budget:

.. math::

    \mathrm{gain}(x) = \sum_{i \in R} \mathrm{sim}(i, x) - 2 \sum_{s \in S} \mathrm{sim}(s, x),
    \qquad x^* = \operatorname{argmax}_{x \in R \setminus S} \mathrm{gain}(x)

(R includes S and x itself; ties go to the lowest sample index). Then R ← R \ S. The last bin is
what remains (no greedy).

**Linear identity.** Let φ_i = f_i/|f_i| (cosine; φ_i = 0 for an all-zero row, i.e. cos = 0,
where the reference would produce NaN) or φ_i = f_i (dot), k(i, x) = φ_i·φ_x and
U_A = Σ_{i∈A} φ_i. Then

.. math::

    \text{cosine: } \mathrm{gain}(x) = \tfrac12|R| - |S| + \varphi_x \cdot V, \qquad
    \text{dot: } \mathrm{gain}(x) = 2\,\varphi_x \cdot V, \qquad V = \tfrac12 U_R - U_S,

so the greedy maximises the score ``h(x) = φ_x·V``; a pick s changes every score by ``-k(s, x)``.
No n × n similarity matrix is needed. Two exact evaluation strategies, both in float64:

* **Gram path** (the class's float32 Gram matrix, ``4·n²`` bytes, fits ``memory_budget_mb``):
  K = ΦΦᵀ is computed once per class (one BLAS call) and reused by every bin (the reference
  rebuilds it per bin). A bin starts from exact scores ``h = Φ·½U_R``; each pick moves them by
  one row of K, an O(n) update. K's float32 entries carry a rigorous error bound
  (``|K_ij - φ_i·φ_j| ≤ κ|φ_i||φ_j|``, κ ≈ (d+2)·2⁻²⁴), so the scores' accumulated error is
  known; candidates within twice that of the best get exact scores ``φ_x·V`` (V kept exact)
  before each pick, and when too many tie, all scores are recomputed exactly.
* **Lazy path** (otherwise; O(n·d) memory): exact batched lazy evaluation on three levels. A
  *full refresh* scores every candidate with one matrix-vector product (on float32 rows, with
  the rigorous error bound |fl(f·v) - f·v| ≤ (u + γ_d)|f||v|) and keeps the best ~n/8 (at most
  4096) as an outer block O with exact float64 scores; the best 256 of O form an inner block I
  whose exact scores are updated at every pick (one O(|I|·d) product). The best of I is picked
  only when it provably beats every other candidate; otherwise an *inner refresh* (exact scores
  of O, one O(|O|·d) product) or a full refresh settles it. The proof, after picks P since a
  refresh, D = Σ_{s∈P} φ_s: a candidate's score is now ``h_x - φ_x·D`` (h_x: its score at the
  refresh); split along the class's mean direction ū = U_R/|U_R|, ``φ_x = c_x·ū + φ_x⊥`` and
  ``D = α·ū + D⊥``:

  .. math::

      h_x - \varphi_x \cdot D \le h_x - \alpha c_x + |\varphi_x^\perp|\,|D^\perp|,
      \qquad |D^\perp|^2 = |D|^2 - \alpha^2,

  evaluated per candidate over O and per bucket of similar c_x beyond O; α and |D|² cost O(1)
  per pick. The ū term carries the drop that every score shares when features correlate
  (non-negative embeddings); the bound also holds when dot products are negative (dot kernel).
  Per candidate ``-α·c_x + |φ_x⊥||D⊥| ≤ |φ_x||D|``, which for cosine is ``≤ |P|``: never weaker
  than "gains never increase" (a pick lowers every gain by 1 + cos ≥ 0). Every candidate whose
  exact score may be the maximum joins O, and the first pick after a refresh is the exact
  argmax, so every refresh makes progress.

Both paths pick what a float64 evaluation of the literal greedy picks (up to float64 rounding
in exact near-ties): float32 only ever filters, and every pick is decided on float64 scores. The
reference's float32 greedy agrees with that on real features (the golden test checks this); on
features where its own float32 rounding reorders near-tied gains, it does not agree with itself
in float64 either.

**Budgets** (reference ``quantize_sample.py``): bin size ``B = round(N/K)``; for bin b, with
``|avail|`` samples not yet binned, class c gets ``round(B/|avail| · n_c_remaining)`` (Python
round, capped at what the class has left; exactly n_c/K on balanced data). That rule couples
the classes through N: when a refreshed dataset gains or loses a few samples anywhere, the
budgets of untouched classes can move by one and their bins with them. The ``"per-class"`` rule
gives bin b of class c ``round(n_c_remaining / (K − b))`` (also n_c/K per bin, last bin the
remainder) and depends on the class alone, so a refresh re-bins only the classes it touched;
the pipeline uses it by default (``bins.budget_rule``), the reference rule reproduces the
reference code exactly. Where the reference rule rounds a class's budget to 0 while it has samples
left, the class gives nothing to that bin (the reference code itself stops there with "Illegal
budget"; skipping the class is the only continuation that keeps every other budget as the
reference computes it): a class of 6 among two of 300 lands in bins 0, 1, 2, 4, 6 and 8. The
per-class rule gives such a class 1 instead: a class smaller than K (long-tailed data) fills its
first bins one sample each and later bins get none of it. Without labels the whole set is one class. :func:`bin_budgets` computes the full (class × bin) table up front from
the class sizes alone, so classes are independent: :func:`generate_bins` is

    budgets = bin_budgets(class_sizes, K)
    for each class c (members idx_c in ascending sample order):
        local = generate_class_bins(features[idx_c], budgets[c])      # fan-out point
    bin b = sorted union over c of idx_c[local[b]]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dq_ops.errors import DQInputError
from dq_ops.features import FeatureRows, checked_rows, class_groups, single_threaded_blas

KERNELS = ("cosine", "dot")
DEFAULT_MEMORY_BUDGET_MB = 256.0
# Lazy-path block sizes: the outer block (its float64 rows also fit the memory budget) and the
# inner block updated at every pick.
_OUTER = 4096
_INNER = 256
# Gram path: more near-ties than this and the scores are recomputed exactly.
_NEAR = 64
# Relative slack for the lazy bound: far above float64 rounding in the scores (~1e-13·n), far
# below real score gaps; erring high only costs an extra refresh.
_TOL = 1e-10


BUDGET_RULES = ("reference", "per-class")


def bin_budgets(class_sizes: np.ndarray | list[int], num_bins: int, rule: str = "reference") -> np.ndarray:
    """Per-class, per-bin sample counts: an int64 (num_classes, num_bins) table.

    Row c sums to ``class_sizes[c]``; the last column is the remainder. See the module docstring
    for the two rules (a class smaller than ``num_bins`` leaves its last bins empty).
    """
    sizes = np.asarray(class_sizes, dtype=np.int64).reshape(-1)
    _check_num_bins(num_bins)
    if sizes.size == 0 or sizes.sum() == 0:
        raise DQInputError("bin_budgets: no samples")
    if (sizes < 0).any():
        raise DQInputError(f"bin_budgets: negative class size {sizes.min()}")
    if rule not in BUDGET_RULES:
        raise DQInputError(f"unknown budget rule {rule!r}; expected one of {', '.join(BUDGET_RULES)}")
    rem = [int(s) for s in sizes]
    out = np.zeros((sizes.size, num_bins), dtype=np.int64)
    if rule == "per-class":
        for b in range(num_bins - 1):
            for c, r in enumerate(rem):
                out[c, b] = min(max(round(r / (num_bins - b)), 1), r) if r else 0
                rem[c] = r - out[c, b]
        out[:, -1] = rem
        return out
    bin_size = round(int(sizes.sum()) / num_bins)
    for b in range(num_bins - 1):
        avail = sum(rem)
        if avail == 0:
            break
        frac = bin_size / avail
        for c, r in enumerate(rem):
            take = min(round(frac * r), r)  # the reference's float expression, zeros included
            out[c, b] = take
            rem[c] = r - take
    out[:, -1] = rem
    return out


def generate_class_bins(
    features: np.ndarray | FeatureRows,
    budgets: np.ndarray | list[int],
    *,
    kernel: str = "cosine",
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> list[np.ndarray]:
    """Bins of one class (or of an unlabelled set): the greedy of the module docstring.

    ``features``: the class's rows (array or :class:`~dq_ops.features.GradientEmbedding`),
    in ascending sample order so that ties go to the lowest sample index. ``budgets``: samples
    per bin (one row of :func:`bin_budgets`), summing to the number of rows; the last bin takes
    the remainder without a greedy. Returns sorted int64 row positions per bin.
    """
    _check_kernel(kernel)
    rows = checked_rows(features)
    budgets = np.asarray(budgets)
    if budgets.ndim != 1 or budgets.size == 0 or not np.issubdtype(budgets.dtype, np.integer):
        raise DQInputError(f"budgets must be a non-empty 1-D integer array, got {budgets!r}")
    if (budgets < 0).any() or int(budgets.sum()) != len(rows):
        raise DQInputError(f"budgets {budgets.tolist()} must be non-negative and sum to the {len(rows)} rows")
    with single_threaded_blas():
        return _class_bins(rows, budgets, kernel, memory_budget_mb)


def generate_bins(
    features: np.ndarray | FeatureRows,
    labels: np.ndarray | None = None,
    num_bins: int = 10,
    *,
    kernel: str = "cosine",
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    budget_rule: str = "reference",
) -> list[np.ndarray]:
    """Split the samples into ``num_bins`` GraphCut bins, class-wise when ``labels`` are given.

    ``features``: (n, d) array or :class:`~dq_ops.features.GradientEmbedding`; ``labels``: (n,)
    class labels or None (one greedy over the whole set). ``memory_budget_mb`` bounds the
    per-class Gram matrix (float32, ``4·n_c²`` bytes: classes up to 8,192 samples at the default
    256 MB); larger classes use the O(n·d) lazy path.
    Returns ``num_bins`` sorted int64 arrays of sample indices, disjoint and covering all samples.
    """
    _check_kernel(kernel)
    _check_num_bins(num_bins)
    rows = checked_rows(features)
    classes, groups = class_groups(labels, len(rows))
    budgets = bin_budgets([len(g) for g in groups], num_bins, budget_rule)
    per_bin: list[list[np.ndarray]] = [[] for _ in range(num_bins)]
    with single_threaded_blas():
        for c, idx in enumerate(groups):
            class_rows = rows if classes is None else rows.take(idx)
            for b, local in enumerate(_class_bins(class_rows, budgets[c], kernel, memory_budget_mb)):
                per_bin[b].append(idx[local])
    return [np.sort(np.concatenate(parts)).astype(np.int64) for parts in per_bin]


def _class_bins(rows: FeatureRows, budgets: np.ndarray, kernel: str, memory_budget_mb: float) -> list[np.ndarray]:
    n = len(rows)
    # Coordinates no row of the class uses change no similarity; dropping them makes the Gram
    # matrix and every product cheaper (ReLU features leave many unused: bench/feature_sparsity.py,
    # docs/refresh.md).
    rows = rows.compact()
    sq = rows.sq_norms()
    if kernel == "cosine":
        nonzero = sq > 0
        scale = np.where(nonzero, 1.0 / np.sqrt(np.where(nonzero, sq, 1.0)), 0.0)
    else:
        scale = np.ones(n)
    remaining = np.arange(n)  # row positions of R, ascending
    bins: list[np.ndarray] = []
    if 4 * n * n <= memory_budget_mb * 2**20:
        phi = rows.scaled(scale)
        gram, kappa = phi.approx_gram()
        for size in budgets[:-1]:
            picks = _gram_bin(phi, gram, kappa, remaining, int(size))
            bins.append(np.sort(picks))
            remaining = np.setdiff1d(remaining, picks, assume_unique=True)
    else:
        largest = max(2, min(_OUTER, int(memory_budget_mb * 2**20) // (8 * rows.dim)))
        for size in budgets[:-1]:
            # The outer block stays a small share of R, so an inner refresh is far cheaper than a
            # full one; the inner block a small share of the outer.
            outer = max(2, min(largest, len(rows) // 8))
            local = _LazyBin(rows, scale, outer, max(1, min(_INNER, outer // 4))).select(int(size))
            bins.append(np.sort(remaining[local]))
            keep = np.ones(len(remaining), dtype=bool)
            keep[local] = False
            remaining = remaining[keep]
            rows, scale = rows.take(keep), scale[keep]  # compact: later refreshes touch only R
    bins.append(remaining)
    return [b.astype(np.int64) for b in bins]


def _gram_bin(phi: FeatureRows, gram: np.ndarray, kappa: float, members: np.ndarray, size: int) -> np.ndarray:
    """Greedy picks (row positions) of one bin over the candidates ``members``, Gram path.

    Scores start exact (``h = Φ·½U_R``) and move by Gram rows, which carry an error of at most
    κ|φ_s||φ_x| each; ``err`` bounds the total. Candidates within 2·err of the best get exact
    scores ``φ_x·V`` before a pick, so the pick is the exact argmax (lowest index on ties).
    """
    alive = np.zeros(len(phi), dtype=bool)
    alive[members] = True
    v = 0.5 * phi.weighted_sum(alive.astype(np.float64))  # ½ U_R - U_S, kept exact
    norms = np.sqrt(phi.sq_norms())
    largest = float(norms.max())
    h = np.where(alive, phi.dot(v), -np.inf)
    err = 0.0
    picks = np.empty(size, dtype=np.int64)
    for t in range(size):
        j = int(h.argmax())  # first maximum: lowest index wins ties
        if err > 0.0:
            near = np.flatnonzero(h >= h[j] - 2.0 * err)
            if len(near) > _NEAR:  # errors have piled up: start again from exact scores
                h, err = np.where(alive, phi.dot(v), -np.inf), 0.0
                j = int(h.argmax())
            elif len(near) > 1:
                j = int(near[phi.take(near).dot(v).argmax()])
        picks[t] = j
        h -= gram[j]
        h[j] = -np.inf
        alive[j] = False
        v -= phi.row(j)
        err += kappa * float(norms[j]) * largest
    return picks


class _LazyBin:
    """One bin's greedy on the lazy path, with scores exact at three levels of cost.

    * Inner block I (``inner`` rows): exact scores, updated at every pick (one O(|I|·d) product).
    * Outer block O ⊃ I (``outer`` rows, gathered at a full refresh): exact scores recomputed by
      an *inner refresh* (one O(|O|·d) product), bounded in between per candidate.
    * Everything else: scores from the last *full refresh* (O(n·d), float32 with its error bound),
      bounded per bucket of c_x.

    A pick from I needs its exact score to beat both bounds (module docstring); otherwise the
    cheaper refresh that can settle it runs.
    """

    def __init__(self, rows: FeatureRows, scale: np.ndarray, outer: int, inner: int) -> None:
        n = len(rows)
        self.rows, self.scale, self.outer, self.inner = rows, scale, outer, inner
        self.v = 0.5 * rows.weighted_sum(scale)  # ½ U_R - U_S, kept exact
        h = scale * rows.dot(self.v)  # exact scores at the start of the bin
        self.norm_phi = scale * np.sqrt(rows.sq_norms())
        self.sq = self.norm_phi * self.norm_phi
        # c_x = φ_x·ū along ū = U_R/|U_R| (free: h = φ·½U_R here), s_x = |φ_x⊥|.
        norm_v = float(np.linalg.norm(self.v))
        self.c = h / norm_v if norm_v > 0 else np.zeros(n)
        self.s = np.sqrt(np.maximum(self.sq - self.c * self.c, 0.0))
        self.buckets = _Buckets(self.c, self.s)
        self.tol = _TOL * n * max(float(self.sq.max()), 1e-300)
        self.picked = np.zeros(n, dtype=bool)
        self._full_refresh(h, np.zeros(n))

    def select(self, size: int) -> np.ndarray:
        order: list[int] = []
        while len(order) < size:
            j = int(self.hb.argmax())
            if self.settled != "full":
                # The cheaper refresh first: after it, I holds the best of O.
                if self.settled != "inner" and not self.hb[j] > self._rest_bound() + self.tol:
                    if not self._inner_refresh(self.outer_rows.dot(self.v)):
                        self._full_refresh(*self._approx_scores())
                    continue
                outside = self.buckets.bound(self.best_outside, self.alpha_full, self.d2_full)
                if not self.hb[j] > outside + self.tol:
                    self._full_refresh(*self._approx_scores())
                    continue
            order.append(self._pick(j))
        return np.asarray(order, dtype=np.int64)

    def _approx_scores(self) -> tuple[np.ndarray, np.ndarray]:
        h, kappa = self.rows.approx_dot(self.v)
        return h * self.scale, kappa * float(np.linalg.norm(self.v)) * self.norm_phi

    def _full_refresh(self, h: np.ndarray, err: np.ndarray) -> None:
        """New outer block from scores ``h`` (± ``err``) of every row."""
        n = len(h)
        h[self.picked] = -np.inf
        top = h[int(h.argmax())]
        # Whatever may be the exact argmax joins the block, so its exact best is the global one.
        near = h >= top - 2.0 * float(err.max())
        count = min(n - int(self.picked.sum()), max(self.outer, int(near.sum())))
        ranked = np.where(near, np.inf, h)
        self.outer_idx = np.sort(np.argpartition(ranked, n - count)[n - count :])
        closed = self.picked.copy()
        closed[self.outer_idx] = True
        self.best_outside = self.buckets.maxima(np.where(closed, -np.inf, h + err))
        self.outer_rows = self.rows.take(self.outer_idx).scaled(self.scale[self.outer_idx])
        self.alive = np.ones(count, dtype=bool)
        self.h_full = self.outer_rows.dot(self.v)  # exact
        self.alpha_full = self.d2_full = 0.0  # ū·D and |D|² for D = Σ φ_s since this refresh
        self._inner_refresh(self.h_full.copy())
        self.settled = "full"

    def _inner_refresh(self, h_outer: np.ndarray) -> bool:
        """New inner block from exact scores of the outer block; False if it has no candidate."""
        h_outer[~self.alive] = -np.inf
        alive = int(self.alive.sum())
        if alive == 0:
            return False
        count = min(self.inner, alive)
        ranked = h_outer.copy()
        ranked[int(h_outer.argmax())] = np.inf  # first maximum = lowest index: must be inside
        self.inner_pos = np.sort(np.argpartition(ranked, len(ranked) - count)[len(ranked) - count :])
        self.inner_rows = self.outer_rows.take(self.inner_pos)
        self.hb = h_outer[self.inner_pos]
        self.h_inner = self.hb.copy()
        rest = self.alive.copy()
        rest[self.inner_pos] = False
        members = self.outer_idx[rest]
        self.rest_h, self.rest_c, self.rest_s = h_outer[rest], self.c[members], self.s[members]
        self.alpha_inner = self.d2_inner = 0.0
        self.settled = "inner"
        return True

    def _rest_bound(self) -> float:
        beta = _beta(self.alpha_inner, self.d2_inner)
        return float(np.max(self.rest_h - self.alpha_inner * self.rest_c + beta * self.rest_s, initial=-np.inf))

    def _pick(self, j: int) -> int:
        p = int(self.inner_pos[j])
        i = int(self.outer_idx[p])
        phi = self.inner_rows.row(j)
        # |D + φ|² = |D|² + 2 φ·D + |φ|², with φ·D = (score then) - (score now).
        self.d2_full += 2.0 * (self.h_full[p] - self.hb[j]) + self.sq[i]
        self.d2_inner += 2.0 * (self.h_inner[j] - self.hb[j]) + self.sq[i]
        self.alpha_full += self.c[i]
        self.alpha_inner += self.c[i]
        self.hb -= self.inner_rows.dot(phi)
        self.hb[j] = -np.inf
        self.v -= phi
        self.picked[i] = True
        self.alive[p] = False
        self.settled = ""
        return i


def _beta(alpha: float, d2: float) -> float:
    """|D⊥| = √(|D|² - α²), with slack for the cancellation when D lies almost along ū."""
    return math.sqrt(max(d2 - alpha * alpha, 0.0) + 1e-12 * d2)


class _Buckets:
    """Upper bound on the scores outside a lazy block after picks D since the refresh.

    Write φ_x = c_x·ū + φ_x⊥ and D = α·ū + D⊥. Then
    ``h_x - φ_x·D ≤ h_x - α·c_x + |φ_x⊥|·|D⊥|`` (Cauchy–Schwarz on the ⊥ part only), and
    |D⊥|² = |D|² - α². Candidates are grouped into buckets of similar c_x; a bucket's bound uses
    its best refreshed score, its c-range and its largest |φ⊥|. The ū part carries the drop that
    every score shares when features correlate (e.g. non-negative embeddings), which a plain
    ``τ + ρ·|D|`` bound would not see.
    """

    def __init__(self, c: np.ndarray, s: np.ndarray, count: int = 64) -> None:
        self.perm = np.argsort(c, kind="stable")
        self.starts = np.linspace(0, len(c), min(count, len(c)) + 1).astype(np.int64)[:-1]
        ends = np.append(self.starts[1:], len(c)) - 1
        self.c_lo, self.c_hi = c[self.perm[self.starts]], c[self.perm[ends]]
        self.s_max = np.maximum.reduceat(s[self.perm], self.starts)

    def maxima(self, h: np.ndarray) -> np.ndarray:
        """Best score per bucket (-inf where a bucket has no candidate)."""
        return np.maximum.reduceat(h[self.perm], self.starts)

    def bound(self, best: np.ndarray, alpha: float, d2: float) -> float:
        shift = np.maximum(-alpha * self.c_lo, -alpha * self.c_hi)
        return float(np.max(best + shift + _beta(alpha, d2) * self.s_max))


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise DQInputError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")


def _check_num_bins(num_bins: int) -> None:
    if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise DQInputError(f"num_bins must be an integer >= 1, got {num_bins!r}")


@dataclass(frozen=True)
class JoinBoundaries:
    """What :func:`join_rows` scores one class's new rows against: per bin b < K−1 the direction
    ``v_b = ½·(U_{R_b} − 2·U_{S_b})`` (cosine, ``U`` sums of unit rows; for "dot" the raw rows and
    no ½) and the threshold ``t_b`` (NaN: the bin takes no joins, it had no members or no rivals).
    Small (``(K−1)·(d+1)`` floats a class), so a bins artifact keeps every class's, and a refresh
    joins new rows reading only their own features (``dq_ops.stages.BinsStage``)."""

    directions: np.ndarray  # (K−1, dim) float64
    thresholds: np.ndarray  # (K−1,) float64


def _kernel_rows(rows: FeatureRows, kernel: str) -> tuple[FeatureRows, np.ndarray, float]:
    """The rows the kernel's products take (unit rows for cosine) and each row's ``sim(y, y)``
    up to the constant that drops out of every comparison (``½`` for cosine), and that ½."""
    sq = rows.sq_norms()
    if kernel == "cosine":
        unit = rows.scaled(np.where(sq > 0, 1.0 / np.sqrt(np.where(sq > 0, sq, 1.0)), 0.0))
        return unit, 0.5 + 0.5 * (sq > 0), 0.5  # sim = ½ + ½·u·u
    return rows, sq, 1.0


def join_boundaries(
    features: np.ndarray | FeatureRows, bin_of: np.ndarray, num_bins: int, *, kernel: str = "cosine"
) -> JoinBoundaries:
    r"""The boundaries a class's bins ``bin_of`` (one per row; -1: a row in no bin, ignored) leave
    for rows joining them.

    For bin b, with ``R_b`` the rows of bins b..K-1 (what remained when the greedy filled bin b)
    and ``S_b`` its members, a row y scores

        g_b(y) = Σ_{i∈R_b} sim(i, y) − 2 Σ_{s∈S_b∖{y}} sim(s, y)

    (the greedy's gain, λ = 1, up to terms equal for all y), i.e. ``u_y·v_b`` plus a term in
    ``sim(y, y)``. The greedy left bin b with every member scoring about as high as the best row
    it passed over, so the boundary between them is
    ``t_b = ½ (min_{s∈S_b} g_b(s) + max_{z∈R_b∖S_b} g_b(z))``; the plain minimum over members as
    threshold sends rows taken out of early bins late far more often (``tests/test_bins.py``).
    Two passes over the rows: every bin's sums, then every row's score for every bin.
    """
    _check_kernel(kernel)
    _check_num_bins(num_bins)
    rows = checked_rows(features)
    bin_of = np.asarray(bin_of, dtype=np.int32)
    if len(bin_of) != len(rows):
        raise DQInputError(f"bin_of has {len(bin_of)} entries for {len(rows)} rows")
    with single_threaded_blas():
        rows, itself, half = _kernel_rows(rows, kernel)
        in_bin = rows.weighted_sum((bin_of[None, :] == np.arange(num_bins)[:, None]).astype(np.float64))
        remaining = np.cumsum(in_bin[::-1], axis=0)[::-1]
        directions = half * remaining[:-1] - 2 * half * in_bin[:-1]
        scores = rows.dot(directions.T)
    thresholds = np.full(num_bins - 1, np.nan)
    for b in range(num_bins - 1):
        members, passed_over = np.flatnonzero(bin_of == b), np.flatnonzero(bin_of > b)
        if len(members) and len(passed_over):
            # Members are not their own rivals: add back 2·sim(y, y) for y ∈ S_b.
            weakest_member = float((scores[members, b] + 2 * itself[members]).min())
            thresholds[b] = 0.5 * (weakest_member + float(scores[passed_over, b].max()))
    return JoinBoundaries(directions, thresholds)


def join_rows(features: np.ndarray | FeatureRows, boundaries: JoinBoundaries, *, kernel: str = "cosine") -> np.ndarray:
    """The bin each of ``features``' rows joins: bins are visited in order, a row joins the first
    bin b < K-1 with ``g_b ≥ t_b`` (:func:`join_boundaries`; a new row is itself among the
    remaining rows, so its score counts ``sim(y, y)`` once), else the last bin (the remainder).
    Scores are taken against the boundaries, not updated as rows join: a batch approximation of
    the greedy that never moves an existing row, so the selection stays stable. Returns int32."""
    _check_kernel(kernel)
    rows = checked_rows(features)
    directions, thresholds = boundaries.directions, boundaries.thresholds
    if directions.shape != (len(thresholds), rows.dim):
        raise DQInputError(f"join boundaries of shape {directions.shape} for rows of {rows.dim} columns")
    with single_threaded_blas():
        rows, itself, _ = _kernel_rows(rows, kernel)
        scores = rows.dot(directions.T) + itself[:, None]
    bin_of = np.full(len(rows), len(thresholds), dtype=np.int32)
    pending = np.arange(len(rows))
    for b, threshold in enumerate(thresholds):
        joins = scores[pending, b] >= threshold  # False for NaN: the bin takes none
        bin_of[pending[joins]] = b
        pending = pending[~joins]
    return bin_of


def join_bins(
    features: np.ndarray | FeatureRows, bin_of: np.ndarray, num_bins: int, *, kernel: str = "cosine"
) -> np.ndarray:
    """Incremental refresh of one class's bins: rows with ``bin_of == -1`` join the bins of the
    others (:func:`join_boundaries`, then :func:`join_rows`); existing rows keep their bins. With
    cosine similarity ``sim = ½ + ½·u_i·u_y`` (``u`` unit rows); with "dot" the raw dot product.
    On real features, rows taken out of early bins and joined again mostly land in their own bin.
    Returns the completed ``bin_of`` (int32)."""
    rows = checked_rows(features)
    bin_of = np.asarray(bin_of, dtype=np.int32).copy()
    boundaries = join_boundaries(rows, bin_of, num_bins, kernel=kernel)
    new = np.flatnonzero(bin_of < 0)
    if len(new):
        bin_of[new] = join_rows(rows.take(new), boundaries, kernel=kernel)
    return bin_of
