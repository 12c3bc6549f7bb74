"""Stage 5: the masked autoencoder on real Fashion-MNIST: training, checkpoints, bit-exact
paste-back, reconstruction from a patch store, and PSNR against model-free fills."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from dq_ops.errors import DQInputError
from dq_ops.gallery import reconstruction_grid
from dq_ops.mae import MAEConfig, MaskedAutoencoder, mae_embedding, random_keep_mask, reconstruct, train_mae
from dq_ops.mae_store import ReconstructedPatchDataset, load_mae, save_mae
from dq_ops.patch_store import PatchStore, pack_patches
from dq_ops.patches import pixel_mask, select_patches
from dq_ops.readers.idx import load_fashion_mnist
from dq_ops.reconstruction_quality import baseline_fill, dropped_squared_error, psnr_db, reconstruction_psnr

# Small enough to train in well under a minute on 2 busy cores, big enough to learn the data.
SMALL = MAEConfig(embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4)
TRAIN_STEPS = 120


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    train, _ = load_fashion_mnist("train")
    test, labels = load_fashion_mnist("test")
    return {"train": train[:20000], "test": test[:500], "test_labels": labels[:500]}


@pytest.fixture(scope="module")
def trained(data) -> tuple[MaskedAutoencoder, list[float]]:
    return train_mae(data["train"], SMALL, seed=0, steps=TRAIN_STEPS, batch_size=96, lr=3e-3)


def centre_keep_mask(n: int, drop_ratio: float = 0.2) -> np.ndarray:
    """The DQ drop pattern without a classifier: Grad-CAM++ on Fashion-MNIST is centre-heavy, so
    score each 4×4 patch by closeness to the image centre (plus a little per-image noise)."""
    rows, cols = np.mgrid[:7, :7]
    centre = -np.hypot(rows - 3, cols - 3)
    noise = np.random.default_rng(5).random((n, 7, 7)) * 0.5
    return select_patches(centre[None] + noise, drop_ratio)


def test_config_validation() -> None:
    with pytest.raises(DQInputError, match="patch_size"):
        MAEConfig(patch_size=5)
    with pytest.raises(DQInputError, match="mask_ratio"):
        MAEConfig(mask_ratio=1.0)
    with pytest.raises(DQInputError, match="heads"):
        MAEConfig(embed_dim=100, num_heads=3)
    assert MAEConfig.from_json(SMALL.to_json()) == SMALL
    params = sum(p.numel() for p in MaskedAutoencoder(MAEConfig()).parameters())
    assert 0.8e6 < params < 1.3e6


def test_training_loss_decreases(trained) -> None:
    _, losses = trained
    assert len(losses) == TRAIN_STEPS and all(np.isfinite(losses))
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:10])


def test_training_is_seeded(data) -> None:
    a = train_mae(data["train"][:256], SMALL, seed=3, steps=2, batch_size=32)[1]
    b = train_mae(data["train"][:256], SMALL, seed=3, steps=2, batch_size=32)[1]
    assert a == b
    assert len(train_mae(data["train"][:70], SMALL, epochs=2, batch_size=32)[1]) == 4  # ⌊70/32⌋ steps per epoch
    with pytest.raises(DQInputError, match="exactly one of steps or epochs"):
        train_mae(data["train"][:8], SMALL)


def test_variable_kept_counts_match_per_image_forward(trained) -> None:
    """A batch whose images keep different numbers of patches (padded, masked attention) gives the
    same predictions as each image alone."""
    model, _ = trained
    tokens = torch.rand(3, 49, 16)
    keep = torch.zeros(3, 49, dtype=torch.bool)
    keep[0, :40], keep[1, 10:15], keep[2, ::2] = True, True, True
    with torch.no_grad():
        together = model(tokens, keep)
        alone = torch.cat([model(tokens[i:i + 1], keep[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_kept_pixels_unchanged_and_psnr_beats_baselines(data, trained) -> None:
    """On held-out images with the DQ-like drop pattern (θ = 0.2), the MAE restores the dropped
    patches better than the image-mean fill and the nearest-kept-patch fill, and never alters a
    kept pixel."""
    model, _ = trained
    images = data["test"]
    for keep in (centre_keep_mask(len(images)), random_keep_mask(len(images), 49, 0.75, torch.Generator().manual_seed(9)).numpy().reshape(-1, 7, 7)):
        restored = reconstruct(model, np.where(pixel_mask(keep, 4), images, 0).astype(np.uint8), keep)
        assert restored.dtype == np.uint8 and restored.shape == images.shape
        kept = pixel_mask(keep, 4)
        assert np.array_equal(restored[kept], images[kept])
        psnr = {
            "mae": reconstruction_psnr(images, restored, keep),
            "mean": reconstruction_psnr(images, baseline_fill(images, keep, "mean"), keep),
            "nearest": reconstruction_psnr(images, baseline_fill(images, keep, "nearest"), keep),
        }
        print(f"\nPSNR on dropped patches (dB), {(~keep).mean():.0%} dropped: {psnr}")
        assert psnr["mae"] > psnr["mean"] + 1.0 and psnr["mae"] > psnr["nearest"] + 1.0, psnr
    png = reconstruction_grid(images[:8], keep[:8], restored[:8])
    picture = Image.open(io.BytesIO(png))
    assert png.startswith(b"\x89PNG") and picture.size[1] == 3 * (28 * 4 + 2)


def test_reconstruct_rejects_mismatched_input(trained) -> None:
    model, _ = trained
    with pytest.raises(DQInputError, match="do not fit the MAE"):
        reconstruct(model, np.zeros((1, 32, 32), np.uint8), np.ones((1, 8, 8), bool))
    with pytest.raises(DQInputError, match="keep_mask"):
        reconstruct(model, np.zeros((1, 28, 28), np.uint8), np.ones((1, 4, 4), bool))
    with pytest.raises(DQInputError, match="at least one kept patch"):
        reconstruct(model, np.zeros((1, 28, 28), np.uint8), np.zeros((1, 7, 7), bool))
    with pytest.raises(DQInputError, match="norm_pix_loss"):
        reconstruct(MaskedAutoencoder(MAEConfig(norm_pix_loss=True)), np.zeros((1, 28, 28), np.uint8), np.ones((1, 7, 7), bool))


def test_checkpoint_round_trip_and_errors(trained, tmp_path) -> None:
    model, _ = trained
    path = str(tmp_path / "models" / "mae.safetensors")
    save_mae(model, path)
    loaded = load_mae(path)
    assert loaded.config == model.config
    tokens, keep = torch.rand(2, 49, 16), torch.rand(2, 49) > 0.5
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens, keep), model(tokens, keep))
    missing = str(tmp_path / "nowhere.safetensors")
    with pytest.raises(DQInputError, match="nowhere.safetensors: MAE checkpoint not found"):
        load_mae(missing)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(DQInputError, match="corrupt.safetensors: not a valid dq MAE checkpoint"):
        load_mae(str(corrupt))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((tmp_path / "models" / "mae.safetensors").read_bytes()[:-100])
    with pytest.raises(DQInputError, match="truncated.safetensors"):
        load_mae(str(truncated))


@pytest.mark.parametrize("backend", ["local", "memory"])
def test_dataset_reconstructs_from_patch_store(data, trained, tmp_path, backend) -> None:
    model, _ = trained
    images, labels = data["test"][:40], data["test_labels"][:40]
    keep = centre_keep_mask(len(images))
    make = (lambda name: zarr.storage.LocalStore(tmp_path / name)) if backend == "local" else (lambda _: zarr.storage.MemoryStore())
    group = zarr.open_group(make("patches"), mode="w")
    store = PatchStore.create(group, 40, (28, 28), 4, 39)
    store.write(0, pack_patches(images, keep, 4), np.array([f"test/{i}" for i in range(40)]), labels)
    expected = reconstruct(model, images, keep)

    dataset = ReconstructedPatchDataset(group, model)
    assert len(dataset) == 40
    image, label = dataset[7]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label == labels[7]
    assert torch.equal((image[0] * 255).round().to(torch.uint8), torch.from_numpy(expected[7]))
    batch_images, batch_labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=False)))
    assert batch_images.shape == (16, 1, 28, 28) and torch.equal(batch_labels, torch.from_numpy(labels[:16]))
    assert dataset.ids[3] == "test/3"


def test_psnr_combines_from_chunk_sums(data, trained) -> None:
    """PSNR of a whole subset from per-chunk (squared error, count) sums, as workers report them."""
    model, _ = trained
    images = data["test"][:90]
    keep = centre_keep_mask(len(images))
    restored = reconstruct(model, images, keep)
    parts = [dropped_squared_error(images[s:s + 32], restored[s:s + 32], keep[s:s + 32]) for s in range(0, 90, 32)]
    combined = psnr_db(sum(sse for sse, _ in parts), sum(count for _, count in parts))
    assert sum(count for _, count in parts) == (~pixel_mask(keep, 4)).sum()
    assert combined == pytest.approx(reconstruction_psnr(images, restored, keep), rel=1e-12)


def test_flat_black_background_is_restored_exactly():
    """A model predicting 10/255 everywhere: in an image with a kept all-black patch the dropped
    faint patches snap to 0; without black background (or above the threshold) they stay."""
    model = MaskedAutoencoder(MAEConfig())
    with torch.no_grad():
        model.decoder_pred.weight.zero_()
        model.decoder_pred.bias.fill_(10 / 255)
    keep = np.ones((2, 7, 7), bool)
    keep[:, 3, 3] = False
    black = np.zeros((28, 28), np.uint8)
    black[8:20, 8:20] = 200  # an object on black, its centre patch dropped
    grey = np.full((28, 28), 90, np.uint8)  # no black anywhere
    restored = reconstruct(model, np.stack([black, grey]), keep)
    assert (restored[0, 12:16, 12:16] == 0).all()
    assert (restored[1, 12:16, 12:16] == 10).all()
    with torch.no_grad():
        model.decoder_pred.bias.fill_(60 / 255)
    assert (reconstruct(model, np.stack([black, grey]), keep)[:, 12:16, 12:16] == 60).all()


def test_encoder_embedding_separates_classes(data, trained) -> None:
    """The trained encoder's mean token is a per-image embedding: deterministic, one row per image,
    and on real images closer within a class than across classes."""
    model, _ = trained
    images, labels = data["test"], data["test_labels"]
    features = mae_embedding(model, images, batch_size=128)
    assert features.shape == (len(images), model.config.embed_dim) and features.dtype == np.float32
    assert np.array_equal(features[:10], mae_embedding(model, images[:10]))
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    similar = unit @ unit.T
    same = labels[:, None] == labels[None, :]
    assert similar[same].mean() > similar[~same].mean()
