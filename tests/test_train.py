"""Stage 6: evaluation architectures and training on real Fashion-MNIST."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dq_ops.errors import DQInputError
from dq_ops.models import DEFAULT_MODEL, MODEL_NAMES, build_model
from dq_ops.readers.idx import load_fashion_mnist
from dq_ops.train import (
    TrainConfig,
    augment,
    split_validation,
    train_and_evaluate,
    training_steps,
)

# A short budget for the tests that check plumbing rather than accuracy.
TINY = TrainConfig(epochs=1, min_steps=4)


@pytest.fixture(scope="module")
def fashion():
    """(train images, train labels, test images, test labels) of the real Fashion-MNIST."""
    return (*load_fashion_mnist("train"), *load_fashion_mnist("test"))


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_every_model_maps_images_to_class_logits(name, channels, size):
    model = build_model(name, channels, 7, size)
    assert model(torch.zeros(2, channels, size, size)).shape == (2, 7)


def test_default_cnn_has_tens_of_thousands_of_parameters():
    params = sum(p.numel() for p in build_model("small_cnn", 1, 10, 28).parameters())
    assert 10_000 <= params <= 100_000


def test_default_network_is_medium_cnn_with_a_hundred_thousand_parameters():
    assert DEFAULT_MODEL == "medium_cnn"
    params = sum(p.numel() for p in build_model(DEFAULT_MODEL, 1, 10, 28).parameters())
    assert 100_000 <= params <= 300_000


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(DQInputError, match="unknown model 'vgg'.*medium_cnn.*small_cnn.*resnet18.*vit_tiny"):
        build_model("vgg", 1, 10, 28)


def test_validation_split_is_disjoint_stratified_and_seeded():
    labels = np.repeat(np.arange(5), [100, 50, 20, 3, 1])
    train, val = split_validation(labels, 0.2, seed=3)
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.union1d(train, val), np.arange(len(labels)))
    # floor(0.2·n_c + 0.5), leaving every class at least one training sample.
    assert np.bincount(labels[val], minlength=5).tolist() == [20, 10, 4, 1, 0]
    again_train, again_val = split_validation(labels, 0.2, seed=3)
    assert np.array_equal(again_val, val) and np.array_equal(again_train, train)
    assert not np.array_equal(split_validation(labels, 0.2, seed=4)[1], val)


def test_budget_gives_tiny_subsets_min_steps_and_large_ones_epochs():
    config = TrainConfig(epochs=30, min_steps=500, max_steps=2000, batch_size=128)
    assert training_steps(540, config) == 500
    assert training_steps(5400, config) == 1266  # ceil(30 · 5400 / 128)
    assert training_steps(54000, config) == 2000
    assert training_steps(40, config) == 500  # batch shrinks to the 40 images


def test_augment_crops_a_shifted_copy_and_flips():
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6) + 1
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(augment(images, 0, False, generator), images)
    out = augment(images, 2, False, generator)
    assert out.shape == images.shape
    for original, cropped in zip(images, out):
        padded = torch.nn.functional.pad(original, (2, 2, 2, 2))
        windows = [padded[:, y:y + 6, x:x + 6] for y in range(5) for x in range(5)]
        assert any(torch.equal(cropped, w) for w in windows)
    flips = [augment(images, 0, True, generator) for _ in range(20)]
    assert all(torch.equal(f[i], images[i]) or torch.equal(f[i], images[i].flip(2)) for f in flips for i in range(2))
    assert any(torch.equal(f[0], images[0].flip(2)) for f in flips)


def test_same_seed_gives_identical_results_and_leaves_global_rng_alone(fashion):
    images, labels, test_images, test_labels = fashion
    subset = np.arange(0, 60_000, 60)  # 1,000 images
    state = torch.get_rng_state()
    runs = [train_and_evaluate(images[subset], labels[subset], test_images[:1000], test_labels[:1000],
                               config=TINY, seed=7) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state)
    timing = {"train_seconds", "samples_per_second"}
    first, second = ({k: v for k, v in dataclasses.asdict(r).items() if k not in timing} for r in runs)
    assert first == second
    assert (first["n_train"], first["n_val"], first["n_test"]) == (899, 101, 1000)  # floor(0.1·n_c + 0.5) per class
    assert first["steps"] == 8 and first["batch_size"] == 128  # ceil(1 epoch · 899 / 128) > min_steps


def test_progress_is_reported_after_every_step(fashion):
    images, labels, test_images, test_labels = fashion
    calls = []
    result = train_and_evaluate(images[:100], labels[:100], test_images[:100], test_labels[:100],
                                model="vit_tiny", config=TINY, progress=lambda step, total: calls.append((step, total)))
    assert result.steps == 4 and result.batch_size == result.n_train  # min_steps; batch shrinks to the subset
    assert calls == [(step, 4) for step in range(1, 5)]
    assert 0.0 <= result.test_accuracy <= 1.0 and result.val_accuracy is not None


def test_rgb_nhwc_input_and_empty_validation(fashion):
    images, labels, test_images, test_labels = fashion
    rgb = np.repeat(images[:200, :, :, None], 3, axis=3)
    rgb_test = np.repeat(test_images[:50, :, :, None], 3, axis=3)
    result = train_and_evaluate(rgb, labels[:200], rgb_test, test_labels[:50],
                                config=dataclasses.replace(TINY, val_fraction=0.0))
    assert result.val_accuracy is None and result.n_val == 0 and result.n_train == 200


@pytest.mark.parametrize("change, message", [
    (dict(model="lenet"), "unknown model 'lenet'"),
    (dict(images=np.zeros((0, 28, 28), np.uint8), labels=np.zeros(0, np.int64)), "training subset is empty"),
    (dict(labels=np.zeros(9, np.int64)), r"training subset: 10 images but labels of shape \(9,\)"),
    (dict(test_labels=np.zeros(4, np.int64)), r"test split: 5 images but labels"),
    (dict(images=np.zeros((10, 28, 28), np.float32)), "expected uint8"),
    (dict(test_images=np.zeros((5, 32, 32), np.uint8)), "test images"),
    (dict(images=np.zeros((10, 28, 20), np.uint8)), "square"),
    (dict(num_classes=2), "out of range for num_classes=2"),
])
def test_bad_input_names_the_problem(change, message):
    rng = np.random.default_rng(0)
    args = dict(images=rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), labels=np.arange(10) % 3,
                test_images=rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), test_labels=np.arange(5) % 3)
    kwargs = {"config": TINY}
    for key, value in change.items():
        (args if key in args else kwargs)[key] = value
    with pytest.raises(DQInputError, match=message):
        train_and_evaluate(args["images"], args["labels"], args["test_images"], args["test_labels"], **kwargs)


def test_bad_config_is_rejected():
    with pytest.raises(DQInputError, match="val_fraction"):
        TrainConfig(val_fraction=1.0)


def test_full_training_set_reaches_85_percent(fashion):
    """``small_cnn`` on all 60k images (54k after the validation split), 2 epochs (the default
    ``medium_cnn``'s 90% after 3 epochs is measured by bench/network.py).

    Measured: 86.4% test, 87.4% validation (2 threads; 86.8% / 87.3% with 1 thread); 844 steps,
    13 s of training on 2 idle cores, ~60 s on one core of a busy machine.
    """
    images, labels, test_images, test_labels = fashion
    result = train_and_evaluate(images, labels, test_images, test_labels, model="small_cnn", config=TrainConfig(epochs=2), seed=0)
    assert result.test_accuracy >= 0.85, result
    assert result.val_accuracy >= 0.85, result
