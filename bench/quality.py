"""Does a DQ subset train better than a random one of the same size? Paired draws, the flow's training budget.

    python bench/quality.py [--dataset fashion-mnist|digits|fortunes] [--arms random dq ...]
                            [--ratios 0.01 0.02 0.05 0.1 0.3] [--draws 10] [--jobs 2]
                            [--budget-curve RATIO [--budget-scales 0.25 0.5 1 2]] [--cache DIR]

For every keep ratio and every draw s = 0..draws-1, each arm selects its own subset with seed s
and is evaluated as ``dq run`` evaluates it, with seed s: images train the flow's default
network with the flow's default recipe and budget (``EvaluationConfig()`` through
``dq_ops.stages.train_config``: 60 epochs of the training part, at least 1,000 SGD steps), texts fit
the flow's logistic regression on sentence embeddings (``dq_ops.text_eval``). Arm grammar:

- ``random``: uniform per class, with exactly the per-class sizes of the flow's DQ subset
  (``sample_sizes`` of the default bins); uniform sampling of one bin that holds the whole class
  is this arm.
- ``dq[:FEATURES[:WEIGHTS]]``: 10 GraphCut bins (the flow's defaults: per-class budgets; cosine
  kernel for images, dot for texts) on FEATURES, drawn as the flow draws them
  (``dq_ops.sampling.sample_bins`` with the ``bin_intensities`` of WEIGHTS: ``uniform``, the
  paper's rule; ``later-bins``; ``budget-aware``; ``adaptive``, ADQ with α = 0.5). ``dq`` alone is the flow's
  default (``DQConfig()``'s embedding and ``sampling.bin_weights``).

FEATURES (each cached as ``.npy`` in ``--cache`` with its cost in seconds per 1,000 images):
``effnet32`` / ``effnet64`` / ``effnet112`` (ImageNet EfficientNet-Lite0 at that input size,
penultimate 1,280-d; ``effnet64spatial``: its last feature map before global pooling, 2×2×1,280
at 64 px — at 32 px the map is 1×1 and pooling changes nothing), ``pixels-pca`` (PCA-64 of the pixels), ``mae`` (the mean encoder token of the flow's own MAE,
trained as the flow trains it), ``gradient32`` (the reference's
last-layer gradient embedding on ``effnet32`` with a random head), ``minilm`` (texts).

Output: per arm and ratio, mean ± sample std of test accuracy over the draws; per DQ arm, the
paired gap to ``random`` (same s) with its 95% Student-t interval and verdict
(``dq_ops.paired``); the coverage of each arm's subsets (``dq_ops.coverage``, in the default
features, averaged over the draws). ``--budget-curve R`` trains ``random`` and the first DQ arm
at ratio R with the flow's budget scaled by each ``--budget-scales`` factor (epochs and minimum
steps alike; ``--curve-draws`` draws each), to show that the budget is past convergence. Every training result is appended to
``<cache>/results-<dataset>.jsonl`` and reused by later runs with the same arm, ratio, draw and
budget, so a table can be extended with more draws or arms without re-training. ``--jobs``
trainings run at once, each in its own process with one torch thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from dq_ops.baselines import select_random
from dq_ops.bins import generate_bins
from dq_ops.config import BinsConfig, DQConfig, EvaluationConfig, SamplingConfig
from dq_ops.coverage import subset_coverage
from dq_ops.paired import paired_gap, summarize_accuracies
from dq_ops.sampling import bin_intensities, sample_bins, sample_sizes

DEFAULT_RATIOS = [0.01, 0.02, 0.05, 0.1, 0.3]
ROUNDING = "per-bin" if BinsConfig().budget_rule == "reference" else "per-class"  # as the flow rounds
_WORKER: dict[str, Any] = {}  # the dataset, loaded once per training process


# -- datasets ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Dataset:
    name: str
    train: Any  # uint8 images (n, H, W) or a list of texts
    labels: np.ndarray
    test: Any
    test_labels: np.ndarray

    @property
    def is_text(self) -> bool:
        return isinstance(self.train, list)


def load_dataset(name: str) -> Dataset:
    """Fashion-MNIST (all 60,000 / 10,000), scikit-learn's digits upscaled to 32 px (a seeded,
    stratified 70/30 split) or Debian's fortunes (the flow's 20% id-hash hold-out)."""
    if name == "fashion-mnist":
        from dq_ops.readers.idx import load_fashion_mnist

        return Dataset(name, *load_fashion_mnist("train"), *load_fashion_mnist("test"))
    if name == "digits":
        from PIL import Image
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.stack([np.asarray(Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BILINEAR))
                           for img in digits.images])
        test = np.zeros(len(images), dtype=bool)
        rng = np.random.default_rng(0)
        for c in np.unique(digits.target):
            members = np.flatnonzero(digits.target == c)
            test[rng.choice(members, round(0.3 * len(members)), replace=False)] = True
        return Dataset(name, images[~test], digits.target[~test], images[test], digits.target[test])
    if name == "fortunes":
        from dq_ops.ingest import held_out
        from dq_ops.readers import FortunesReader

        config = DQConfig.from_yaml(Path(__file__).parent.parent / "deployments/configs/fortunes-text.yaml").dataset
        texts, labels, ids = [], [], []
        for batch in FortunesReader(config.url).iter_batches("train", 4096):
            texts += [str(t) for t in batch.samples]
            labels.append(batch.labels)
            ids.append(batch.ids)
        labels, test = np.concatenate(labels), held_out(np.concatenate(ids), config.test_fraction)
        return Dataset(name, [t for t, h in zip(texts, test) if not h], labels[~test], [t for t, h in zip(texts, test) if h],
                       labels[test])
    raise SystemExit(f"unknown dataset {name!r}")


def pixel_pca(fit: np.ndarray, dims: int = 64) -> Callable[[np.ndarray], np.ndarray]:
    """Projection of uint8 images onto the top ``dims`` principal components of the pixels of ``fit``."""
    x = fit.reshape(len(fit), -1).astype(np.float32) / 255.0
    mean = x.mean(axis=0)
    _, vectors = np.linalg.eigh(((x - mean).T @ (x - mean)).astype(np.float64))  # ascending eigenvalues
    basis = vectors[:, ::-1][:, :dims].astype(np.float32)
    return lambda images: (images.reshape(len(images), -1).astype(np.float32) / 255.0 - mean) @ basis


def features(data: Dataset, name: str, cache: Path, split: str = "train") -> tuple[Any, float]:
    """(features, seconds per 1,000 samples), computed once and cached as ``.npy``; ``gradient32``
    is a ``GradientEmbedding`` (never materialised: C·D values per sample) built on ``effnet32``."""
    if name == "gradient32":
        from dq_ops.features import gradient_embedding

        embedding, seconds = features(data, "effnet32", cache, split)
        return gradient_embedding(embedding, data.labels, seed=0), seconds
    path = cache / f"{data.name}-{split}-{name}.npy"
    timing = path.with_suffix(".seconds")
    if path.exists():
        return np.load(path), float(timing.read_text())
    samples = data.train if split == "train" else data.test
    started = time.perf_counter()
    if name == "minilm":
        from dq_ops.backbones import load_text_extractor

        values = load_text_extractor()(samples)
    elif name == "pixels-pca":
        values = pixel_pca(samples)(samples)
    elif name == "mae":  # the flow's own MAE (PatchConfig defaults, 6,000 seeded images), its encoder's mean token
        from dq_ops.config import PatchConfig
        from dq_ops.mae import MAEConfig, mae_embedding, train_mae

        patches = PatchConfig()
        rows = np.sort(np.random.default_rng(0).permutation(len(samples))[:patches.mae_train_samples])
        config = MAEConfig(image_size=samples.shape[1:3], in_chans=samples.shape[3] if samples.ndim == 4 else 1,
                           patch_size=patches.patch_size,
                           mask_ratio=patches.mae_mask_ratio)
        model, _ = train_mae(samples[rows], config, seed=0, epochs=patches.mae_epochs)
        values = mae_embedding(model, samples)
    elif name.startswith("effnet"):
        import torch

        from dq_ops.backbones import load_image_extractor

        size = int(name[len("effnet"):].removesuffix("spatial"))
        extractor = load_image_extractor(image_size=size, device=torch.device("cpu"))
        if name.endswith("spatial"):  # the last feature map before global pooling: 1,280 × (size / 32)² values
            extractor.model.global_pool = torch.nn.Identity()
            extractor.dim *= (size // 32) ** 2
        values = np.concatenate([extractor(samples[i:i + 2048]) for i in range(0, len(samples), 2048)])
    else:
        raise SystemExit(f"unknown features {name!r}")
    seconds = 1000 * (time.perf_counter() - started) / len(samples)
    np.save(path, np.asarray(values, dtype=np.float32))
    timing.write_text(f"{seconds:.4f}")
    return np.load(path), seconds


# -- arms ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    features: str | None = None  # None: random
    weights: str = "uniform"

    @classmethod
    def parse(cls, text: str, data: Dataset) -> Arm:
        if text == "random":
            return cls(text)
        parts = text.split(":")
        defaults = DQConfig()
        feature = "minilm" if data.is_text else f"effnet{defaults.embedding.image_size}"
        if parts[0] != "dq" or len(parts) > 3:
            raise SystemExit(f"arm {text!r}: expected random or dq[:FEATURES[:WEIGHTS]]")
        feature = parts[1] if len(parts) > 1 else feature
        default_rule = defaults.sampling.rule_for("texts" if data.is_text else "images")
        return cls(text, feature, parts[2] if len(parts) > 2 else default_rule)


class Selector:
    """Subsets of every arm, with bins computed once per feature space."""

    def __init__(self, data: Dataset, cache: Path):
        self.data, self.cache = data, cache
        self.kernel = "dot" if data.is_text else BinsConfig().kernel
        self.default_features = "minilm" if data.is_text else f"effnet{DQConfig().embedding.image_size}"
        self._bins: dict[str, list[np.ndarray]] = {}
        self.seconds: dict[str, float] = {}

    def features(self, name: str) -> np.ndarray:
        values, per_thousand = features(self.data, name, self.cache)
        self.seconds[f"features {name} (s per 1,000)"] = per_thousand
        return values

    def bins(self, name: str) -> list[np.ndarray]:
        """The flow's default bins on features ``name``, cached in ``<cache>/`` next to the features."""
        if name not in self._bins:
            config = BinsConfig()
            path = self.cache / f"{self.data.name}-train-{name}-bins-{config.num_bins}-{self.kernel}-{config.budget_rule}.npz"
            if not path.exists():
                started = time.perf_counter()
                bins = generate_bins(self.features(name), self.data.labels, config.num_bins, kernel=self.kernel,
                                     budget_rule=config.budget_rule)
                np.savez(path, *bins)
                self.seconds[f"bins {name} (s)"] = time.perf_counter() - started
            with np.load(path) as stored:
                self._bins[name] = [stored[f"arr_{b}"] for b in range(len(stored.files))]
        return self._bins[name]

    def select(self, arm: Arm, ratio: float, seed: int) -> np.ndarray:
        labels = self.data.labels
        if arm.features is None:
            sizes = sample_sizes(self.bins(self.default_features), labels, ratio, ROUNDING)
            return select_random(np.zeros((len(labels), 1), np.float32), labels, ratio, seed, sizes=sizes)
        bins = self.bins(arm.features)
        weights = bin_intensities(arm.weights, bins, labels, ratio=ratio, rounding=ROUNDING,
                                  features=lambda: self.features(arm.features), alpha=SamplingConfig().adaptive_alpha)
        return sample_bins(bins, labels, ratio, seed, weights=weights, rounding=ROUNDING)


# -- training ------------------------------------------------------------------------------------
def _load_worker(dataset: str, cache: Path) -> None:
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)  # the text classifier's BLAS too: one core per job
    data = load_dataset(dataset)
    _WORKER["data"] = data
    if data.is_text:
        _WORKER["train"] = features(data, "minilm", cache)[0]
        _WORKER["test"] = features(data, "minilm", cache, "test")[0]


def budget(scale: float) -> tuple[float, int]:
    """(epochs, min_steps): the flow's training budget times ``scale``, epochs and minimum steps alike."""
    config = EvaluationConfig()
    return config.epochs * scale, max(1, round(config.min_steps * scale))


def evaluate(subset: np.ndarray, seed: int, epochs: float, min_steps: int) -> float:
    """Test accuracy of the flow's evaluation on ``subset`` with this budget (runs in a worker process)."""
    data: Dataset = _WORKER["data"]
    if data.is_text:
        from dq_ops.text_eval import evaluate_text_subset

        return evaluate_text_subset(_WORKER["train"][subset], data.labels[subset], _WORKER["test"],
                                    data.test_labels).logistic_regression_accuracy
    from dq_ops.stages import train_config
    from dq_ops.train import train_and_evaluate

    config = EvaluationConfig(epochs=epochs, min_steps=min_steps)
    result = train_and_evaluate(data.train[subset], data.labels[subset], data.test, data.test_labels,
                                model=config.architecture, config=train_config(config), seed=seed)
    return result.test_accuracy


def subset_digest(subset: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(subset, dtype=np.int64).tobytes()).hexdigest()[:16]


def run_jobs(jobs: list[tuple[Arm, float, int, float]], selector: Selector, results: dict, path: Path, workers: int) -> None:
    """Train every (arm, ratio, seed, budget scale) not in ``results``; append each result to ``path``.

    A job whose subset another arm already trained with the same seed and budget (two rules that
    agree at this ratio) reuses that accuracy: the training is a function of (subset, seed, budget).
    """
    trained = {(r["subset"], r["seed"], r["epochs"], r["min_steps"]): r["accuracy"]
               for r in results.values() if "subset" in r}
    todo = []
    for job in (job for job in jobs if _key(*job) not in results):
        arm, ratio, seed, scale = job
        subset = selector.select(arm, ratio, seed)
        key = (subset_digest(subset), seed, *budget(scale))
        if key in trained:
            _record(results, path, job, subset, trained[key])
        else:
            todo.append((job, subset))
    if not todo:
        return
    print(f"{len(todo)} evaluations to run ({len(jobs) - len(todo)} cached)", file=sys.stderr, flush=True)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_load_worker,
                             initargs=(selector.data.name, selector.cache)) as pool:
        futures = {pool.submit(evaluate, subset, job[2], *budget(job[3])): (job, subset) for job, subset in todo}
        for future in as_completed(futures):
            (arm, ratio, seed, scale), subset = futures[future]
            accuracy = _record(results, path, (arm, ratio, seed, scale), subset, future.result())
            print(f"{arm.name:>24} {ratio:6.1%} ×{scale:<4} draw {seed}: {len(subset):6d} samples, test {accuracy:.4f}",
                  file=sys.stderr, flush=True)


def _record(results: dict, path: Path, job: tuple[Arm, float, int, float], subset: np.ndarray, accuracy: float) -> float:
    arm, ratio, seed, scale = job
    epochs, min_steps = budget(scale)
    record = {"arm": arm.name, "ratio": ratio, "seed": seed, "epochs": epochs, "min_steps": min_steps, "size": len(subset),
              "subset": subset_digest(subset), "accuracy": accuracy}
    results[_key(*job)] = record
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    return accuracy


def _key(arm: Arm, ratio: float, seed: int, scale: float) -> tuple:
    return (arm.name, ratio, seed, *budget(scale))


# -- report --------------------------------------------------------------------------------------
def print_table(arms: list[Arm], ratios: list[float], draws: int, results: dict, selector: Selector) -> None:
    sizes = {r: len(selector.select(arms[0], r, 0)) for r in ratios}
    header = f"{'arm':<24}" + "".join(f"{f'{r:.0%} (n={sizes[r]})':>20}" for r in ratios)
    print(header)
    print("-" * len(header))
    accuracy = {(a.name, r): [results[_key(a, r, s, 1.0)]["accuracy"] for s in range(draws)] for a in arms for r in ratios}
    for arm in arms:
        cells = summarize_accuracies({r: accuracy[(arm.name, r)] for r in ratios})
        print(f"{arm.name:<24}" + "".join(f"{cells[r].as_percent():>20}" for r in ratios))
    print("\nGap to random (same draws), points: mean [95% t-interval] verdict")
    for arm in arms:
        if arm.features is None:
            continue
        cells = []
        for r in ratios:
            gap = paired_gap(accuracy[(arm.name, r)], accuracy[("random", r)])
            cells.append(f"{100 * gap.mean:+.2f} [{100 * gap.ci_low:+.2f},{100 * gap.ci_high:+.2f}] {gap.verdict[:6]}")
        print(f"{arm.name:<24}" + "".join(f"{c:>30}" for c in cells))
    print(f"\nCoverage in {selector.default_features} (mean / p95 distance to the nearest selected sample of the class; "
          f"mean over the draws)")
    space = selector.features(selector.default_features)
    for arm in arms:
        cells = []
        for r in ratios:
            measured = [subset_coverage(space, selector.data.labels, selector.select(arm, r, s)) for s in range(min(draws, 3))]
            cells.append(f"{np.mean([m.mean for m in measured]):.4f} / {np.mean([m.p95 for m in measured]):.4f}")
        print(f"{arm.name:<24}" + "".join(f"{c:>20}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["fashion-mnist", "digits", "fortunes"], default="fashion-mnist")
    parser.add_argument("--arms", nargs="+", default=["random", "dq"], help="random, dq[:FEATURES[:WITHIN]]")
    parser.add_argument("--ratios", type=float, nargs="+", default=DEFAULT_RATIOS)
    parser.add_argument("--draws", type=int, default=10, help="paired draws per arm and ratio (seeds 0..N-1)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once (one process and torch thread each)")
    parser.add_argument("--budget-curve", type=float, default=None, metavar="RATIO")
    parser.add_argument("--budget-scales", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--curve-draws", type=int, default=5, help="paired draws per point of the budget curve")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "dq-quality-cache")
    args = parser.parse_args()
    if any(not 0 < r < 1 for r in args.ratios) or args.draws < 2:
        parser.error("--ratios must lie in (0, 1) and --draws be >= 2 (an interval needs two draws)")
    started = time.perf_counter()
    args.cache.mkdir(parents=True, exist_ok=True)
    data = load_dataset(args.dataset)
    arms = [Arm.parse(a, data) for a in dict.fromkeys(["random", *args.arms])]
    selector = Selector(data, args.cache)
    path = args.cache / f"results-{data.name}.jsonl"
    results = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if "subset" not in r and (r["arm"] == "random" or r["arm"].startswith("dq")):  # written before digests
                r["subset"] = subset_digest(selector.select(Arm.parse(r["arm"], data), r["ratio"], r["seed"]))
            if data.is_text:  # a text evaluation fits a classifier: no training budget
                r["epochs"], r["min_steps"] = budget(1.0)
            elif "epochs" not in r:  # written when records carried a scale of the budget of the time
                r["epochs"], r["min_steps"] = 30.0 * r["budget_scale"], max(1, round(500 * r["budget_scale"]))
            results[(r["arm"], r["ratio"], r["seed"], r["epochs"], r["min_steps"])] = r
    jobs = [(arm, r, s, 1.0) for r in args.ratios for s in range(args.draws) for arm in arms]
    curve_arms = arms[:2]
    if args.budget_curve is not None:
        jobs += [(arm, args.budget_curve, s, scale) for scale in args.budget_scales for s in range(args.curve_draws)
                 for arm in curve_arms]
    run_jobs(jobs, selector, results, path, args.jobs)

    config = EvaluationConfig()
    evaluation = ("logistic regression on MiniLM embeddings (dq_ops.text_eval)" if data.is_text else
                  f"{config.architecture} from scratch, the flow's budget ({config.epochs:g} epochs, ≥ {config.min_steps} steps)")
    print(f"{data.name}: {len(data.labels):,} train / {len(data.test_labels):,} test; {evaluation}; {args.draws} paired draws "
          f"(seed s draws the subset and seeds the training); final test accuracy, %")
    print_table(arms, args.ratios, args.draws, results, selector)
    if args.budget_curve is not None:
        print(f"\nBudget curve at {args.budget_curve:.0%}: the flow's budget × scale, mean ± std over the draws")
        for arm in curve_arms:
            cells = summarize_accuracies({scale: [results[_key(arm, args.budget_curve, s, scale)]["accuracy"]
                                                  for s in range(args.curve_draws)] for scale in args.budget_scales})
            print(f"{arm.name:<24}" + "".join(f"{f'×{scale:g} ' + cells[scale].as_percent():>22}" for scale in args.budget_scales))
    print(f"\nwall time {time.perf_counter() - started:.0f} s; " + ", ".join(f"{k} {v:.2f}" for k, v in selector.seconds.items()))


if __name__ == "__main__":
    main()
