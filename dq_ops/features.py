"""Feature sets that the selection code (bins, baselines) runs on.

Two kinds share one small row-algebra interface (:class:`FeatureRows`):

* :class:`DenseRows`: an ``(n, d)`` array, e.g. penultimate embeddings or sentence embeddings.
* :class:`GradientEmbedding`: the reference's last-layer gradient embedding (DeepCore)
  ``f = [g, g ⊗ e]`` with ``g = ∂ℓ/∂z ∈ R^C`` and ``e ∈ R^D``, stored factorised. The explicit
  vector has ``C + C·D`` entries (``g ⊗ e`` flattened class-major: entry ``C + c·D + k`` is
  ``g_c·e_k``, the layout of DeepCore's ``torch.cat([g, (g[:, :, None] * e[:, None, :]).flatten(1)])``);
  it is never materialised, because

      f_i · f_j = g_i·g_j + Σ_{c,k} g_ic e_ik g_jc e_jk = (g_i · g_j)(1 + e_i · e_j).

Vectors *in* feature space (sums of rows, one row) are flat float64 arrays of length ``dim``;
for a gradient embedding such a vector is ``[v_g (C), v_M (C·D, row-major C × D)]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Protocol, Self

import numpy as np

from dq_ops.errors import DQInputError

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # optional: without it BLAS keeps its own thread count
    threadpool_limits = None

# Rows per chunk: bounds float64 conversions of float32 rows and (chunk, C) temporaries.
_CHUNK = 4096
# Unit roundoff of float32.
_U32 = 2.0**-24


class FeatureRows(Protocol):
    """Rows f_1..f_n of a feature matrix, with the few operations selection needs.

    Results are float64 whatever the storage dtype; float32 rows are converted chunk by chunk,
    so no float64 copy of the whole matrix is made unless asked for (``scaled``).
    """

    @property
    def dim(self) -> int: ...

    def __len__(self) -> int: ...

    def take(self, idx: np.ndarray) -> Self:
        """The rows ``idx``, in that order."""
        ...

    def scaled(self, a: np.ndarray) -> Self:
        """Rows ``a_i · f_i``, stored as float64."""
        ...

    def compact(self) -> Self:
        """The rows without the coordinates that are zero in every row: every norm, dot product
        and Gram entry is the same sum minus zero terms, and its cost falls with the dimension
        (ReLU features: of 1,280 EfficientNet-Lite0 coordinates, a Fashion-MNIST class at 32 px uses 440–780)."""
        ...

    def row(self, i: int) -> np.ndarray:
        """Row ``f_i`` as a flat float64 vector of length ``dim``."""
        ...

    def sq_norms(self) -> np.ndarray:
        """``|f_i|²``, shape (n,)."""
        ...

    def approx_gram(self) -> tuple[np.ndarray, float]:
        """float32 Gram matrix K with a rigorous error factor κ: ``|K_ij - f_i·f_j| ≤ κ·|f_i|·|f_j|``."""
        ...

    def weighted_sum(self, w: np.ndarray) -> np.ndarray:
        """``Σ_i w_i f_i`` as a flat vector of length ``dim``; for ``w`` of shape (k, n), the k
        sums in one pass over the rows, shape (k, dim)."""
        ...

    def dot(self, v: np.ndarray) -> np.ndarray:
        """``f_i · v`` for every row, shape (n,); for ``v`` of shape (dim, k), every row with each
        of the k columns in one pass, shape (n, k)."""
        ...

    def approx_dot(self, v: np.ndarray) -> tuple[np.ndarray, float]:
        """Fast ``f_i · v`` with a rigorous error factor κ: ``|value_i - f_i·v| ≤ κ·|f_i|·|v|``."""
        ...

    def first_nonfinite(self) -> int | None:
        """Index of the first row holding NaN or ±inf, or None."""
        ...


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run BLAS on one thread inside the block (restored after).

    Greedy selection issues thousands of medium-sized BLAS calls. OpenBLAS's threads spin-wait
    between calls, and on shared cores that collapses (several times slower than one thread).
    Dask workers already run BLAS single-threaded, so this only changes in-process runs.
    """
    with threadpool_limits(limits=1, user_api="blas") if threadpool_limits else nullcontext():
        yield


def _first_bad_row(x: np.ndarray) -> int | None:
    for s in range(0, x.shape[0], _CHUNK):
        bad = ~np.isfinite(x[s : s + _CHUNK]).all(axis=1)
        if bad.any():
            return s + int(bad.argmax())
    return None


def _used_columns(x: np.ndarray) -> np.ndarray:
    """Which columns of ``x`` hold a nonzero value, read in row chunks (a bool mask)."""
    used = np.zeros(x.shape[1], dtype=bool)
    for s in range(0, x.shape[0], _CHUNK):
        used |= (x[s : s + _CHUNK] != 0).any(axis=0)
    return used


@dataclass(frozen=True)
class DenseRows:
    """An explicit ``(n, d)`` feature matrix."""

    x: np.ndarray

    def __post_init__(self) -> None:
        if self.x.ndim != 2:
            raise DQInputError(f"features must be a 2-D (n, d) array, got shape {self.x.shape}")

    @property
    def dim(self) -> int:
        return self.x.shape[1]

    def __len__(self) -> int:
        return self.x.shape[0]

    def _chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        for s in range(0, len(self), _CHUNK):
            yield s, self.x[s : s + _CHUNK].astype(np.float64, copy=False)

    def take(self, idx: np.ndarray) -> DenseRows:
        return DenseRows(self.x[idx])

    def compact(self) -> DenseRows:
        used = _used_columns(self.x)
        return self if used.all() else DenseRows(np.ascontiguousarray(self.x[:, used]))

    def scaled(self, a: np.ndarray) -> DenseRows:
        out = self.x.astype(np.float64)  # converting first: a mixed-dtype product is slower
        out *= np.asarray(a, dtype=np.float64)[:, None]
        return DenseRows(out)

    def row(self, i: int) -> np.ndarray:
        return self.x[i].astype(np.float64)

    def sq_norms(self) -> np.ndarray:
        out = np.empty(len(self))
        for s, x in self._chunks():
            out[s : s + len(x)] = np.einsum("ij,ij->i", x, x)
        return out

    def approx_gram(self) -> tuple[np.ndarray, float]:
        # float32: several times faster than float64 and half the memory. Error: rounding both rows (2u)
        # plus a length-d float32 dot product (γ_d), times Σ|f_ik||f_jk| ≤ |f_i||f_j|.
        x = self.x.astype(np.float32)
        gamma = self.dim * _U32 / (1.0 - self.dim * _U32)
        return x @ x.T, 1.01 * (2 * _U32 + gamma * (1.0 + _U32) ** 2)

    def weighted_sum(self, w: np.ndarray) -> np.ndarray:
        out = np.zeros((*w.shape[:-1], self.dim))
        for s, x in self._chunks():
            out += w[..., s : s + len(x)] @ x
        return out

    def dot(self, v: np.ndarray) -> np.ndarray:
        if self.x.dtype == np.float64:
            return self.x @ v
        out = np.empty((len(self), *v.shape[1:]))
        for s, x in self._chunks():
            out[s : s + len(x)] = x @ v
        return out

    def approx_dot(self, v: np.ndarray) -> tuple[np.ndarray, float]:
        norm = float(np.linalg.norm(v))
        if self.x.dtype != np.float32 or norm == 0.0:
            return self.dot(v), 0.0
        # float32 product on the stored rows: half the memory traffic of float64. v is scaled to
        # unit length first, away from float32's overflow and underflow. Error: rounding v/|v|
        # (u) plus a length-d float32 dot product in any summation order (γ_d = d·u/(1-d·u)),
        # times Σ|f_k||v_k| ≤ |f|·|v|; a 1% margin covers the float64 steps.
        d = self.dim
        gamma = d * _U32 / (1.0 - d * _U32)
        values = (self.x @ (v / norm).astype(np.float32)).astype(np.float64) * norm
        if not np.isfinite(values).all():  # float32 overflow: fall back to the exact product
            return self.dot(v), 0.0
        return values, 1.01 * (_U32 + gamma * (1.0 + _U32))

    def first_nonfinite(self) -> int | None:
        return _first_bad_row(self.x)


@dataclass(frozen=True)
class GradientEmbedding:
    """Factorised last-layer gradient embedding ``f_i = [g_i, g_i ⊗ e_i]``.

    ``g``: (n, C) gradient of the loss w.r.t. the logits; ``e``: (n, D) penultimate embedding.
    All products use ``f_i·f_j = (g_i·g_j)(1 + e_i·e_j)`` and
    ``f_i·v = g_i·(v_g + v_M e_i)``; memory stays O(n·(C + D)).
    """

    g: np.ndarray
    e: np.ndarray

    def __post_init__(self) -> None:
        if self.g.ndim != 2 or self.e.ndim != 2:
            raise DQInputError(f"gradient embedding needs 2-D g and e, got shapes {self.g.shape} and {self.e.shape}")
        if self.g.shape[0] != self.e.shape[0]:
            raise DQInputError(f"gradient embedding: g has {self.g.shape[0]} rows but e has {self.e.shape[0]}")

    @property
    def dim(self) -> int:
        c, d = self.g.shape[1], self.e.shape[1]
        return c + c * d

    def __len__(self) -> int:
        return self.g.shape[0]

    def _chunks(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        for s in range(0, len(self), _CHUNK):
            g = self.g[s : s + _CHUNK].astype(np.float64, copy=False)
            yield s, g, self.e[s : s + _CHUNK].astype(np.float64, copy=False)

    def take(self, idx: np.ndarray) -> GradientEmbedding:
        return GradientEmbedding(self.g[idx], self.e[idx])

    def compact(self) -> GradientEmbedding:
        # A coordinate e_k that is zero in every row zeroes the whole block g ⊗ e_k.
        used = _used_columns(self.e)
        return self if used.all() else GradientEmbedding(self.g, np.ascontiguousarray(self.e[:, used]))

    def scaled(self, a: np.ndarray) -> GradientEmbedding:
        # a·[g, g⊗e] = [a·g, (a·g)⊗e]: scaling g scales the whole row.
        g = self.g * np.asarray(a, dtype=np.float64)[:, None]
        return GradientEmbedding(g, self.e.astype(np.float64))

    def row(self, i: int) -> np.ndarray:
        g, e = self.g[i].astype(np.float64), self.e[i].astype(np.float64)
        return np.concatenate([g, np.outer(g, e).ravel()])

    def sq_norms(self) -> np.ndarray:
        out = np.empty(len(self))
        for s, g, e in self._chunks():
            out[s : s + len(g)] = np.einsum("ij,ij->i", g, g) * (1.0 + np.einsum("ij,ij->i", e, e))
        return out

    def approx_gram(self) -> tuple[np.ndarray, float]:
        # float64 rows of (g gᵀ)∘(1 + e eᵀ), stored as float32: one (chunk, n) float64 temporary
        # at a time. Error: float64 products (≤ (C+D+3)·u64 relative to Σ|g_ic g_jc|(1 + Σ|e_ik e_jk|),
        # which Cauchy–Schwarz bounds by |f_i||f_j|) plus the float32 rounding (u).
        g = self.g.astype(np.float64, copy=False)
        e = self.e.astype(np.float64, copy=False)
        n = len(self)
        out = np.empty((n, n), dtype=np.float32)
        step = max(1, 2**20 // n)  # float64 temporaries of at most 2^20 entries
        for s in range(0, n, step):
            k = e[s : s + step] @ e.T
            k += 1.0
            k *= g[s : s + step] @ g.T
            out[s : s + step] = k
        terms = g.shape[1] + e.shape[1] + 3
        return out, 1.01 * (_U32 + terms * 2.0**-53 / (1.0 - terms * 2.0**-53))

    def weighted_sum(self, w: np.ndarray) -> np.ndarray:
        if w.ndim == 2:
            return np.stack([self.weighted_sum(row) for row in w])
        c = self.g.shape[1]
        out = np.zeros(self.dim)
        for s, g, e in self._chunks():
            wg = g * w[s : s + len(g), None]
            out[:c] += wg.sum(axis=0)
            out[c:] += (wg.T @ e).ravel()
        return out

    def dot(self, v: np.ndarray) -> np.ndarray:
        if v.ndim == 2:
            return np.stack([self.dot(column) for column in v.T], axis=1)
        c = self.g.shape[1]
        vg, vm = v[:c], v[c:].reshape(c, self.e.shape[1])
        out = np.empty(len(self))
        for s, g, e in self._chunks():
            out[s : s + len(g)] = np.einsum("ic,ic->i", g, vg + e @ vm.T)
        return out

    def approx_dot(self, v: np.ndarray) -> tuple[np.ndarray, float]:
        return self.dot(v), 0.0

    def first_nonfinite(self) -> int | None:
        bad = [i for i in (_first_bad_row(self.g), _first_bad_row(self.e)) if i is not None]
        return min(bad) if bad else None


def as_rows(features: np.ndarray | FeatureRows) -> FeatureRows:
    """Wrap an array as :class:`DenseRows`; pass feature-row objects through."""
    if isinstance(features, (DenseRows, GradientEmbedding)):
        return features
    return DenseRows(np.asarray(features))


def checked_rows(features: np.ndarray | FeatureRows) -> FeatureRows:
    """:func:`as_rows`, rejecting empty features and NaN/inf (naming the first bad sample)."""
    rows = as_rows(features)
    if len(rows) == 0 or rows.dim == 0:
        raise DQInputError(f"features are empty ({len(rows)} samples of dimension {rows.dim})")
    bad = rows.first_nonfinite()
    if bad is not None:
        raise DQInputError(f"features: sample {bad} holds NaN or inf")
    return rows


def class_groups(labels: np.ndarray | None, n: int) -> tuple[np.ndarray | None, list[np.ndarray]]:
    """Sorted class labels and, per class, its sample indices in ascending order.

    ``labels=None`` gives one group of all ``n`` samples (classes None). Rejects a label count
    other than ``n``.
    """
    if labels is None:
        return None, [np.arange(n)]
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise DQInputError(f"labels: got {labels.size} labels of shape {labels.shape} for {n} samples")
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    return classes, np.split(order, np.cumsum(counts)[:-1])


def gradient_embedding(
    embeddings: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    num_classes: int | None = None,
    seed: int = 0,
) -> GradientEmbedding:
    """Last-layer gradient embedding under a seeded random linear head (reference stage 1).

    Head: ``z = W e + b`` with ``W, b ~ U(-1/√D, 1/√D)`` (torch ``nn.Linear``'s default init),
    drawn from ``np.random.default_rng(seed)``. Loss, as in DeepCore's ``calc_gradient``:
    cross-entropy applied to ``p = softmax(z)`` (softmax twice), ``ℓ = -log softmax(p)_y``. With
    ``q = softmax(p)`` and ``r = q - onehot(y)``:

        g = ∂ℓ/∂z = J_softmax(z)ᵀ r = p ⊙ r - p (p · r)

    Targets ``y`` are the given labels (DeepCore uses the dataset's true labels while selecting),
    or the head's predicted class ``argmax z`` when ``labels`` is None. DeepCore's per-batch mean
    scales each g by 1/batch; cosine similarity ignores that scale, so g is the per-sample gradient.

    ``num_classes`` defaults to ``labels.max() + 1``; it is required without labels.
    Returns ``GradientEmbedding(g float32 (n, C), e = embeddings)``.
    """
    e = np.asarray(embeddings)
    if e.ndim != 2 or e.shape[0] == 0:
        raise DQInputError(f"embeddings must be a non-empty 2-D (n, D) array, got shape {e.shape}")
    bad = _first_bad_row(e)
    if bad is not None:
        raise DQInputError(f"embeddings: sample {bad} holds NaN or inf")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (e.shape[0],):
            raise DQInputError(f"labels: {labels.shape[0] if labels.ndim else 0} labels for {e.shape[0]} embeddings")
        if labels.min() < 0:
            bad = int(labels.argmin())
            raise DQInputError(f"labels must be non-negative class indices, sample {bad} has {labels[bad]}")
        num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
        if labels.max() >= num_classes:
            raise DQInputError(f"label {labels.max()} is out of range for num_classes={num_classes}")
    if num_classes is None or num_classes < 1:
        raise DQInputError(f"num_classes must be a positive int (required without labels), got {num_classes}")

    d = e.shape[1]
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(d)
    w = rng.uniform(-bound, bound, size=(num_classes, d))
    b = rng.uniform(-bound, bound, size=num_classes)

    g = np.empty((e.shape[0], num_classes), dtype=np.float32)
    for s in range(0, e.shape[0], _CHUNK):
        z = e[s : s + _CHUNK].astype(np.float64) @ w.T + b
        p = _softmax(z)
        y = labels[s : s + _CHUNK] if labels is not None else z.argmax(axis=1)
        r = _softmax(p)
        r[np.arange(len(y)), y] -= 1.0
        g[s : s + _CHUNK] = p * r - p * np.einsum("ic,ic->i", p, r)[:, None]
    return GradientEmbedding(g, e)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)
