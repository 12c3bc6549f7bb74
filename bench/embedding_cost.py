"""What each candidate embedding costs per image, measured side by side in one process.

    python bench/embedding_cost.py [--images 1024] [--repeats 3] [--threads 1]

Candidates (the features of ``bench/quality.py``): EfficientNet-Lite0 (ImageNet weights) at 32,
64, 112 and 224 px, the penultimate 1,280-d; PCA-64 of the pixels; the encoder of the flow's own
MAE (its training, as the flow trains it, is reported apart: it is paid once per snapshot, not
per image). Each candidate embeds the same Fashion-MNIST training images; the repeats are
interleaved (A B C … A B C …) so that a busy machine slows every candidate alike, and the median
is reported in seconds per 1,000 images and relative to EfficientNet-Lite0 at 32 px (the default).
Also printed: the share of exact zeros in each embedding.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from quality import pixel_pca  # bench/ is the script's folder, first on sys.path

from dq_ops.backbones import load_image_extractor
from dq_ops.config import PatchConfig
from dq_ops.mae import MAEConfig, mae_embedding, train_mae
from dq_ops.readers.idx import load_fashion_mnist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the flow's workers use 1 each)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, _ = load_fashion_mnist("train")
    images = train[: args.images]

    project = pixel_pca(train[:10000])

    patches = PatchConfig()
    rows = np.sort(np.random.default_rng(0).permutation(len(train))[: patches.mae_train_samples])
    config = MAEConfig(image_size=train.shape[1:3], in_chans=1, patch_size=patches.patch_size, mask_ratio=patches.mae_mask_ratio)
    started = time.perf_counter()
    mae, _ = train_mae(train[rows], config, seed=0, epochs=patches.mae_epochs)
    mae_training = time.perf_counter() - started

    candidates: dict[str, Callable[[], np.ndarray]] = {}
    for size in (32, 64, 112, 224):
        extractor = load_image_extractor(image_size=size, device=torch.device("cpu"))
        candidates[f"effnet{size}"] = lambda extractor=extractor: extractor(images)
    candidates["pixels-pca"] = lambda: project(images)
    candidates["mae"] = lambda: mae_embedding(mae, images)

    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    zeros: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, embed in candidates.items():
            started = time.perf_counter()
            values = np.asarray(embed())
            seconds[name].append(time.perf_counter() - started)
            zeros[name] = float((values == 0).mean())

    base = statistics.median(seconds["effnet32"])
    print(f"embedding cost: {args.images} Fashion-MNIST images, {args.threads} torch thread(s), median of {args.repeats} "
          f"interleaved runs")
    print(f"{'candidate':<12} {'s per 1,000':>12} {'vs effnet32':>12} {'exact zeros':>12}")
    for name, runs in seconds.items():
        median = statistics.median(runs)
        print(f"{name:<12} {1000 * median / args.images:>12.2f} {median / base:>11.2f}x {zeros[name]:>12.1%}")
    print(f"MAE training ({patches.mae_epochs} epochs on {len(rows):,} images, once per snapshot): {mae_training:.1f} s")


if __name__ == "__main__":
    main()
