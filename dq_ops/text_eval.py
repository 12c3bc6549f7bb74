"""Stage 6 for text: a cheap downstream check of a selected subset of a labelled text corpus.

Given sentence embeddings and topic labels of the training subset and of a held-out labelled
set, fit two classifiers on the subset and report their accuracy on the held-out set:

- nearest centroid (cosine): rows are L2-normalised, each class's centroid is the mean of its
  normalised rows, and a test row takes the class of the centroid with the largest cosine.
- multinomial logistic regression: features standardised with the subset's mean and standard
  deviation; weights W (d × k) and bias b minimise
  ``(1/n) Σ_i CE(softmax(x_i W + b), y_i) + (l2 / 2n) ‖W‖²`` (bias unpenalised; ``l2 = 1`` is
  scikit-learn's default ``C = 1``), from zero, with L-BFGS in float64 (deterministic).

Both classifiers know only the classes present in the subset: held-out samples of a class the
subset lacks count as errors, which is the point of measuring a subset's coverage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

from dq_ops.errors import DQInputError


@dataclass(frozen=True)
class TextEvalResult:
    """Held-out accuracies (fractions in [0, 1]) of classifiers fitted on a subset's embeddings."""

    nearest_centroid_accuracy: float
    logistic_regression_accuracy: float
    n_train: int
    n_test: int
    n_train_classes: int  # classes present in the subset


def _check(embeddings: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    embeddings = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(labels)
    if embeddings.ndim != 2:
        raise DQInputError(f"{what}: embeddings must be 2-D (n, d), got shape {embeddings.shape}")
    if labels.shape != (len(embeddings),):
        raise DQInputError(f"{what}: {len(embeddings)} embeddings but labels of shape {labels.shape}")
    if len(embeddings) == 0:
        raise DQInputError(f"{what} is empty")
    if not np.isfinite(embeddings).all():
        raise DQInputError(f"{what}: embeddings contain NaN or infinite values")
    return embeddings, labels


def _check_pair(train_embeddings: np.ndarray, train_labels: np.ndarray, test_embeddings: np.ndarray,
                test_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = _check(train_embeddings, train_labels, "training subset")
    xt, yt = _check(test_embeddings, test_labels, "held-out set")
    if x.shape[1] != xt.shape[1]:
        raise DQInputError(f"training embeddings have {x.shape[1]} dimensions but held-out ones {xt.shape[1]}")
    return x, y, xt, yt


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def nearest_centroid_accuracy(train_embeddings: np.ndarray, train_labels: np.ndarray,
                              test_embeddings: np.ndarray, test_labels: np.ndarray) -> float:
    """Held-out accuracy of the cosine nearest-centroid classifier fitted on the subset."""
    x, y, xt, yt = _check_pair(train_embeddings, train_labels, test_embeddings, test_labels)
    classes, codes = np.unique(y, return_inverse=True)
    unit = _unit_rows(x)
    centroids = np.stack([unit[codes == c].mean(axis=0) for c in range(len(classes))])
    scores = _unit_rows(xt) @ _unit_rows(centroids).T
    return float(np.mean(classes[scores.argmax(axis=1)] == yt))


def logistic_regression_accuracy(train_embeddings: np.ndarray, train_labels: np.ndarray,
                                 test_embeddings: np.ndarray, test_labels: np.ndarray,
                                 *, l2: float = 1.0, max_iter: int = 500) -> float:
    """Held-out accuracy of L2-regularised multinomial logistic regression fitted on the subset."""
    x, y, xt, yt = _check_pair(train_embeddings, train_labels, test_embeddings, test_labels)
    if l2 < 0:
        raise DQInputError(f"l2 must be >= 0, got {l2}")
    classes, codes = np.unique(y, return_inverse=True)
    if len(classes) == 1:
        return float(np.mean(yt == classes[0]))
    mean, std = x.mean(axis=0), x.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # constant features carry no information, keep them at 0
    x, xt = (x - mean) / std, (xt - mean) / std
    n, d = x.shape
    k = len(classes)
    onehot = np.eye(k)[codes]

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:d * k].reshape(d, k), theta[d * k:]
        logits = x @ w + b
        log_norm = logsumexp(logits, axis=1, keepdims=True)
        loss = float(np.sum(log_norm - np.sum(logits * onehot, axis=1, keepdims=True))) / n
        residual = (np.exp(logits - log_norm) - onehot) / n
        grad_w = x.T @ residual + (l2 / n) * w
        loss += 0.5 * (l2 / n) * float(np.sum(w * w))
        return loss, np.concatenate([grad_w.ravel(), residual.sum(axis=0)])

    fit = minimize(objective, np.zeros(d * k + k), jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    w, b = fit.x[:d * k].reshape(d, k), fit.x[d * k:]
    return float(np.mean(classes[(xt @ w + b).argmax(axis=1)] == yt))


def evaluate_text_subset(train_embeddings: np.ndarray, train_labels: np.ndarray,
                         test_embeddings: np.ndarray, test_labels: np.ndarray,
                         *, l2: float = 1.0) -> TextEvalResult:
    """Both classifiers fitted on the subset (embeddings (n, d), labels (n,)), scored on the held-out set."""
    x, y, xt, yt = _check_pair(train_embeddings, train_labels, test_embeddings, test_labels)
    return TextEvalResult(
        nearest_centroid_accuracy=nearest_centroid_accuracy(x, y, xt, yt),
        logistic_regression_accuracy=logistic_regression_accuracy(x, y, xt, yt, l2=l2),
        n_train=len(x), n_test=len(xt), n_train_classes=len(np.unique(y)),
    )
