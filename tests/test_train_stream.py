"""Evaluation training streamed from a real Zarr store: the block-shuffled epoch order, the
store path against the in-memory path, and reads bounded by the shuffle window."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dq_ops.config import EvaluationConfig
from dq_ops.stages import EvaluateStage, TrainJob, run_training, train_config
from dq_ops.store import Store, write_array
from dq_ops.train import train_and_evaluate
from dq_ops.train_data import BLOCKS_PER_WINDOW, ZarrRows, epoch_windows

N_TRAIN, N_TEST, CHUNK_ROWS = 1200, 300, 100
TIMING = {"train_seconds", "samples_per_second"}
# Two epochs and a bit of the third over the 539 training images of the subset (batch 128: 4 per epoch).
EVALUATION = EvaluationConfig(architecture="small_cnn", epochs=1, min_steps=10)
# 0.2 MiB of 28×28 images: 267 rows, less than the subset's 539 training images.
SMALL_WINDOW_MB = 0.2


@pytest.fixture(scope="module")
def fashion() -> dict[str, np.ndarray]:
    from dq_ops.readers.idx import load_fashion_mnist

    train_images, train_labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    return {"images": train_images[:N_TRAIN, ..., None], "labels": train_labels[:N_TRAIN],
            "test_images": test_images[:N_TEST, ..., None], "test_labels": test_labels[:N_TEST],
            "indices": np.sort(np.random.default_rng(0).choice(N_TRAIN, 600, replace=False))}


@pytest.fixture(scope="module")
def store(tmp_path_factory, fashion) -> Store:
    """A dataset in the ingest layout (chunks of 100 rows), a subset of half its rows, and a
    reconstructions artifact of the subset (its images mirrored, standing in for the MAE's)."""
    store = Store(str(tmp_path_factory.mktemp("stream") / "store"))
    with store.write("datasets", "data", {"source": "test"}) as group:
        group.attrs["class_names"] = [str(c) for c in range(10)]
        for split, images, labels in (("train", fashion["images"], fashion["labels"]),
                                      ("test", fashion["test_images"], fashion["test_labels"])):
            arrays = group.create_group(split)
            write_array(arrays, "images", images, chunk_rows=CHUNK_ROWS)
            write_array(arrays, "labels", labels.astype(np.int64), chunk_rows=CHUNK_ROWS)
            write_array(arrays, "ids", np.array([f"{split}:{i}" for i in range(len(labels))]), chunk_rows=CHUNK_ROWS)
    indices = fashion["indices"]
    with store.write("subsets", "half", {"ratio": 0.5}) as group:
        write_array(group, "indices", indices)
        write_array(group, "ids", np.array([f"train:{i}" for i in indices]))
    with store.write("reconstructions", "mirrored", {"subset": "half"}) as group:
        write_array(group, "images", fashion["images"][indices][:, :, ::-1], chunk_rows=CHUNK_ROWS)
    return store


def _without_timing(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in TIMING}


@pytest.mark.parametrize("n, window", [(1, 128), (500, 500), (501, 500), (5000, 300), (1000, 128), (130, 128)])
def test_every_position_once_per_epoch_in_windows_no_larger_than_the_window(n, window):
    windows = epoch_windows(n, window, torch.Generator().manual_seed(5))
    assert all(len(w) <= window for w in windows)
    assert torch.equal(torch.sort(torch.cat(windows)).values, torch.arange(n))
    again = epoch_windows(n, window, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(windows, again)) and len(windows) == len(again)
    if n > window:  # each window is whole blocks of consecutive positions, drawn from all over
        block = -(-window // BLOCKS_PER_WINDOW)
        starts = [sorted({int(p) // block for p in w}) for w in windows]
        assert sum(map(len, starts)) == -(-n // block)
        assert all(len(s) == window // block for s in starts[:-1])


def test_a_training_part_that_fits_gets_the_exact_permutation():
    generator, reference = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    (window,) = epoch_windows(900, 900, generator)
    assert torch.equal(window, torch.randperm(900, generator=reference))
    assert torch.equal(torch.rand(4, generator=generator), torch.rand(4, generator=reference))  # same draws after


def test_block_shuffle_changes_with_the_seed_and_the_epoch():
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.cat(epoch_windows(2000, 256, generator)) for _ in range(2))
    other_seed = torch.cat(epoch_windows(2000, 256, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, second) and not torch.equal(first, other_seed)


@pytest.mark.parametrize("arm", ["full", "subset", "reconstructions"])
def test_store_path_equals_the_in_memory_path_when_the_window_holds_the_training_part(store, fashion, arm):
    dataset = store.open("datasets", "data")
    subset = None if arm == "full" else store.open("subsets", "half")
    images = store.open("reconstructions", "mirrored") if arm == "reconstructions" else None
    artifact = EvaluateStage(store, dataset, subset, EVALUATION, seed=2, images=images).run()
    assert "shuffle_window_rows" not in artifact.params  # the default window holds it: no effect, not in the key
    rows = np.arange(N_TRAIN) if subset is None else fashion["indices"]
    pixels = fashion["images"][rows][:, :, ::-1] if images is not None else fashion["images"][rows]
    in_memory = train_and_evaluate(pixels, fashion["labels"][rows], fashion["test_images"], fashion["test_labels"],
                                   model="small_cnn", num_classes=10, config=train_config(EVALUATION), seed=2)
    stored = {k: v for k, v in artifact.group.attrs.items() if k != "dq"}
    assert _without_timing(stored) == _without_timing(dataclasses.asdict(in_memory))


class CountingRows(ZarrRows):
    """A store-backed source that records how many rows each read asked for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads: list[int] = []

    def read(self, positions: np.ndarray) -> np.ndarray:
        self.reads.append(len(positions))
        return super().read(positions)


def test_a_subset_larger_than_the_window_streams_in_windows_deterministically(store, fashion):
    dataset = store.open("datasets", "data")
    subset = store.open("subsets", "half")
    config = EVALUATION.model_copy(update={"shuffle_window_mb": SMALL_WINDOW_MB})
    window = train_config(config).window_rows((28, 28, 1))
    assert window == 267
    stage = EvaluateStage(store, dataset, subset, config, seed=2)
    assert stage.params()["shuffle_window_rows"] == window  # it changes the order, so it is in the key
    assert stage.name() != EvaluateStage(store, dataset, subset, config.model_copy(update={"shuffle_window_mb": 0.3}), seed=2).name()
    assert stage.name() != EvaluateStage(store, dataset, subset, EVALUATION, seed=2).name()

    job = TrainJob(store.url, {}, "data", "half", None, config, seed=2)
    first, second = run_training(job), run_training(job)
    assert _without_timing(first) == _without_timing(second)
    n_train = first["n_train"]  # 539: 61 of the 600 held out for validation (per-class rounding)
    assert first["steps"] == 10 and first["batch_size"] == 128 and 0.0 <= first["test_accuracy"] <= 1.0

    # Reads: training windows of at most the window's rows, statistics and validation in
    # evaluation batches (100 here: the default 1,024 would read this small subset whole).
    source = CountingRows(dataset["train/images"], fashion["indices"])
    train_and_evaluate(source, fashion["labels"][fashion["indices"]], ZarrRows(dataset["test/images"]),
                       fashion["test_labels"], model="small_cnn", num_classes=10, seed=2,
                       config=dataclasses.replace(train_config(config), eval_batch_size=100))
    assert max(source.reads) <= window
    # 4 batches an epoch: epochs 1 and 2 read every training row in windows; epoch 3 (steps 9-10) its first window.
    # Statistics (the training rows, 100 at a time), the training windows, validation (61 rows).
    statistics = -(-n_train // 100)
    assert sum(source.reads[:statistics]) == n_train and source.reads[-1] == 600 - n_train
    # 10 steps of 128 over 3 epochs, each window read once when its first batch needs it: at least
    # the rows trained on, at most 2 epochs of rows and one window (no window read twice an epoch).
    training = source.reads[statistics:-1]
    assert len(training) >= 5 and 10 * 128 <= sum(training) <= 2 * n_train + window
