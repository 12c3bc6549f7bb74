"""Grad-CAM++ for batched patch scoring: dq's own (``dq_ops.gradcam.gradcam_plus_plus``) vs the
maintained ``grad-cam`` package (pytorch-grad-cam's ``GradCAMPlusPlus``).

Both score the same real Fashion-MNIST images with the pretrained EfficientNet-Lite0 at 112 px
(target layer ``bn2``, the model's own predicted class, batches of 64), alternating A/B
``--repeats`` times on the same process so that machine load hits both alike. Reports img/s for
each, and how often the two pick the same kept patches at θ = 0.2 (identical keep masks, and the
mean Jaccard index of the kept sets).

``grad-cam`` is not a dq dependency; install it beside the bench only:
``pip install --target /tmp/gradcam grad-cam ttach opencv-python-headless --no-deps`` and run
``PYTHONPATH=$PWD:/tmp/gradcam .venv/bin/python bench/gradcam.py [--images 256] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dq_ops.backbones import load_classifier
from dq_ops.gradcam import gradcam_plus_plus, patch_scores
from dq_ops.patches import select_patches
from dq_ops.readers.idx import load_fashion_mnist

BATCH = 64


def package_cams(classifier, x: torch.Tensor) -> np.ndarray:
    """pytorch-grad-cam's Grad-CAM++ maps, batch by batch (its own normalisation and resize)."""
    from pytorch_grad_cam import GradCAMPlusPlus

    with GradCAMPlusPlus(model=classifier.model, target_layers=[classifier.target_layer]) as cam:
        return np.concatenate([cam(input_tensor=x[s:s + BATCH], targets=None) for s in range(0, len(x), BATCH)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    images, _ = load_fashion_mnist("train")
    classifier = load_classifier(image_size=112)
    x = classifier.preprocess(images[: args.images])
    runs: dict[str, list[float]] = {"dq": [], "grad-cam": []}
    cams: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for name, fn in (("dq", lambda: gradcam_plus_plus(classifier.model, classifier.target_layer, x, BATCH)),
                         ("grad-cam", lambda: package_cams(classifier, x))):
            start = time.perf_counter()
            cams[name] = fn()
            runs[name].append(len(x) / (time.perf_counter() - start))
    print(f"torch threads {torch.get_num_threads()}, {len(x)} images at 112 px, batch {BATCH}, {args.repeats} A/B rounds")
    for name, rates in runs.items():
        print(f"{name:>9}: {np.median(rates):6.1f} img/s (runs: {', '.join(f'{r:.1f}' for r in rates)})")
    keep = {name: select_patches(patch_scores(cam, (7, 7)), 0.2) for name, cam in cams.items()}
    same = (keep["dq"] == keep["grad-cam"]).all(axis=(1, 2))
    both = (keep["dq"] & keep["grad-cam"]).sum(axis=(1, 2))
    either = (keep["dq"] | keep["grad-cam"]).sum(axis=(1, 2))
    print(f"θ = 0.2 keep masks: identical for {same.mean():.1%} of images, mean Jaccard {np.mean(both / either):.4f}")


if __name__ == "__main__":
    main()
