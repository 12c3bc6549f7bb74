r"""Coverage of a run's subsets: one pass over the features for all of them, against a pass each.

    PYTHONPATH=$PWD python bench/coverage.py [--rows 200000] [--dim 1280] [--classes 1000] [--repeats 2]

Writes a local Zarr store holding an embeddings artifact of ``--rows`` embedding-like rows
(non-negative and clustered like post-ReLU features, ``relu(centre + 0.7·noise)`` with one
centre per class; float32, the flow's feature codec, chunks of 10,000 rows) and measures the
four subsets a run measures (random draws at 10% and 60%, twice, each with 10 random bins) with
``dq_ops.stages.subsets_coverage`` in this process, as the flow measures a split of at most
131,072 rows and as each range job does on a worker: once for the four together (what the
``coverage`` task does), then once per subset (what each subset stage did before). The coverage
queries' rows are read once before either is timed (both share them, per process). Prints the
best wall time of ``--repeats`` for each, their ratio, and the largest difference between the
figures the two ways give. The features are read from a local disk here, where the flow reads
them from its store (S3 in ``bench/scale.py``): this isolates what a pass computes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from dq_ops.stages import subsets_coverage
from dq_ops.store import QUANTIZED_SPLIT, Store, feature_compressor, write_array

CHUNK_ROWS = 10_000
RATIOS = (0.1, 0.1, 0.6, 0.6)


def embedding_like(rows: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels): ``relu(centre of the row's class + 0.7·noise)``, float32."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, rows)
    centres = rng.normal(-0.5, 1.0, (classes, dim)).astype(np.float32)
    features = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, CHUNK_ROWS):
        block = labels[start:start + CHUNK_ROWS]
        features[start:start + len(block)] = np.maximum(
            0.0, centres[block] + 0.7 * rng.standard_normal((len(block), dim), dtype=np.float32))
    return features, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    features, labels = embedding_like(args.rows, args.dim, args.classes)
    rng = np.random.default_rng(1)
    subsets = [np.sort(rng.choice(args.rows, int(ratio * args.rows), replace=False)) for ratio in RATIOS]
    bin_of = rng.integers(0, 10, args.rows)
    bins = [np.flatnonzero(bin_of == b) for b in range(10)]
    with tempfile.TemporaryDirectory() as root:
        store = Store(root)
        with store.write_snapshot("datasets", "bench", {"rows": args.rows}) as write:
            write_array(write.group.create_group(QUANTIZED_SPLIT), "labels", labels)
        with store.write("embeddings", "bench", {"rows": args.rows}, [write.artifact.fingerprint]) as group:
            write_array(group, "features", features, chunk_rows=CHUNK_ROWS, compressor=feature_compressor())
        embeddings = store.open("embeddings", "bench")
        del features
        subsets_coverage(store, embeddings, labels, subsets[:1], bins)  # reads the queries' rows once
        timings: dict[str, list[float]] = {"one pass for the four": [], "a pass each": []}
        results: dict[str, list[dict[str, float]]] = {}
        for _ in range(args.repeats):
            started = time.perf_counter()
            results["one pass for the four"] = subsets_coverage(store, embeddings, labels, subsets, bins)
            timings["one pass for the four"].append(time.perf_counter() - started)
            started = time.perf_counter()
            results["a pass each"] = [subsets_coverage(store, embeddings, labels, [subset], bins)[0] for subset in subsets]
            timings["a pass each"].append(time.perf_counter() - started)
    together, apart = min(timings["one pass for the four"]), min(timings["a pass each"])
    difference = max(abs(a[k] - b[k]) for a, b in zip(*results.values()) for k in a)
    print(f"coverage of 4 subsets ({', '.join(f'{r:.0%}' for r in RATIOS)}) of {args.rows:,} rows × {args.dim}, "
          f"{args.classes:,} classes, best of {args.repeats}; load average {os.getloadavg()[0]:.1f}")
    print(f"  one pass for the four: {together:.2f} s")
    print(f"  a pass each:           {apart:.2f} s")
    print(f"  ratio (a pass each / one pass): {apart / together:.2f}×; largest difference in the figures: {difference:.2e}")


if __name__ == "__main__":
    main()
