"""How far the evaluation network gets on the full Fashion-MNIST with the library's recipe.

    python bench/network.py [--model medium_cnn] [--epochs 3] [--threads 1]

Trains ``--model`` (default: the pipeline's default, ``dq_ops.models.DEFAULT_MODEL``) from scratch
on all 60,000 training images (54,000 after the validation split) with ``dq_ops.train``'s default
recipe for ``--epochs`` passes and prints final test/validation accuracy, training time, the
throughput and the machine's load average before and after (``os.getloadavg``).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from dq_ops.models import DEFAULT_MODEL, MODEL_NAMES
from dq_ops.readers.idx import load_fashion_mnist
from dq_ops.train import TrainConfig, train_and_evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODEL_NAMES, default=DEFAULT_MODEL)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images, labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    load_before = os.getloadavg()
    started = time.perf_counter()
    result = train_and_evaluate(images, labels, test_images, test_labels, model=args.model,
                                config=TrainConfig(epochs=args.epochs, min_steps=1), seed=0)
    print(f"{args.model}, full Fashion-MNIST, {args.epochs:g} epochs ({result.steps} steps × {result.batch_size}), "
          f"{args.threads} torch thread(s): test {100 * result.test_accuracy:.2f}%, val {100 * result.val_accuracy:.2f}%; "
          f"training {result.train_seconds:.0f} s ({result.samples_per_second:.0f} img/s), "
          f"total {time.perf_counter() - started:.0f} s; load average {load_before[0]:.1f} → {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
