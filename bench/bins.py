r"""GraphCut bin generation: ``dq_ops.bins.generate_bins`` against the literal reference greedy.

    python bench/bins.py [--quick]

Three cases, each in its own subprocess (so that its peak RSS is its own), on embedding-like
features: non-negative and clustered like post-ReLU penultimate features
(``relu(center + 0.7·noise)``, 10 cluster centres per class), float32, generated in chunks
from a fixed seed.

(a) 50,000 × 512, 10 balanced classes, 10 bins, cosine: our time, then the literal reference
    greedy (``tests/test_bins.py::literal_bins``: per class and bin it builds the float32
    similarity matrix of the remaining samples and re-sums the selected rows at every pick,
    as the reference code does) on ``--ref-classes`` of the classes (default 1). The classes
    are independent and equally sized (the per-class budget is n_c/K either way), so the
    reference's full time is extrapolated as time × classes / classes timed, and the pick
    agreement is measured on the classes it ran, against the literal greedy in float32 (the
    reference's precision) and in float64 (untimed).
(b) 100,000 × 384, no labels, 10 bins: time and peak RSS (``resource.getrusage``; the process
    holds the 154 MB of features too).
(c) 1,280,000 × 512, 1,000 classes, 10 bins (ImageNet-sized): time and peak RSS.

``--quick`` shrinks every case by 10× (the reference then runs on all classes of (a)).
Timings depend on the machine's load, which is printed with the table.

    python bench/bins.py --per-class 1280 12800 25600 51200 [--dim 1280] [--features rows.npy]

How one class's greedy grows with its size, as a dask worker runs it (``generate_class_bins``
with the flow's defaults: 10 bins, ``per-class`` budgets, cosine, the 256 MB Gram budget; one
BLAS thread): one class of each size, each in its own subprocess, on the embedding-like rows
above (or the first rows of ``--features``, a saved (n, d) array, e.g. real embeddings). Between
consecutive sizes the growth exponent :math:`e = \log(t_2/t_1) / \log(n_2/n_1)`; the last one
projects a class of 128,000 (1,280,000 samples in 10 classes) as :math:`t_{last} (128000/n_{last})^e`,
and the smallest size's time × 1,000 gives 1,000 classes of it (1,280 each: ImageNet-1k's shape).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the literal reference lives in the tests

from dq_ops.bins import generate_bins  # noqa: E402
from dq_ops.features import single_threaded_blas  # noqa: E402

CASES = {
    #        samples    dim  classes  goal (s)  goal RSS (MB)
    "a": (50_000, 512, 10, None, None),
    "b": (100_000, 384, 0, 60, 1024),
    "c": (1_280_000, 512, 1000, 300, None),
}


def embedding_like(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Non-negative clustered float32 features and balanced, shuffled labels (None if classes=0)."""
    rng = np.random.default_rng(seed)
    groups = max(classes, 1)
    centres = rng.standard_normal((groups * 10, dim), dtype=np.float32)
    labels = rng.permutation(np.repeat(np.arange(groups), n // groups)) if classes else None
    owner = labels if labels is not None else np.zeros(n, dtype=np.int64)
    cluster = owner * 10 + rng.integers(10, size=n)
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 65536):
        chunk = centres[cluster[s : s + 65536]]
        chunk += 0.7 * rng.standard_normal(chunk.shape, dtype=np.float32)
        np.maximum(chunk, 0.0, out=x[s : s + 65536])
    return x, labels


def run_case(name: str, scale: int, ref_classes: int) -> dict:
    """Child process: one case; returns its figures as a dict."""
    n, dim, classes, _, _ = CASES[name]
    n, classes = n // scale, classes // scale if classes >= scale * 10 else classes
    features, labels = embedding_like(n, dim, classes, seed=0)
    start = time.perf_counter()
    bins = generate_bins(features, labels, 10)
    ours = time.perf_counter() - start
    out = {"n": n, "dim": dim, "classes": classes, "ours_s": ours, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if name == "a":
        from tests.test_bins import literal_bins

        bin_of_sample = np.empty(n, dtype=np.int64)
        for b, members in enumerate(bins):
            bin_of_sample[members] = b
        timed = classes if scale > 1 else min(ref_classes, classes)
        members = [np.flatnonzero(labels == c) for c in range(timed)]
        with single_threaded_blas():  # the same BLAS setting as ours (see dq_ops.features)
            start = time.perf_counter()
            ref32 = [literal_bins(features[m], None, 10) for m in members]
            ref = time.perf_counter() - start
            ref64 = [literal_bins(features[m], None, 10, dtype=np.float64) for m in members]
        ours_bins = [bin_of_sample[m] for m in members]
        total = sum(len(m) for m in members)

        def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
            return sum(int((x == y).sum()) for x, y in zip(a, b)) / total

        out.update(
            ref_s=ref, ref_classes=timed, ref_full_s=ref * classes / timed, compared=total,
            agree32=agreement(ours_bins, ref32), agree64=agreement(ours_bins, ref64), ref_self=agreement(ref32, ref64),
        )
    return out


def run_class(n: int, dim: int, features_path: Path | None) -> dict:
    """Child process: one class of ``n`` rows through ``generate_class_bins`` with the flow's defaults."""
    from dq_ops.bins import bin_budgets, generate_class_bins
    from dq_ops.config import BinsConfig

    if features_path is None:
        rows, _ = embedding_like(n, dim, 0, seed=0)
    else:
        stored = np.load(features_path, mmap_mode="r")
        if len(stored) < n:
            raise SystemExit(f"{features_path} has {len(stored):,} rows, fewer than {n:,}")
        rows = np.ascontiguousarray(stored[:n], dtype=np.float32)
    config = BinsConfig()
    budgets = bin_budgets([n], config.num_bins, config.budget_rule)[0]
    start = time.perf_counter()
    generate_class_bins(rows, budgets, kernel=config.kernel, memory_budget_mb=config.memory_budget_mb)
    return {"n": n, "dim": rows.shape[1], "seconds": time.perf_counter() - start,
            "zero_share": float((rows == 0).mean()), "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def per_class(sizes: list[int], dim: int, features_path: Path | None) -> None:
    source = f"the first rows of {features_path}" if features_path else f"embedding-like rows, {dim} dims"
    print(f"bench/bins.py --per-class: {source}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    print("\n| rows in the class | seconds | growth exponent from the previous size | share of zeros | peak RSS (MB) | load average after |")
    print("|---|---|---|---|---|---|")
    results: list[dict] = []
    for n in sorted(sizes):
        cmd = [sys.executable, __file__, "--class-rows", str(n), "--dim", str(dim)]
        cmd += ["--features", str(features_path)] if features_path else []
        result = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        exponent = (np.log(result["seconds"] / results[-1]["seconds"]) / np.log(n / results[-1]["n"])) if results else None
        result["exponent"] = exponent
        results.append(result)
        print(f"| {n:,} | {result['seconds']:.1f} | {'–' if exponent is None else f'{exponent:.2f}'} | "
              f"{result['zero_share']:.2f} | {result['rss_mb']:.0f} | {os.getloadavg()[0]:.1f} |", flush=True)
    last, smallest = results[-1], results[0]
    if last["exponent"] is not None:
        one = last["seconds"] * (128_000 / last["n"]) ** last["exponent"]
        print(f"\nprojected: one class of 128,000 rows {one:,.0f} s; 10 of them {10 * one / 3600:.1f} core-hours")
    print(f"1,000 classes of {smallest['n']:,} rows: {1000 * smallest['seconds'] / 3600:.2f} core-hours")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every case 10x smaller")
    parser.add_argument("--ref-classes", type=int, default=1, help="classes of (a) the literal reference runs on")
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--per-class", type=int, nargs="+", metavar="ROWS", help="one class of each size (see above)")
    parser.add_argument("--dim", type=int, default=1280, help="feature dimensions of --per-class (default 1280, EfficientNet-Lite0's)")
    parser.add_argument("--features", type=Path, help="--per-class on the first rows of this saved (n, d) array")
    parser.add_argument("--class-rows", type=int, help=argparse.SUPPRESS)  # child mode of --per-class
    args = parser.parse_args()
    if args.class_rows:
        print(json.dumps(run_class(args.class_rows, args.dim, args.features)))
        return
    if args.per_class:
        per_class(args.per_class, args.dim, args.features)
        return
    scale = 10 if args.quick else 1
    if args.case:
        print(json.dumps(run_case(args.case, scale, args.ref_classes)))
        return

    print(f"bench/bins.py{' --quick' if args.quick else ''}: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    results = {}
    for name in CASES:
        cmd = [sys.executable, __file__, "--case", name, "--ref-classes", str(args.ref_classes)] + (["--quick"] if args.quick else [])
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  case ({name}) done, load average {os.getloadavg()[0]:.1f}", flush=True)

    print()
    print("| case | samples × dim | classes | ours (s) | reference (s) | speed-up | pick agreement | peak RSS (MB) | goal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        _, _, _, goal_s, goal_mb = CASES[name]
        if name == "a":
            ref = f"{r['ref_full_s']:.1f}" + ("" if r["ref_classes"] == r["classes"] else f" (extrapolated: {r['ref_s']:.1f} s on {r['ref_classes']} of {r['classes']} classes)")
            speed = f"{r['ref_full_s'] / r['ours_s']:.0f}×"
            agree = f"{100 * r['agree64']:.2f}% (float64 literal), {100 * r['agree32']:.2f}% (float32 literal)"
            goal = "≥ 20× and 100%"
        else:
            ref = speed = agree = "–"
            goal = f"≤ {goal_s} s" + (f", ≤ {goal_mb} MB" if goal_mb else "")
        classes = r["classes"] or "none"
        print(f"| ({name}) | {r['n']:,} × {r['dim']} | {classes} | {r['ours_s']:.1f} | {ref} | {speed} | {agree} | {r['rss_mb']:.0f} | {goal} |")
    a = results["a"]
    print(
        f"\n(a) agreement is over the {a['compared']:,} samples the literal reference binned. The float32 literal"
        f" reference agrees with its own float64 run on {100 * a['ref_self']:.2f}% of them: where they differ, near-tied"
        " gains are ordered by float32 rounding, and we follow the float64 order."
    )
    print(f"load average {os.getloadavg()[0]:.1f} at the end (2 cores shared with other work)")


if __name__ == "__main__":
    main()
