"""Bin galleries on real data: real GraphCut bins of Fashion-MNIST and of fortunes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dq_ops.bins import generate_bins
from dq_ops.errors import DQInputError
from dq_ops.gallery import gallery_picks, image_gallery, text_gallery
from dq_ops.readers.idx import load_fashion_mnist

NUM_BINS = 4


def bin_assignment(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    bin_of_sample = np.empty(len(labels), dtype=np.int32)
    for b, members in enumerate(generate_bins(features, labels, NUM_BINS)):
        bin_of_sample[members] = b
    return bin_of_sample


@pytest.fixture(scope="module")
def fashion():
    images, labels = load_fashion_mnist("test")
    images, labels = images[:600], labels[:600]
    return images, labels, bin_assignment(images.reshape(len(images), -1).astype(np.float32), labels)


def test_picks_come_from_their_class_and_bin_and_follow_the_seed(fashion):
    _, labels, bin_of_sample = fashion
    picks = gallery_picks(bin_of_sample, labels, [0, 7], per_bin=5, seed=3)
    assert set(picks) == {(c, b) for c in (0, 7) for b in range(NUM_BINS)}
    for (cls, b), members in picks.items():
        assert len(members) == 5 and len(set(members)) == 5
        assert (labels[members] == cls).all() and (bin_of_sample[members] == b).all()
    again = gallery_picks(bin_of_sample, labels, [0, 7], per_bin=5, seed=3)
    assert all(np.array_equal(picks[k], again[k]) for k in picks)
    other = gallery_picks(bin_of_sample, labels, [0, 7], per_bin=5, seed=4)
    assert any(not np.array_equal(picks[k], other[k]) for k in picks)


def test_picks_by_chunk_come_from_few_chunks(fashion):
    """Drawn chunk by chunk (chunks of 50 rows), every group's picks still come from their class
    and bin, follow the seed, and lie in far fewer chunks than a uniform draw's."""
    _, labels, bin_of_sample = fashion
    classes = list(range(10))
    uniform = gallery_picks(bin_of_sample, labels, classes, per_bin=3, seed=1)
    by_chunk = gallery_picks(bin_of_sample, labels, classes, per_bin=3, seed=1, chunk_rows=50)
    assert by_chunk.keys() == uniform.keys()
    for (cls, b), members in by_chunk.items():
        assert len(members) == len(uniform[(cls, b)]) and len(set(members)) == len(members)
        assert (labels[members] == cls).all() and (bin_of_sample[members] == b).all()
    chunks = {name: len(np.unique(np.concatenate(list(p.values())) // 50)) for name, p in (("uniform", uniform), ("by chunk", by_chunk))}
    assert chunks["by chunk"] <= chunks["uniform"] // 2, chunks
    again = gallery_picks(bin_of_sample, labels, classes, per_bin=3, seed=1, chunk_rows=50)
    assert all(np.array_equal(by_chunk[k], again[k]) for k in by_chunk)


def test_image_gallery_shows_each_bin_as_a_row_of_its_own_samples(fashion):
    images, labels, bin_of_sample = fashion
    png = image_gallery(images, bin_of_sample, labels, [1, 8], ["t-shirt", "trouser"] + [str(i) for i in range(2, 10)],
                        per_bin=4, scale=2, seed=0)
    canvas = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    # Layout of image_gallery: 52 px of bin labels, 18 px of class header, 56 px tiles, 2 px gaps,
    # 12 px between class blocks.
    assert canvas.shape == (18 + NUM_BINS * 58, 52 + 2 * (4 * 58 + 12), 3)
    picks = gallery_picks(bin_of_sample, labels, [1, 8], per_bin=4, seed=0)
    for c, cls in enumerate((1, 8)):
        for b in range(NUM_BINS):
            for k, index in enumerate(picks[(cls, b)]):
                top, left = 18 + b * 58, 52 + c * (4 * 58 + 12) + k * 58
                tile = canvas[top:top + 56:2, left:left + 56:2, 0]
                assert np.array_equal(tile, images[index])


def test_text_gallery_lists_records_per_bin():
    texts = [entry.strip() for entry in Path("/usr/share/games/fortunes/fortunes").read_text(errors="replace").split("\n%\n")]
    texts = [t for t in texts if t][:200]
    rng = np.random.default_rng(0)
    features = rng.random((len(texts), 16)).astype(np.float32) + np.array([len(t) for t in texts])[:, None] / 100
    bin_of_sample = bin_assignment(features, np.zeros(len(texts), dtype=np.int64))
    rows = text_gallery(texts, bin_of_sample, None, [-1], per_bin=2, max_chars=60)
    assert [row["bin"] for row in rows] == [b for b in range(NUM_BINS) for _ in range(2)]
    picks = gallery_picks(bin_of_sample, None, [-1], per_bin=2)
    for row, index in zip(rows, np.concatenate([picks[(-1, b)] for b in range(NUM_BINS)])):
        whole = " ".join(texts[index].split())
        assert row["example"] == whole or (len(row["example"]) == 60 and row["example"][:-1] == whole[:59])


def test_mismatched_lengths_are_refused(fashion):
    images, labels, bin_of_sample = fashion
    with pytest.raises(DQInputError, match="600 bin assignments"):
        image_gallery(images[:10], bin_of_sample, labels, [0])


def test_bin_size_plot_stacks_each_class_in_proportion():
    from tasks.report import _BIN_COLOURS, bin_size_plot, bin_size_rows

    rows = bin_size_rows([0, 1], [[30, 10], [10, 0]], ["coat", "bag"])
    image = np.asarray(Image.open(io.BytesIO(bin_size_plot(rows, width=400, height=300))).convert("RGB"))
    colours = [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in _BIN_COLOURS[:2]]

    def bar_heights(x: int) -> list[int]:
        return [int((image[:, x] == colour).all(axis=1).sum()) for colour in colours]

    left, right = 60, 400 - 10
    coat, bag = bar_heights(left + (right - left) // 4), bar_heights(left + 3 * (right - left) // 4)
    assert abs(coat[0] - 3 * coat[1]) <= 2 and bag[1] == 0
    assert abs(coat[0] - 3 * bag[0]) <= 2 and coat[0] + coat[1] > 200  # the tallest bar spans the plot
