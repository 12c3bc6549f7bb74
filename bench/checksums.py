"""What chunk checksums cost: ingest and embedding-write throughput with and without them.

Every array the store writes ends its codec pipeline in a CRC32C per chunk, and every commit
records each array's chunk count (``dq_ops.store``). This times, on the same data, with the
checksum codec in place and with it left out (``dq_ops.store.checksummed`` replaced for the
"without" side; the chunk-count record is written either way):

* ingest: the real ``dq_ops.ingest.ingest`` of Fashion-MNIST (``--limit`` images per split) into a
  fresh store, source decoding included, as ``dq ingest`` does it;
* embedding write: writing ``--rows`` × 1280 float32 ReLU-like features (about half exact zeros)
  in the embeddings stage's chunks (4096 rows, Blosc-LZ4) and committing the artifact: the store
  side of the embeddings stage, without the model;
* embeddings stage: the real ``EmbeddingsStage`` (EfficientNet-Lite0 at 32 px, no cluster) over
  the first ``--embed-images`` training images of the ingested snapshot: model and write together,
  what a run pays;
* open: ``Store.open`` of the ingested snapshot, and the part of it that lists the chunks to
  find lost ones (the same on both sides).

After one uncounted warm-up round, sides alternate for ``--repeats`` rounds; medians of wall time and of the process's CPU time
(all threads, user + system) are reported with their throughput ratios (with / without). On a
shared machine the CPU-time ratio is the steadier figure; the load average is printed.

    python bench/checksums.py [--limit N] [--rows N] [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dq_ops import store as store_module  # noqa: E402
from dq_ops.config import DatasetConfig, EmbeddingConfig  # noqa: E402
from dq_ops.embed import EmbeddingsStage  # noqa: E402
from dq_ops.ingest import ingest  # noqa: E402
from dq_ops.store import Store, feature_compressor, write_array  # noqa: E402

WITH = store_module.checksummed


def without(compressor):
    """The codec list before checksums: the compressor alone (none for texts)."""
    return None if compressor is None else [compressor]


def timed(action: Callable[..., object], *args: object, repeat: int = 1) -> float:
    """Seconds per call of ``action(*args)``, over ``repeat`` calls."""
    start = time.perf_counter()
    for _ in range(repeat):
        action(*args)
    return (time.perf_counter() - start) / repeat


def write_features(store: Store, features: np.ndarray, chunk_rows: int) -> None:
    """Features written and committed as the embeddings stage's workers and commit do."""
    with store.write("embeddings", "bench", {}) as group:
        out = write_array(group, "features", shape=features.shape, dtype=np.float32, chunk_rows=chunk_rows,
                          compressor=feature_compressor())
        for start in range(0, len(features), chunk_rows):
            out[start:start + chunk_rows] = features[start:start + chunk_rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="images per split to ingest (default: all 60k + 10k)")
    parser.add_argument("--rows", type=int, default=60_000, help="feature rows written per embedding write")
    parser.add_argument("--embed-images", type=int, default=1000, help="images per embeddings-stage run")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    config = DatasetConfig(limit=args.limit)
    rng = np.random.default_rng(0)
    features = np.maximum(rng.standard_normal((args.rows, 1280), dtype=np.float32), 0)
    times: dict[str, dict[str, list[tuple[float, float]]]] = {stage: {"with": [], "without": []} for stage in ("ingest", "embed", "stage")}
    opens: list[float] = []
    listings: list[float] = []
    samples = 0
    with tempfile.TemporaryDirectory() as root:
        for round_ in range(-1, args.repeats):  # round -1 warms up (imports, model weights, page cache): not counted
            for side in ("with", "without") if round_ % 2 == 0 else ("without", "with"):
                record = times if round_ >= 0 else {stage: {"with": [], "without": []} for stage in times}
                store_module.checksummed = WITH if side == "with" else without
                store = Store(f"{root}/{side}-{round_}")
                start, cpu = time.perf_counter(), time.process_time()
                snapshot = ingest(config, store)
                record["ingest"][side].append((time.perf_counter() - start, time.process_time() - cpu))
                samples = sum(snapshot.counts.values())
                if round_ >= 0:
                    opens.append(timed(store.open, "datasets", snapshot.name, repeat=20))
                    chunks = store.open("datasets", snapshot.name).record["chunks"]
                    listings.append(timed(store._chunk_counts, ("datasets", snapshot.name), chunks, repeat=20))
                start, cpu = time.perf_counter(), time.process_time()
                write_features(store, features, 4096)
                record["embed"][side].append((time.perf_counter() - start, time.process_time() - cpu))
                small = ingest(DatasetConfig(name="small", limit=args.embed_images), store)
                stage = EmbeddingsStage(store, store.open("datasets", small.name), "train",
                                        EmbeddingConfig(image_size=32, chunk_rows=250), seed=0, precision="float32")
                start, cpu = time.perf_counter(), time.process_time()
                stage.run()
                record["stage"][side].append((time.perf_counter() - start, time.process_time() - cpu))
    store_module.checksummed = WITH

    feature_mb = features.nbytes / 2**20
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; {args.repeats} rounds, medians")
    print(f"{'':<28}{'with':>14}{'without':>14}{'ratio (wall)':>14}{'ratio (CPU)':>13}")
    for stage, label, unit, amount in (("ingest", f"ingest ({samples:,})", "img/s", samples),
                                       ("embed", f"features ({feature_mb:.0f} MB)", "MB/s", feature_mb),
                                       ("stage", f"embeddings stage ({args.embed_images:,})", "img/s", args.embed_images)):
        (wall_with, cpu_with), (wall_without, cpu_without) = (
            tuple(statistics.median(column) for column in zip(*times[stage][side])) for side in ("with", "without")
        )
        print(f"{label:<28}{amount / wall_with:>8.0f} {unit:<5}{amount / wall_without:>8.0f} {unit:<5}"
              f"{wall_without / wall_with:>14.3f}{cpu_without / cpu_with:>13.3f}")
    print(f"open snapshot {statistics.median(opens) * 1e3:.2f} ms, of which listing its chunks {statistics.median(listings) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
