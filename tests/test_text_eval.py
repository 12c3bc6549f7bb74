"""Stage 6 for text: nearest-centroid and logistic-regression checks on the real fortunes corpus."""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np
import pytest

from dq_ops.errors import DQInputError
from dq_ops.text_eval import (
    evaluate_text_subset,
    logistic_regression_accuracy,
    nearest_centroid_accuracy,
)

FORTUNES = Path("/usr/share/games/fortunes")
TOPICS = ("computers", "politics", "zippy", "startrek", "law", "food")
HASH_DIM = 512


def _hashed_bag_of_words(text: str) -> np.ndarray:
    """log(1 + count) of lower-case words hashed (CRC-32, stable across processes) into HASH_DIM slots."""
    counts = np.zeros(HASH_DIM)
    for word in re.findall(r"[a-z']+", text.lower()):
        counts[zlib.crc32(word.encode()) % HASH_DIM] += 1
    return np.log1p(counts)


@pytest.fixture(scope="module")
def fortunes():
    """(embeddings, topic labels) of every entry of TOPICS; the file name is the label."""
    texts, labels = [], []
    for label, topic in enumerate(TOPICS):
        raw = (FORTUNES / topic).read_text(encoding="utf-8", errors="replace")
        entries = [e.strip() for e in re.split(r"^%$", raw, flags=re.MULTILINE) if e.strip()]
        texts += entries
        labels += [label] * len(entries)
    return np.stack([_hashed_bag_of_words(t) for t in texts]), np.array(labels)


def test_a_subset_of_real_fortunes_predicts_held_out_topics(fortunes):
    embeddings, labels = fortunes
    order = np.random.default_rng(0).permutation(len(labels))
    held_out, subset = order[:800], order[800:1800]
    result = evaluate_text_subset(embeddings[subset], labels[subset], embeddings[held_out], labels[held_out])
    majority = np.bincount(labels[held_out]).max() / len(held_out)
    assert result.n_train == 1000 and result.n_test == 800 and result.n_train_classes == len(TOPICS)
    assert result.nearest_centroid_accuracy > majority + 0.05, (result, majority)
    assert result.logistic_regression_accuracy > majority + 0.1, (result, majority)
    again = evaluate_text_subset(embeddings[subset], labels[subset], embeddings[held_out], labels[held_out])
    assert again == result


def test_separable_clusters_are_classified_perfectly():
    rng = np.random.default_rng(0)
    centres = 10 * np.eye(4, 16)
    labels = np.repeat(np.arange(4), 30)
    points = centres[labels] + rng.normal(size=(120, 16))
    train, test = np.arange(0, 120, 2), np.arange(1, 120, 2)
    assert nearest_centroid_accuracy(points[train], labels[train], points[test], labels[test]) == 1.0
    assert logistic_regression_accuracy(points[train], labels[train], points[test], labels[test]) == 1.0


def test_classes_missing_from_the_subset_count_as_errors():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 20)
    points = 10 * np.eye(3, 8)[labels] + rng.normal(size=(60, 8))
    subset = labels < 2  # the subset lacks class 2; a third of the held-out set is then wrong
    result = evaluate_text_subset(points[subset], labels[subset], points, labels)
    assert result.nearest_centroid_accuracy == pytest.approx(2 / 3)
    assert result.logistic_regression_accuracy == pytest.approx(2 / 3)
    assert result.n_train_classes == 2
    one_class = labels == 0
    assert logistic_regression_accuracy(points[one_class], labels[one_class], points, labels) == pytest.approx(1 / 3)


@pytest.mark.parametrize("train, train_labels, test, message", [
    (np.zeros((0, 4)), np.zeros(0, int), np.zeros((3, 4)), "training subset is empty"),
    (np.zeros((5, 4)), np.zeros(4, int), np.zeros((3, 4)), r"training subset: 5 embeddings but labels of shape \(4,\)"),
    (np.zeros((5, 4)), np.zeros(5, int), np.zeros((3, 6)), "4 dimensions but held-out ones 6"),
    (np.zeros(5), np.zeros(5, int), np.zeros((3, 4)), "must be 2-D"),
    (np.full((5, 4), np.nan), np.zeros(5, int), np.zeros((3, 4)), "NaN"),
])
def test_bad_input_names_the_problem(train, train_labels, test, message):
    with pytest.raises(DQInputError, match=message):
        evaluate_text_subset(train, train_labels, test, np.zeros(len(test), int))
