"""Benchmark of DQ stages 4-5 on real Fashion-MNIST (CPU).

1. Grad-CAM++ (pretrained EfficientNet-Lite0, 112 px, last feature map ``bn2``) scores the 4×4
   patches of ``--images`` training images; the top ``1 − θ`` are kept for θ ∈ {0.2, 0.4}.
2. Kept patches + mask go into a patch store on local disk; its stored bytes are compared with
   the same images stored whole (same codec, same row chunks).
3. An MAE (default sizes, ~1M parameters) is trained on the training split (disjoint from the
   held-out images) and restores the dropped patches of ``--heldout`` test images; PSNR on the
   dropped pixels is compared with three model-free fills.
4. ``--png`` writes original | kept patches | reconstruction for 10 held-out images.

Usage: ``.venv/bin/python bench/patches.py [--images 6000] [--heldout 1000] [--steps 400]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from dq_ops.backbones import load_classifier
from dq_ops.gallery import reconstruction_grid
from dq_ops.gradcam import gradcam_plus_plus, patch_scores
from dq_ops.mae import MAEConfig, reconstruct, train_mae
from dq_ops.patch_store import PatchStore, pack_patches, storage_report, whole_image_bytes
from dq_ops.patches import select_patches
from dq_ops.readers.idx import load_fashion_mnist
from dq_ops.reconstruction_quality import baseline_fill, reconstruction_psnr

THETAS = (0.2, 0.4)
PATCH = 4


def cam_keep_masks(images: np.ndarray, classifier) -> tuple[dict[float, np.ndarray], float]:
    """Keep masks per θ from one Grad-CAM++ pass; returns them and the pass's seconds."""
    start = time.perf_counter()
    cam = gradcam_plus_plus(classifier.model, classifier.model.bn2, classifier.preprocess(images), batch_size=64)
    seconds = time.perf_counter() - start
    scores = patch_scores(cam, (28 // PATCH, 28 // PATCH))
    return {theta: select_patches(scores, theta) for theta in THETAS}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6000, help="training images for the storage measurement")
    parser.add_argument("--heldout", type=int, default=1000, help="test images for the PSNR measurement")
    parser.add_argument("--steps", type=int, default=400, help="MAE optimizer steps (batch 128)")
    parser.add_argument("--mask-ratio", type=float, default=0.4,
                        help="MAE training mask ratio (0.4 restored θ = 0.2 / 0.4 drops better than 0.75 here)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png", default="docs/reconstruction.png")
    args = parser.parse_args()

    train, train_labels = load_fashion_mnist("train")
    test, _ = load_fashion_mnist("test")
    images, heldout = train[: args.images], test[: args.heldout]
    classifier = load_classifier(image_size=112)
    print(f"torch threads: {torch.get_num_threads()}")

    keep, cam_seconds = cam_keep_masks(images, classifier)
    print(f"Grad-CAM++ on {len(images)} images (112 px): {cam_seconds:.1f} s ({len(images) / cam_seconds:.0f} img/s)")
    print("\n== stored bytes: patch store vs whole images (Blosc-zstd 5, shuffle; local disk) ==")
    print(f"{'θ':>4} {'kept/img':>8} {'raw B':>9} {'whole B':>9} {'patches B':>9} {'byte ratio':>10} "
          f"{'patch keep':>10} {'keep ratio @12.5%':>17}")
    with tempfile.TemporaryDirectory() as tmp:
        for theta in THETAS:
            group = zarr.open_group(zarr.storage.LocalStore(f"{tmp}/theta-{theta}"), mode="w")
            packed = pack_patches(images, keep[theta], PATCH)
            store = PatchStore.create(group, len(images), (28, 28), PATCH, packed.kept_per_image)
            store.write(0, packed, np.arange(len(images)), train_labels[: len(images)])
            report = storage_report(store, whole_image_bytes(images, store.chunk_rows), sample_ratio=0.125)
            print(f"{theta:>4} {int(keep[theta][0].sum()):>8} {report.raw_image_bytes:>9} {report.whole_image_bytes:>9} "
                  f"{report.patch_bytes:>9} {report.byte_ratio:>10.3f} {report.patch_keep_ratio:>10.3f} {report.keep_ratio:>17.4f}")

    config = MAEConfig(mask_ratio=args.mask_ratio)
    mae_train = train[args.images:]  # disjoint from the storage images; the held-out set is the test split
    start = time.perf_counter()
    model, losses = train_mae(mae_train, config, seed=args.seed, steps=args.steps, batch_size=128)
    train_seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    print(f"\n== MAE: {params / 1e6:.2f}M parameters, mask ratio {config.mask_ratio}, {args.steps} steps × 128 "
          f"on {len(mae_train)} images: {train_seconds:.0f} s; loss {np.mean(losses[:10]):.4f} → {np.mean(losses[-20:]):.4f}")

    held_keep, _ = cam_keep_masks(heldout, classifier)
    print(f"\n== PSNR (dB) on the dropped pixels of {len(heldout)} held-out test images (Grad-CAM++ drop) ==")
    print(f"{'θ':>4} {'MAE':>6} {'mean fill':>9} {'nearest':>8} {'zero fill':>9} {'recon s':>8}")
    for theta in THETAS:
        mask = held_keep[theta]
        start = time.perf_counter()
        restored = reconstruct(model, heldout, mask)
        seconds = time.perf_counter() - start
        fills = [reconstruction_psnr(heldout, baseline_fill(heldout, mask, m), mask) for m in ("mean", "nearest", "zero")]
        print(f"{theta:>4} {reconstruction_psnr(heldout, restored, mask):>6.2f} {fills[0]:>9.2f} {fills[1]:>8.2f} "
              f"{fills[2]:>9.2f} {seconds:>8.1f}")
        if theta == THETAS[0] and args.png:
            Path(args.png).write_bytes(reconstruction_grid(heldout[:10], mask[:10], restored[:10]))
            print(f"(picture: {args.png})")


if __name__ == "__main__":
    main()
