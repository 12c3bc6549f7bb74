"""Stages 4-5 as chunked dask work on a real 2-process LocalCluster: patch dropping, MAE training
on a worker, reconstruction, chunk-wise reports, and resuming an interrupted run."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from distributed import Client

from dq_ops.cluster import dask_client
from dq_ops.config import ClusterConfig, EmbeddingConfig, PatchConfig
from dq_ops.mae_store import load_mae_artifact
from dq_ops.patch_store import PatchStore, storage_report, unpack_patches, whole_image_bytes
from dq_ops.patches import patchify, pixel_mask
from dq_ops.pixels import DropPatchesStage, MAEStage, ReconstructStage
from dq_ops.readers.idx import load_fashion_mnist
from dq_ops.reconstruction_quality import baseline_fill, reconstruction_psnr
from dq_ops.store import Store, write_array
from tests.dask_helpers import Interrupted, wait_until_idle

N_IMAGES, SUBSET, CHUNK_ROWS = 240, 96, 16  # 6 chunks
PARAMS = PatchConfig(cam_image_size=64, mae_epochs=1, mae_train_samples=128, chunk_rows=CHUNK_ROWS)


@pytest.fixture(scope="module")
def client() -> Client:
    with dask_client(ClusterConfig(kind="local", n_workers=2, threads_per_worker=1)) as client:
        yield client


@pytest.fixture(scope="module")
def fashion() -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_fashion_mnist("train")
    return images[:N_IMAGES, ..., None], labels[:N_IMAGES]


def _store(root, fashion) -> Store:
    """A dataset in the ingest layout and a subset of every other-but-some row of it."""
    images, labels = fashion
    store = Store(str(root))
    with store.write("datasets", "data", {"source": "test"}) as group:
        split = group.create_group("train")
        write_array(split, "images", images, chunk_rows=50)
        write_array(split, "labels", labels, chunk_rows=50)
        write_array(split, "ids", np.array([f"train:{i}" for i in range(N_IMAGES)]), chunk_rows=50)
    indices = np.sort(np.random.default_rng(0).choice(N_IMAGES, SUBSET, replace=False))
    with store.write("subsets", "sub", {"ratio": 0.4}) as group:
        write_array(group, "indices", indices)
        write_array(group, "ids", np.array([f"train:{i}" for i in indices]))
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory, fashion) -> Store:
    return _store(tmp_path_factory.mktemp("pixels"), fashion)


def _drop(store: Store) -> DropPatchesStage:
    return DropPatchesStage(store, store.open("datasets", "data"), store.open("subsets", "sub"), PARAMS, EmbeddingConfig())


@pytest.fixture(scope="module")
def patches(store, client):
    stage = _drop(store)
    return stage, stage.run(client=client)


def test_patch_dropping_runs_chunked_on_the_workers(patches, store, fashion):
    images, labels = fashion
    rows = store.open("subsets", "sub")["indices"][:]
    stage, artifact = patches
    assert stage.chunks_total == SUBSET // CHUNK_ROWS and stage.chunks_resumed == 0 and stage.work_done == SUBSET
    assert "done" not in artifact.group and "chunk_stats" not in artifact.group  # staging-only bookkeeping
    patch_store = PatchStore(artifact.group)
    assert len(patch_store) == SUBSET and patch_store.kept_per_image == 39 and patch_store.chunk_rows == CHUNK_ROWS
    packed = patch_store.read()
    # Every row holds its own image's pixels at exactly the kept grid positions, in subset order.
    expected = patchify(images[rows], 4)[packed.keep_mask.reshape(SUBSET, -1)]
    assert np.array_equal(packed.patches.reshape(expected.shape), expected)
    assert list(patch_store.ids[:]) == [f"train:{i}" for i in rows] and np.array_equal(patch_store.labels[:], labels[rows])
    # The whole-image reference summed over the workers' chunks is the one measured in one go.
    attrs = artifact.group.attrs
    in_one_go = storage_report(patch_store, whole_image_bytes(images[rows], CHUNK_ROWS))
    assert attrs["whole_image_bytes"] == in_one_go.whole_image_bytes
    assert attrs["stored_bytes"] == patch_store.stored_bytes() and attrs["byte_ratio"] < 1
    assert attrs["sample_keep_ratio"] == SUBSET / N_IMAGES


def test_mae_trains_on_a_worker_and_reconstruction_reports_from_chunk_sums(patches, store, client, fashion):
    dataset, patch_artifact = store.open("datasets", "data"), patches[1]
    mae = MAEStage(store, dataset, PARAMS, 0).run(client=client)
    assert len(mae["loss_history"][:]) == 1  # one epoch of 128 images at batch 128
    stage = ReconstructStage(store, dataset, patch_artifact, mae)
    result = stage.run(client=client)
    assert stage.chunks_total == SUBSET // CHUNK_ROWS
    restored = result["images"][:]
    rows = store.open("subsets", "sub")["indices"][:]
    original = fashion[0][rows]
    zero_filled, keep = unpack_patches(PatchStore(patch_artifact.group).read())
    kept = pixel_mask(keep, 4)[..., None]
    assert restored.shape == original.shape and np.array_equal(np.where(kept, restored, 0), zero_filled)
    attrs = result.group.attrs
    assert "done" not in result.group and "chunk_stats" not in result.group
    assert attrs["psnr_mae_db"] == pytest.approx(reconstruction_psnr(original, restored, keep), rel=1e-9)
    assert attrs["psnr_mean_fill_db"] == pytest.approx(
        reconstruction_psnr(original, baseline_fill(original, keep, "mean"), keep), rel=1e-9)
    assert attrs["psnr_zero_fill_db"] == pytest.approx(
        reconstruction_psnr(original, baseline_fill(original, keep, "zero"), keep), rel=1e-9)
    assert result["preview_png"][:8].tobytes() == b"\x89PNG\r\n\x1a\n"
    assert list(result["ids"][:]) == [f"train:{i}" for i in rows]
    assert load_mae_artifact(mae).config.patch_size == 4


def test_an_interrupted_patch_run_resumes_bit_for_bit(tmp_path, fashion, patches, client):
    store = _store(tmp_path, fashion)

    def interrupt_after_first_chunk(done: int, total: int) -> None:
        if done >= 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        _drop(store).run(client=client, progress=interrupt_after_first_chunk)
    wait_until_idle(client)
    key = patches[1].name
    assert not store.exists("patches", key)
    done_before = int(zarr.open_group(f"{tmp_path}/patches/.staging/{key}", mode="r")["done"][:].sum())
    assert 1 <= done_before < SUBSET // CHUNK_ROWS

    stage = _drop(store)
    resumed = stage.run(client=client)
    assert stage.chunks_resumed == done_before and stage.work_done == SUBSET - done_before * CHUNK_ROWS
    assert resumed.name == key
    assert resumed.record["content_digest"] == patches[1].record["content_digest"]
