"""Does a DQ subset train better than a random one of the same size? Paired draws on Fashion-MNIST.

    python bench/quality.py [--draws 5] [--ratios 0.01 0.05 0.1 0.3] [--steps 100] [--threads 1]
                            [--arms random dq-emb] [--ablation-arms dq-pca dq-grad dq-emb-20 dq-emb-adq]
                            [--ablation-ratios 0.01 0.1] [--cache DIR] [--quick]

For every keep ratio and every draw s = 0..draws-1, each arm draws its own subset with seed s
and the default evaluation network (``dq_ops.models.DEFAULT_MODEL``) is trained on it from
scratch with seed s (``dq_ops.train.train_and_evaluate``, the library recipe with a fixed number
of SGD steps so that every run costs the same). ``--arms`` run at every ratio, the
``--ablation-arms`` only at ``--ablation-ratios`` (2 CPU cores cannot afford the whole grid).
Arms:

- ``random``: uniform per class (``select_random``), with exactly the per-class sizes of the
  first DQ arm's subset (``sample_sizes``). DQ with 1 bin is this arm: uniform sampling of one bin
  that holds the whole class is uniform random sampling.
- ``dq-pca``, ``dq-emb``, ``dq-grad``: DQ with 10 GraphCut bins on PCA-64 of the pixels, on the
  ImageNet EfficientNet-Lite0 embedding (``--image-size`` px, default 32 as in the pipeline; 1280-d), or on
  the reference's last-layer gradient embedding of that backbone (random head, seed 0).
- ``dq-emb-20``: 20 bins on the embedding.
- ``dq-emb-adq``: 10 bins on the embedding with ADQ's adaptive per-bin budget
  (``dq_ops.adaptive``, α = ``--alpha``).

Per arm and ratio: mean ± sample std of test accuracy over the draws, and for each DQ arm the
paired gap to ``random`` (same s) with its 95% Student-t interval (``dq_ops.paired``). The test
split is never used for any choice. Embeddings are computed once (EfficientNet-Lite0 over 60,000
images: minutes on 2 cores) and cached as ``.npy`` in ``--cache`` (default: a folder in the
system's temporary directory), so later runs start at once.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from dq_ops.adaptive import adaptive_bin_weights
from dq_ops.baselines import select_random
from dq_ops.bins import generate_bins
from dq_ops.features import gradient_embedding
from dq_ops.models import DEFAULT_MODEL
from dq_ops.paired import paired_gap, summarize_accuracies
from dq_ops.readers.idx import load_fashion_mnist
from dq_ops.sampling import sample_bins, sample_sizes
from dq_ops.train import TrainConfig, train_and_evaluate

ARMS = ("random", "dq-pca", "dq-emb", "dq-grad", "dq-emb-20", "dq-emb-adq")


def pca_features(images: np.ndarray, dim: int = 64) -> np.ndarray:
    """(n, dim) float32 projections of the centred [0, 1] pixels on the leading covariance eigenvectors."""
    x = images.reshape(len(images), -1).astype(np.float32) / 255.0
    x -= x.mean(axis=0)
    _, vectors = np.linalg.eigh((x.T @ x).astype(np.float64))  # ascending eigenvalues
    return x @ vectors[:, ::-1][:, :dim].astype(np.float32)


def backbone_embedding(images: np.ndarray, cache: Path, image_size: int) -> np.ndarray:
    """EfficientNet-Lite0 (ImageNet weights) penultimate features at ``image_size`` px, cached in ``cache``."""
    path = cache / f"fashion-mnist-train-efficientnet-lite0-{image_size}px.npy"
    if not path.exists():
        from dq_ops.backbones import load_image_extractor

        extractor = load_image_extractor(image_size=image_size, device=torch.device("cpu"))
        features = np.concatenate([extractor(images[i:i + 2048]) for i in range(0, len(images), 2048)])
        np.save(path, features.astype(np.float32))
    return np.load(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=5, help="paired draws per arm and ratio (seeds 0..N-1)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.3])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=["random", "dq-emb"], help="arms at every ratio")
    parser.add_argument("--ablation-arms", nargs="*", choices=ARMS, default=["dq-pca", "dq-grad", "dq-emb-20", "dq-emb-adq"])
    parser.add_argument("--ablation-ratios", type=float, nargs="*", default=[0.01, 0.1])
    parser.add_argument("--steps", type=int, default=100, help="SGD steps of batch 128 per training run")
    parser.add_argument("--alpha", type=float, default=0.5, help="ADQ mix of importance and size shares")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--image-size", type=int, default=32,
                        help="backbone input size for the embedding arms (the pipeline's default: 32)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "dq-quality-cache")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 draws, 1%% and 10%%, 20 steps, PCA only")
    args = parser.parse_args()
    if args.quick:
        args.draws, args.ratios, args.steps, args.arms, args.ablation_arms = 2, [0.01, 0.1], 20, ["random", "dq-pca"], []
    if any(not 0 < r < 1 for r in [*args.ratios, *args.ablation_ratios]) or args.draws < 1:
        parser.error("--ratios must lie in (0, 1) and --draws be >= 1")
    arms = ["random", *dict.fromkeys(a for a in [*args.arms, *args.ablation_arms] if a != "random")]
    ratios = sorted(set(args.ratios) | set(args.ablation_ratios if args.ablation_arms else []))

    def runs_at(arm: str, ratio: float) -> bool:
        return arm == "random" or (arm in args.arms and ratio in args.ratios) or (
            arm in args.ablation_arms and ratio in args.ablation_ratios)

    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(epochs=1, min_steps=args.steps, max_steps=args.steps)

    started = time.perf_counter()
    images, labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def timed(what: str) -> Iterator[None]:
        tick = time.perf_counter()
        yield
        seconds[what] += time.perf_counter() - tick

    with timed("features pca"):
        features: dict[str, object] = {"pca": pca_features(images)}
    if any(arm.startswith(("dq-emb", "dq-grad")) for arm in arms):
        with timed("features emb (cached after the first run)"):
            features["emb"] = backbone_embedding(images, args.cache, args.image_size)
    if "dq-grad" in arms:
        with timed("features grad"):
            features["grad"] = gradient_embedding(features["emb"], labels, seed=0)
    bin_specs = {"dq-pca": ("pca", 10), "dq-emb": ("emb", 10), "dq-grad": ("grad", 10),
                 "dq-emb-20": ("emb", 20), "dq-emb-adq": ("emb", 10)}
    bins = {}
    for arm in arms:
        if arm in bin_specs:
            feature, k = bin_specs[arm]
            if (feature, k) not in bins:
                with timed(f"bins {feature} x{k}"):
                    bins[(feature, k)] = generate_bins(features[feature], labels, k)
    # random gets the per-class sizes of the first DQ arm's subset
    reference_bins = bins[bin_specs[next(arm for arm in arms if arm in bin_specs)]]
    weights = None
    if "dq-emb-adq" in arms:
        with timed("adq weights"):
            weights = adaptive_bin_weights(features["emb"], labels, bins[("emb", 10)], args.alpha)

    def draw(arm: str, ratio: float, seed: int) -> np.ndarray:
        if arm == "random":
            return select_random(features["pca"], labels, ratio, seed, sizes=sample_sizes(reference_bins, labels, ratio))
        return sample_bins(bins[bin_specs[arm]], labels, ratio, seed, weights=weights if arm == "dq-emb-adq" else None)

    accuracies: dict[tuple[str, float], list[float]] = defaultdict(list)
    sizes: dict[tuple[str, float], int] = {}
    for ratio in ratios:
        for seed in range(args.draws):
            for arm in (a for a in arms if runs_at(a, ratio)):
                subset = draw(arm, ratio, seed)
                sizes[(arm, ratio)] = len(subset)
                result = train_and_evaluate(images[subset], labels[subset], test_images, test_labels,
                                            model=DEFAULT_MODEL, config=config, seed=seed)
                seconds["training"] += result.train_seconds
                accuracies[(arm, ratio)].append(result.test_accuracy)
                print(f"{arm:>11} {ratio:5.0%} draw {seed}: {len(subset):6d} images, test {result.test_accuracy:.4f}, "
                      f"{result.train_seconds:5.1f} s", file=sys.stderr, flush=True)

    print(f"Fashion-MNIST, {DEFAULT_MODEL} trained from scratch, {args.steps} SGD steps × 128 per run, "
          f"{args.draws} paired draws (seed s draws the subset and seeds the training); final-step test accuracy, %")
    header = f"{'arm':<11}" + "".join(f"{f'{r:.0%} (n={sizes[(arms[0], r)]})':>18}" for r in ratios)
    print(header)
    print("-" * len(header))
    for arm in arms:
        cells = summarize_accuracies({r: accuracies[(arm, r)] for r in ratios if runs_at(arm, r)})
        print(f"{arm:<11}" + "".join(f"{cells[r].as_percent() if r in cells else '':>18}" for r in ratios))
    print("\nGap to random (same draws), points: mean [95% t-interval] verdict")
    for arm in arms[1:]:
        cells = []
        for r in ratios:
            if not runs_at(arm, r):
                cells.append("")
                continue
            gap = paired_gap(accuracies[(arm, r)], accuracies[("random", r)])
            interval = "" if gap.ci_low is None else f" [{100 * gap.ci_low:+.2f},{100 * gap.ci_high:+.2f}]"
            cells.append(f"{100 * gap.mean:+.2f}{interval} {gap.verdict[:5]}")
        print(f"{arm:<11}" + "".join(f"{c:>30}" for c in cells))
    print(f"\nwall time {time.perf_counter() - started:.0f} s; " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
