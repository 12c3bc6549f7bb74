"""Stage-1 throughput: ``embed_dataset`` on a dask cluster next to a bare loop of the same model.

    python bench/embed.py [--rows 2048] [--image-size 32] [--batch-size 256] [--chunk-rows 256]
                          [--threads 2] [--repeats 3] [--cluster auto|local]

Both sides get the same thread budget (``--threads``) and embed the same ingested Fashion-MNIST
rows in the same batches:

- bare loop, torch intra-op threads: the extractor called over the in-memory images with
  ``torch.set_num_threads(threads)``;
- bare loop, Python threads: ``threads`` Python threads, one torch thread each, over the same
  row chunks as the stage (the parallelism the stage itself uses);
- the stage: a ``LocalCluster`` of 1 worker × ``threads`` threads (dask starts workers with
  ``OMP_NUM_THREADS=1``, so each thread embeds one chunk single-threaded), reading its chunks
  from the Zarr store and writing features back. The worker's model is loaded before timing (as
  a warm worker would hold it); the stage figure is ``EmbeddingResult.samples_per_second`` (first
  task submitted to last finished: reads, extraction and writes).

The three are run in turn ``--repeats`` times and the medians are compared, because on a shared
machine the load changes from minute to minute.

``--cluster auto`` picks a LocalCUDACluster where dask-cuda sees a GPU; the extractor then runs
channels-last under bf16 autocast.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from dq_ops.backbone_spec import ExtractorSpec
from dq_ops.backbones import get_extractor
from dq_ops.cluster import dask_client, resolve_kind
from dq_ops.config import ClusterConfig, DatasetConfig, EmbeddingConfig
from dq_ops.embed import embed_dataset
from dq_ops.ingest import ingest
from dq_ops.store import Store


def _load_model(spec: ExtractorSpec) -> None:
    """Worker side: fill the worker's model cache (returns nothing: the model stays there)."""
    get_extractor(spec)


def _rate(rows: int, seconds: list[float]) -> str:
    """Median throughput over the repeats, with each run's seconds."""
    runs = ", ".join(f"{t:.1f}" for t in seconds)
    return f"{rows / float(np.median(seconds)):7.1f} img/s  (runs: {runs} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--chunk-rows", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cluster", choices=["auto", "local"], default="auto")
    args = parser.parse_args()
    config = EmbeddingConfig(image_size=args.image_size, batch_size=args.batch_size)
    cluster = ClusterConfig(kind=args.cluster, n_workers=1, threads_per_worker=args.threads)
    spec = ExtractorSpec("images", config.backbone, config.weights, config.image_size)

    with tempfile.TemporaryDirectory(prefix="dq-bench-embed-") as root, dask_client(cluster) as client:
        store = Store(root)
        dataset = ingest(DatasetConfig(limit=args.rows), store)
        images = store.open("datasets", dataset.name)["train/images"][:]
        rows = len(images)
        chunks = [images[s:s + args.chunk_rows] for s in range(0, rows, args.chunk_rows)]
        extractor = get_extractor(spec)
        client.run(_load_model, spec)  # warm worker: the model stays cached in its process
        print(
            f"embed bench: {config.backbone}, {rows} Fashion-MNIST images at {args.image_size} px, batch "
            f"{args.batch_size}, chunks of {args.chunk_rows} rows, {args.threads} threads, "
            f"device {extractor.device} ({extractor.precision}), cluster {resolve_kind(cluster)}, "
            f"median of {args.repeats} interleaved runs"
        )
        extractor(images[: args.batch_size], args.batch_size)  # first-call allocations
        timings: dict[str, list[float]] = {"intra": [], "threads": [], "stage": []}
        for _ in range(args.repeats):
            torch.set_num_threads(args.threads)
            start = time.perf_counter()
            bare = extractor(images, args.batch_size)
            timings["intra"].append(time.perf_counter() - start)

            torch.set_num_threads(1)
            start = time.perf_counter()
            with ThreadPoolExecutor(args.threads) as pool:
                list(pool.map(lambda chunk: extractor(chunk, args.batch_size), chunks))
            timings["threads"].append(time.perf_counter() - start)

            shutil.rmtree(f"{root}/embeddings", ignore_errors=True)  # recompute, do not reuse
            result = embed_dataset(store, dataset.name, "train", config, client, seed=0, chunk_rows=args.chunk_rows)
            timings["stage"].append(rows / result.samples_per_second)

        print(f"bare loop, torch {args.threads} intra-op threads:         {_rate(rows, timings['intra'])}")
        print(f"bare loop, {args.threads} Python threads x 1 torch thread:  {_rate(rows, timings['threads'])}")
        print(f"embed_dataset, 1 worker x {args.threads} threads:          {_rate(rows, timings['stage'])}")
        stage = float(np.median(timings["stage"]))
        print(f"stage / bare (intra-op threads): {float(np.median(timings['intra'])) / stage:.2f}x")
        print(f"stage / bare (Python threads):   {float(np.median(timings['threads'])) / stage:.2f}x")
        features = result.artifact["features"][:]
        print(f"max |stage - bare| feature difference: {np.abs(features - bare).max():.2e}")


if __name__ == "__main__":
    main()
