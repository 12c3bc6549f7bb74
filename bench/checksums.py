"""What chunk checksums cost: ingest and embedding throughput with and without them.

Every array the store writes ends its codec pipeline in a CRC32C per chunk (zarr's
``Crc32cCodec``), and every commit records each array's chunk count (``dq_ops.store``). Three
workloads, each run with the checksum codec in place and with it left out
(``dq_ops.store.checksummed`` replaced for the "without" side; the chunk-count record is written
either way):

* ingest: the real ``dq_ops.ingest.ingest`` of Fashion-MNIST (``--limit`` images per split) into a
  fresh store, source decoding and the commit included, as ``dq ingest`` does;
* features write: ``--rows`` × 1280 float32 ReLU-like features (about half exact zeros, so they
  compress poorly: the worst case for a checksum over compressed bytes) written in the embeddings
  stage's chunks (4096 rows, Blosc-LZ4) and committed: the store side of the embeddings stage;
* embeddings stage: the real ``EmbeddingsStage`` (EfficientNet-Lite0 at 32 px, no cluster) over
  ``--embed-images`` training images: model and write together, what a run pays.

After one uncounted warm-up round, the sides alternate for ``--repeats`` rounds. Reported: the
medians of wall-clock throughput on both sides and their ratio, and, measured inside the "with"
runs, the share of the process's CPU time spent in the checksum codec (encode and verify, timed
per call with the calling thread's CPU clock). A commit reads back only the chunks whose digests
their writers did not record (``dq_ops.store.write_rows``), stripping the checksums it has just
computed without verifying them again (``dq_ops.store._WrittenCrc32c``, which costs nothing);
every later read verifies them. On a shared machine the A/B ratios carry the
machine's noise; the share does not, since the codec and the rest are timed in the same run.
Also printed: what ``Store.open`` of the snapshot costs, and the chunk listing within it that
finds lost chunks.

    python bench/checksums.py [--limit N] [--rows N] [--embed-images N] [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from zarr.codecs import Crc32cCodec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dq_ops import store as store_module  # noqa: E402
from dq_ops.config import DatasetConfig, EmbeddingConfig  # noqa: E402
from dq_ops.embed import EmbeddingsStage  # noqa: E402
from dq_ops.ingest import ingest  # noqa: E402
from dq_ops.store import Store, feature_compressor, write_array  # noqa: E402

WITH = store_module.checksummed
_codec_cpu = [0.0]
_codec_lock = threading.Lock()


def without(compressor):
    """The codec list before checksums: the compressor alone (none for texts)."""
    return None if compressor is None else [compressor]


def _clocked(method: Callable) -> Callable:
    """``method`` adding the CPU time of its calling thread to :data:`_codec_cpu`."""

    def run(self, *args):
        start = time.thread_time()
        try:
            return method(self, *args)
        finally:
            with _codec_lock:
                _codec_cpu[0] += time.thread_time() - start

    return run


Crc32cCodec._encode_sync = _clocked(Crc32cCodec._encode_sync)
Crc32cCodec._decode_sync = _clocked(Crc32cCodec._decode_sync)


def measure(action: Callable[..., Any], *args: Any) -> tuple[Any, tuple[float, float, float]]:
    """``action(*args)``, and its wall seconds, process CPU seconds and CPU seconds inside the
    checksum codec."""
    _codec_cpu[0] = 0.0
    wall, cpu = time.perf_counter(), time.process_time()
    result = action(*args)
    return result, (time.perf_counter() - wall, time.process_time() - cpu, _codec_cpu[0])


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
    parser.add_argument("--rows", type=int, default=60_000, help="feature rows written per features write")
    parser.add_argument("--embed-images", type=int, default=1000, help="images per embeddings-stage run")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    full, small = DatasetConfig(limit=args.limit), DatasetConfig(name="small", limit=args.embed_images)
    features = np.maximum(np.random.default_rng(0).standard_normal((args.rows, 1280), dtype=np.float32), 0)
    workloads = ("ingest", "features", "stage")
    runs: dict[str, dict[str, list[tuple[float, float, float]]]] = {w: {"with": [], "without": []} for w in workloads}
    opens: list[float] = []
    listings: list[float] = []
    samples = 0
    with tempfile.TemporaryDirectory() as root:
        for round_ in range(-1, args.repeats):  # round -1 warms up (imports, model weights, page cache)
            for side in ("with", "without") if round_ % 2 == 0 else ("without", "with"):
                store_module.checksummed = WITH if side == "with" else without
                store = Store(f"{root}/{side}-{round_}")
                measured = {}
                result, measured["ingest"] = measure(ingest, full, store)
                _, measured["features"] = measure(write_features, store, features, 4096)
                stage = EmbeddingsStage(store, store.open("datasets", ingest(small, store).name), "train",
                                        EmbeddingConfig(image_size=32, chunk_rows=250), seed=0, precision="float32")
                _, measured["stage"] = measure(stage.run)
                if round_ < 0:
                    continue
                for workload, figures in measured.items():
                    runs[workload][side].append(figures)
                snapshot = store.open("datasets", result.name)
                samples = sum(result.counts.values())
                start = time.perf_counter()
                for _ in range(20):
                    store.open("datasets", snapshot.name)
                opens.append((time.perf_counter() - start) / 20)
                start = time.perf_counter()
                for _ in range(20):
                    store._chunk_counts(("datasets", snapshot.name), snapshot.record["chunks"])
                listings.append((time.perf_counter() - start) / 20)
    store_module.checksummed = WITH

    feature_mb = features.nbytes / 2**20
    amounts = {"ingest": (samples, "img/s", f"ingest ({samples:,} images)"),
               "features": (feature_mb, "MB/s", f"features write ({feature_mb:.0f} MB)"),
               "stage": (args.embed_images, "img/s", f"embeddings stage ({args.embed_images:,} images)")}
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; {args.repeats} rounds, medians")
    print(f"{'':<34}{'with':>12}{'without':>12}{'with/without':>14}{'checksum CPU share':>20}")
    for workload in workloads:
        amount, unit, label = amounts[workload]
        wall_with, wall_without = (statistics.median(r[0] for r in runs[workload][side]) for side in ("with", "without"))
        share = statistics.median(codec / cpu for _, cpu, codec in runs[workload]["with"])
        print(f"{label:<34}{amount / wall_with:>7.0f} {unit:<5}{amount / wall_without:>6.0f} {unit:<5}"
              f"{wall_without / wall_with:>14.3f}{share:>19.2%}")
    print(f"Store.open of the snapshot: {statistics.median(opens) * 1e3:.2f} ms, "
          f"of which listing its chunks {statistics.median(listings) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
