"""Stage 4: patch geometry, Grad-CAM++ on the pretrained backbone, patch selection and the
compact patch store, on real Fashion-MNIST and real Zarr stores (local directory and memory)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from dq_ops.errors import DQInputError
from dq_ops.gradcam import gradcam_plus_plus, patch_scores
from dq_ops.patch_store import (
    PatchStore,
    pack_patches,
    storage_report,
    stored_bytes,
    unpack_patches,
    whole_image_bytes,
)
from dq_ops.patches import (
    kept_patch_count,
    patch_grid,
    patchify,
    pixel_mask,
    select_patches,
    unpatchify,
)
from dq_ops.readers.idx import load_fashion_mnist


@pytest.fixture(scope="module")
def fashion() -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_fashion_mnist("test")
    return images[:2000], labels[:2000]


@pytest.fixture(scope="module")
def cams(fashion, classifier) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM++ maps (112 × 112) of 160 real test images, computed once for the module."""
    model, target_layer, preprocess = classifier
    images = fashion[0][:160]
    return images, gradcam_plus_plus(model, target_layer, preprocess(images), batch_size=32)


@pytest.fixture(scope="module")
def classifier():
    """The pretrained EfficientNet-Lite0 (packaged ImageNet weights) at 112 px, its last
    feature map (``bn2``, 1280 × 4 × 4 at 112 px) and its preprocessing."""
    from dq_ops.backbones import load_classifier

    loaded = load_classifier(image_size=112)
    return loaded.model, loaded.model.bn2, loaded.preprocess


@pytest.mark.parametrize(
    "shape, patch",
    [((3, 28, 28), 4), ((3, 28, 28), 7), ((2, 28, 28, 1), 14), ((2, 32, 48, 3), 16), ((2, 12, 20, 2), (3, 5)), ((1, 9, 9), 1)],
)
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_patch_round_trip_is_exact(shape, patch, dtype) -> None:
    rng = np.random.default_rng(0)
    images = (rng.random(shape) * 255).astype(dtype)
    grid = patch_grid(shape[1:3], patch)
    patches = patchify(images, patch)
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    assert patches.shape == (shape[0], grid[0] * grid[1], ph, pw, *shape[3:])
    assert patches.dtype == images.dtype
    # Patch k is the block at grid row k // gw, column k % gw.
    k = grid[0] * grid[1] - 1
    r, c = divmod(k, grid[1])
    np.testing.assert_array_equal(patches[0, k], images[0, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw])
    restored = unpatchify(patches, grid, patch)
    assert restored.dtype == images.dtype and np.array_equal(restored, images)


def test_patch_size_must_divide_image_size() -> None:
    with pytest.raises(DQInputError, match=r"28×28 is not divisible by patch_size 5×5"):
        patchify(np.zeros((1, 28, 28), np.uint8), 5)
    with pytest.raises(DQInputError, match="patch_size"):
        pack_patches(np.zeros((1, 32, 30, 3), np.uint8), np.ones((1, 4, 4), bool), 8)


@pytest.mark.parametrize("theta, kept", [(0.0, 196), (0.2, 156), (0.4, 117), (0.75, 49), (0.999, 1)])
def test_kept_patch_count_matches_the_reference(theta, kept) -> None:
    assert kept_patch_count(196, theta) == kept
    assert kept_patch_count(10, 0.3) == 7  # int(10 * (1 - 0.3)) would give 6 (float error)


@pytest.mark.parametrize("theta", [-0.1, 1.0, 1.5, float("nan")])
def test_drop_ratio_outside_unit_interval_is_refused(theta) -> None:
    with pytest.raises(DQInputError, match="drop_ratio"):
        select_patches(np.zeros((1, 7, 7)), theta)


def test_select_patches_keeps_top_scores_and_breaks_ties_by_lowest_index() -> None:
    scores = np.array([[[0.5, 0.9], [0.5, 0.1]], [[1.0, 1.0], [1.0, 1.0]]])
    keep = select_patches(scores, 0.5)  # 2 of 4 kept
    np.testing.assert_array_equal(keep[0], [[True, True], [False, False]])  # 0.9, then 0.5 at index 0 < 2
    np.testing.assert_array_equal(keep[1], [[True, True], [False, False]])  # all tied: indices 0, 1
    many = select_patches(np.random.default_rng(1).random((50, 14, 14)), 0.2)
    assert (many.sum(axis=(1, 2)) == 156).all()


def test_patch_scores_pool_and_upsample() -> None:
    cam = np.zeros((1, 28, 28), np.float32)
    cam[0, :4, 24:] = 1.0  # exactly patch (0, 6) of the 7×7 grid
    pooled = patch_scores(cam, (7, 7))
    assert pooled.shape == (1, 7, 7) and pooled[0, 0, 6] == 1.0 and pooled.sum() == 1.0
    coarse = patch_scores(np.arange(4, dtype=np.float32).reshape(1, 2, 2), (7, 7))
    assert coarse.shape == (1, 7, 7) and coarse[0, 0, 0] < coarse[0, 6, 6]


def test_gradcam_plus_plus_focuses_on_the_garment(cams) -> None:
    """On real Fashion-MNIST the map is non-negative, peaks at 1 and is higher on the garment's
    (non-zero) pixels than on the black background, for nearly every image."""
    images, cam = cams
    assert cam.shape == (160, 112, 112) and cam.dtype == np.float32
    assert cam.min() >= 0 and np.allclose(cam.max(axis=(1, 2)), 1.0)
    on_grid = patch_scores(cam, (28, 28))  # one score per original pixel
    inside = np.array([c[x > 0].mean() for c, x in zip(on_grid, images)])
    outside = np.array([c[x == 0].mean() for c, x in zip(on_grid, images)])
    assert (inside > outside).mean() >= 0.9, (inside, outside)
    # Dropping the lowest-scoring 20% of 4×4 patches loses little of the garment's intensity.
    keep = select_patches(patch_scores(cam, (7, 7)), 0.2)
    lost = (images * ~pixel_mask(keep, 4)).sum() / images.sum()
    assert lost < 0.1, lost


def test_gradcam_plus_plus_is_batch_independent_and_frozen_model_safe(fashion, classifier) -> None:
    model, target_layer, preprocess = classifier
    x = preprocess(fashion[0][:6])
    model.requires_grad_(False)  # gradients must still reach the target layer
    try:
        together = gradcam_plus_plus(model, target_layer, x, batch_size=6)
        apart = gradcam_plus_plus(model, target_layer, x, batch_size=2)
    finally:
        model.requires_grad_(True)
    np.testing.assert_allclose(together, apart, atol=1e-4)


def test_scoring_a_chunk_slice_by_slice_keeps_the_same_patches(fashion, classifier) -> None:
    """A chunk is resized and scored a few batches at a time (bounded memory): whole batches, so
    the kept patches are exactly those of one pass over the chunk."""
    from dq_ops.backbones import Classifier
    from dq_ops.pixel_work import keep_top_patches

    scorer, images = Classifier(*classifier), fashion[0][:30]
    one_pass = keep_top_patches(scorer, images, 4, 0.2, batch_size=4, slice_batches=len(images))
    for slice_batches in (1, 3):
        sliced = keep_top_patches(scorer, images, 4, 0.2, batch_size=4, slice_batches=slice_batches)
        np.testing.assert_array_equal(sliced.keep_mask, one_pass.keep_mask)
        np.testing.assert_array_equal(sliced.patches, one_pass.patches)


def test_gradcam_plus_plus_rejects_a_layer_outside_the_forward_pass(classifier) -> None:
    model, _, preprocess = classifier
    with pytest.raises(DQInputError, match="target_layer"):
        gradcam_plus_plus(model, torch.nn.Conv2d(1, 1, 1), preprocess(np.zeros((1, 28, 28), np.uint8)))


@pytest.mark.parametrize("shape", [(5, 28, 28), (4, 16, 24, 3)])
def test_pack_unpack_zero_fills_dropped_patches(shape) -> None:
    rng = np.random.default_rng(2)
    images = rng.integers(1, 256, shape, dtype=np.uint8)
    grid = patch_grid(shape[1:3], 4)
    keep = select_patches(rng.random((shape[0], *grid)), 0.3)
    packed = pack_patches(images, keep, 4)
    k = kept_patch_count(grid[0] * grid[1], 0.3)
    assert packed.patches.shape == (shape[0], k, 4, 4, shape[3] if len(shape) == 4 else 1)
    assert packed.kept_per_image == k and packed.grid == grid
    # Row i holds image i's kept patches in row-major grid order.
    first = patchify(images, 4)[0][keep[0].ravel()]
    assert np.array_equal(packed.patches[0].reshape(first.shape), first)
    restored, mask = unpack_patches(packed)
    pixels = pixel_mask(keep, 4) if len(shape) == 3 else pixel_mask(keep, 4)[..., None]
    assert restored.shape == images.shape and np.array_equal(mask, keep)
    assert np.array_equal(np.where(pixels, images, 0), restored)


def test_pack_refuses_masks_with_different_kept_counts() -> None:
    keep = np.ones((2, 7, 7), bool)
    keep[1, 0, 0] = False
    with pytest.raises(DQInputError, match="same number of patches; got between 48 and 49"):
        pack_patches(np.zeros((2, 28, 28), np.uint8), keep, 4)


@pytest.fixture(params=["local", "memory"])
def group(request, tmp_path) -> zarr.Group:
    store = zarr.storage.LocalStore(tmp_path / "patches") if request.param == "local" else zarr.storage.MemoryStore()
    return zarr.open_group(store, mode="w")


def test_patch_store_round_trip_written_by_chunk(group) -> None:
    """Rows are preallocated and written chunk by chunk in any order, as dask workers do."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    keep = select_patches(rng.random((30, 7, 7)), 0.2)
    ids = np.array([f"train/{i}:abc" for i in range(30)])
    store = PatchStore.create(group, 30, (28, 28), 4, 39, chunk_rows=8)
    for start in (24, 8, 0, 16):
        part = slice(start, start + 8)
        store.write(start, pack_patches(images[part], keep[part], 4), ids[part], np.arange(30)[part] % 10)
    reopened = PatchStore(group)
    assert len(reopened) == 30 and reopened.grid == (7, 7) and reopened.patch_size == (4, 4)
    assert reopened.kept_per_image == 39 and reopened.chunk_rows == 8 and group["patches"].chunks[0] == 8
    assert list(reopened.ids[:]) == list(ids) and list(reopened.labels[:]) == list(np.arange(30) % 10)
    for indices in (slice(None), slice(5, 9), [29, 0, 12]):
        restored, mask = unpack_patches(reopened.read(indices))
        expected = np.arange(30)[indices]
        assert np.array_equal(mask, keep[expected])
        assert np.array_equal(restored, np.where(pixel_mask(keep[expected], 4), images[expected], 0))
    assert 0 < reopened.stored_bytes() < stored_bytes(group)
    with pytest.raises(DQInputError, match="chunk boundary"):
        store.write(4, pack_patches(images[4:8], keep[4:8], 4), ids[4:8])
    with pytest.raises(DQInputError, match="keeping 49 patches do not match the store's .* keeping 39"):
        store.write(0, pack_patches(images[:8], np.ones((8, 7, 7), bool), 4), ids[:8])
    with pytest.raises(DQInputError, match="not a dq patch store"):
        PatchStore(zarr.open_group(zarr.storage.MemoryStore(), mode="w"))


def test_patch_store_accepts_integer_ids_and_channels(group) -> None:
    images = np.random.default_rng(4).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    keep = np.ones((3, 2, 2), bool)
    store = PatchStore.create(group, 3, (8, 8, 3), 4, 4, id_dtype=np.int64)
    store.write(0, pack_patches(images, keep, 4), np.array([7, 8, 9]))
    assert list(PatchStore(group).ids[:]) == [7, 8, 9] and list(PatchStore(group).labels[:]) == [-1, -1, -1]
    assert np.array_equal(unpack_patches(PatchStore(group).read())[0], images)


def test_whole_image_bytes_add_up_over_chunk_aligned_ranges() -> None:
    """What lets workers measure the whole-image reference of their own chunks."""
    images, _ = load_fashion_mnist("test")
    images = images[:100]
    parts = sum(whole_image_bytes(images[start:start + 32], 16) for start in range(0, 100, 32))
    assert parts == whole_image_bytes(images, 16) < images.nbytes


def test_stored_bytes_ratio_on_real_images(cams) -> None:
    """Bytes the store holds (chunks + metadata, via the store) for Grad-CAM++-selected patches at
    θ = 0.2 vs the same real images stored whole with the same codec. Fashion-MNIST's dropped
    patches are mostly black background, which compresses to almost nothing, so the saving is
    much smaller than the 20% of patches dropped (measured: ~0.96)."""
    images, cam = cams
    keep = select_patches(patch_scores(cam, (7, 7)), 0.2)
    store = PatchStore.create(zarr.open_group(zarr.storage.MemoryStore(), mode="w"), len(images), (28, 28), 4, 39)
    store.write(0, pack_patches(images, keep, 4), np.arange(len(images)))
    report = storage_report(store, whole_image_bytes(images, store.chunk_rows), sample_ratio=0.125)
    print(
        f"\nθ=0.2 on {report.n_images} Fashion-MNIST images: patch store {report.patch_bytes} B, "
        f"whole images {report.whole_image_bytes} B (raw {report.raw_image_bytes} B), "
        f"byte ratio {report.byte_ratio:.3f}, keep ratio {report.keep_ratio:.4f}"
    )
    assert report.patch_keep_ratio == pytest.approx(39 / 49)
    assert report.keep_ratio == pytest.approx(0.125 * 39 / 49)
    assert report.whole_image_bytes < report.raw_image_bytes  # the codec really compresses
    assert report.byte_ratio < 1.0
