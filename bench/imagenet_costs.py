"""What each stage costs per image at ImageNet size on this machine's CPU, and what ImageNet-1k would take.

    PYTHONPATH=$PWD python bench/imagenet_costs.py [--images 256] [--mae-images 16] [--repeats 2]

Every stage runs the pipeline's own function on images the size ImageNet's are:

- inputs: Fashion-MNIST training images upscaled to 400×350 (ImageNet's typical size), given a
  random foreground and background colour, a shading gradient and a little noise each, and
  JPEG-encoded (quality 90) into one Parquet shard in the Hugging Face layout; nothing is
  downloaded. Stored at 224×224×3 as ``dataset.resize: 224`` would store ImageNet.
- ingest: ``ParquetReader`` (decode, resize to 224, sample ids: the shard readers' path) alone,
  then the whole ``dq_ops.ingest.ingest`` (the same plus the Zarr store write) into a fresh store.
- embeddings: EfficientNet-Lite0 (ImageNet weights, the default backbone) through
  ``load_image_extractor`` as ``bench/embedding_cost.py`` measures it, at 32 px (the flow's
  default ``embedding.image_size``) and at 224 px, batches of 256 (the default) or of ``--images``.
- bins: ``generate_bins`` (10 bins, cosine) on ``--bin-classes`` ImageNet-sized classes of 1,281
  embedding-like 1,280-d rows (``bench/bins.py``'s generator; EfficientNet-Lite0's width):
  classes are binned independently, so the cost per image holds for 1,000 of them.
- patch scoring: ``keep_top_patches`` (Grad-CAM++ of the ImageNet EfficientNet-Lite0, θ = 0.2,
  4-px patches) at 112 px (the default ``patches.cam_image_size``) and at 224 px.
- MAE: ``train_mae`` steps and ``reconstruct`` at 224 px with the flow's MAE (``MAEConfig``
  defaults, mask ratio 0.4) for 4-px patches (the default ``patches.patch_size``: a 56×56 grid,
  3,136 tokens) on ``--mae-images`` images, and for 16-px patches (14×14, 196 tokens) on
  ``--images``. Batches of 8 (the flow trains in batches of 128, which at 3,136 tokens would need
  tens of GB); weights do not change the cost, so the reconstruction runs an untrained MAE.
- evaluation: ``train_and_evaluate`` of ``medium_cnn`` (the default architecture) for 1,000
  classes at 224 px, in batches of 32 (the flow's are 128: the per-image cost of a CNN step
  hardly depends on it); the training loop's own seconds (``TrainResult.train_seconds``).

Every stage runs with 1 torch thread (the flow's dask workers run single-threaded tasks) and the
repeats are interleaved (A B C … A B C …), so that a busy machine slows every stage alike; the
median is reported, as wall-clock and as CPU seconds of this process (on a machine shared with
other jobs the wall clock counts their time too; the CPU time is what the stage needs of a
core). The projection multiplies the CPU cost per image by the images the flow's
defaults (``dq_ops.config``) make each stage process for ImageNet-1k (1,281,167 training images)
at keep ratio 60%, and divides by the processes that share the work on 2 cores: 2 for stages
that run as chunk tasks on the two workers (and for the three evaluation trainings), 1 for
ingest (it runs in the flow process) and the MAE training (one task). No GPU is measured.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from bins import embedding_like  # bench/ is the script's folder, first on sys.path
from PIL import Image

from dq_ops.backbones import load_classifier, load_image_extractor
from dq_ops.bins import generate_bins
from dq_ops.config import DatasetConfig, EmbeddingConfig, EvaluationConfig, PatchConfig
from dq_ops.ingest import ingest
from dq_ops.mae import MAEConfig, MaskedAutoencoder, reconstruct, train_mae
from dq_ops.patches import select_patches
from dq_ops.pixel_work import keep_top_patches
from dq_ops.readers.idx import load_fashion_mnist
from dq_ops.readers.parquet import ParquetReader
from dq_ops.store import Store
from dq_ops.train import TrainConfig, split_validation, train_and_evaluate, training_steps

IMAGENET_TRAIN = 1_281_167
IMAGENET_CLASSES = 1000
KEEP_RATIO = 0.6
STORED_SIZE = 224
JPEG_SIZE = (400, 350)  # (W, H): about the mean size of ImageNet's training JPEGs
LITE0_DIM = 1280
MAE_BATCH = 8
EVALUATION_BATCH = 32


@dataclass
class Stage:
    name: str
    run: Callable[[], Cost]  # one measurement
    flow_images: int  # images (or image-steps) the stage processes for ImageNet-1k
    what: str  # how flow_images comes about
    parallel: int  # processes sharing the work on 2 cores
    default_run: bool  # counted in the flow's default total (else a part of a row, or another setting)
    costs: list[Cost] = field(default_factory=list)


def coloured_jpegs(gray: np.ndarray, seed: int) -> list[bytes]:
    """Each 28×28 image upscaled to ``JPEG_SIZE``, coloured, shaded, noised and JPEG-encoded."""
    rng = np.random.default_rng(seed)
    width, height = JPEG_SIZE
    shade = np.linspace(0.7, 1.0, width, dtype=np.float32)[None, :, None]
    encoded = []
    for image in gray:
        ink = np.asarray(Image.fromarray(image).resize(JPEG_SIZE, Image.Resampling.BICUBIC), dtype=np.float32)[..., None] / 255
        foreground, background = rng.uniform(0, 255, (2, 1, 1, 3)).astype(np.float32)
        pixels = (ink * foreground + (1 - ink) * background * shade + rng.normal(0, 6, (height, width, 3))).clip(0, 255)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def write_shard(folder: Path, jpegs: list[bytes], labels: np.ndarray) -> None:
    """One Parquet shard in the Hugging Face datasets layout (``image`` {bytes, path}, ``label``)."""
    images = pa.array([{"bytes": data, "path": f"{i}.jpg"} for i, data in enumerate(jpegs)],
                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": images, "label": pa.array(labels, type=pa.int64())}),
                   folder / "train-00000-of-00001.parquet")


@dataclass(frozen=True)
class Cost:
    """Seconds per image: wall clock, and this process's CPU time (what the stage needs from a
    core, which other jobs on a busy machine inflate far less than the wall clock)."""

    wall: float
    cpu: float


def figure(value: float) -> str:
    """Three significant digits, thousands separated: the costs span 0.1 to 40,000."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def timed(work: Callable[[], object], images: int) -> Cost:
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return Cost((time.perf_counter() - wall) / images, (time.process_time() - cpu) / images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="images per measurement")
    parser.add_argument("--mae-images", type=int, default=16, help="images per measurement of the 4-px-patch MAE")
    parser.add_argument("--bin-classes", type=int, default=20, help="ImageNet-sized classes the bins are measured on")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)", flush=True)

    train, train_labels = load_fashion_mnist("train")
    jpegs = coloured_jpegs(train[: args.images], seed=0)
    labels = train_labels[: args.images].astype(np.int64)
    work = Path(tempfile.mkdtemp(prefix="imagenet-costs-"))
    source = work / "source"
    source.mkdir()
    write_shard(source, jpegs, labels)
    images = np.concatenate([batch.samples for batch in ParquetReader(str(source), resize=STORED_SIZE).iter_batches("train", 256)])

    patches, embedding, evaluation = PatchConfig(), EmbeddingConfig(), EvaluationConfig()
    subset = round(KEEP_RATIO * IMAGENET_TRAIN)
    stores = iter(range(10**6))

    def read_source() -> Cost:
        reader = ParquetReader(str(source), resize=STORED_SIZE)
        return timed(lambda: [batch for batch in reader.iter_batches("train", 256)], args.images)

    def ingest_source() -> Cost:
        config = DatasetConfig(format="parquet", url=str(source), name="imagenet-like", resize=STORED_SIZE)
        return timed(lambda: ingest(config, Store(str(work / f"store-{next(stores)}"))), args.images)

    def embedder(size: int) -> Callable[[], Cost]:
        extractor = load_image_extractor(image_size=size, device=torch.device("cpu"))
        # every batch is padded to the batch size: fewer images than that would be charged for the padding
        batch = min(embedding.batch_size, args.images)
        return lambda: timed(lambda: extractor(images, batch_size=batch), args.images)

    features, feature_labels = embedding_like(args.bin_classes * 1281, LITE0_DIM, args.bin_classes, seed=0)

    def bins() -> Cost:
        return timed(lambda: generate_bins(features, feature_labels, 10), len(features))

    def scorer(size: int) -> Callable[[], Cost]:
        classifier = load_classifier(image_size=size)
        return lambda: timed(lambda: keep_top_patches(classifier, images, patches.patch_size, patches.drop_ratio), args.images)

    mae_stages: dict[int, tuple[Callable[[], Cost], Callable[[], Cost]]] = {}
    for patch, count in ((patches.patch_size, args.mae_images), (16, args.images)):
        config = MAEConfig(image_size=(STORED_SIZE, STORED_SIZE), in_chans=3, patch_size=patch, mask_ratio=patches.mae_mask_ratio)
        rows = images[:count]
        steps = max(1, count // MAE_BATCH)
        model = MaskedAutoencoder(config).eval()  # untrained: the weights do not change the cost
        keep = select_patches(np.random.default_rng(0).random((count, *config.grid)), patches.drop_ratio)

        def train_steps(rows: np.ndarray = rows, config: MAEConfig = config, steps: int = steps) -> Cost:
            return timed(lambda: train_mae(rows, config, steps=steps, batch_size=MAE_BATCH), steps * MAE_BATCH)

        def restore(model=model, rows: np.ndarray = rows, keep: np.ndarray = keep) -> Cost:
            return timed(lambda: reconstruct(model, rows, keep, batch_size=MAE_BATCH), len(rows))

        mae_stages[patch] = (train_steps, restore)

    steps = max(1, args.images // EVALUATION_BATCH)
    recipe = TrainConfig(min_steps=steps, max_steps=steps, batch_size=EVALUATION_BATCH, val_fraction=0.0)

    def evaluate() -> Cost:
        # CPU time also covers the channel statistics pass and the 8-image test (a few percent)
        cpu = time.process_time()
        result = train_and_evaluate(images, labels, images[:8], labels[:8], model=evaluation.architecture,
                                    num_classes=IMAGENET_CLASSES, config=recipe, device="cpu")
        trained = result.steps * result.batch_size
        return Cost(result.train_seconds / trained, (time.process_time() - cpu) / trained)

    # The images each stage processes for ImageNet-1k under the flow's defaults.
    mae_steps = patches.mae_epochs * max(1, patches.mae_train_samples // 128) * 128
    n_train = len(split_validation(np.arange(subset) % IMAGENET_CLASSES, TrainConfig().val_fraction, 0)[0])
    flow_recipe = TrainConfig(epochs=evaluation.epochs, min_steps=evaluation.min_steps)
    trained = training_steps(n_train, flow_recipe) * flow_recipe.batch_size
    arms = len(evaluation.arms)
    train_images, subset_images = (IMAGENET_TRAIN, "1.28M"), (subset, "60% subset")
    stage_list = [
        Stage("ingest, of which the read (JPEG decode, resize 224, ids)", read_source, *train_images, 1, False),
        Stage("ingest (read + Zarr write)", ingest_source, *train_images, 1, True),
        Stage(f"embeddings, Lite0 at {embedding.image_size} px (default)", embedder(embedding.image_size), *train_images, 2, True),
        Stage("embeddings, Lite0 at 224 px (alternative)", embedder(224), *train_images, 2, False),
        Stage(f"bins, 1,280-d, {args.bin_classes} classes of 1,281", bins, *train_images, 2, True),
        Stage(f"patch scoring, Grad-CAM++ at {patches.cam_image_size} px (default)", scorer(patches.cam_image_size),
              *subset_images, 2, True),
        Stage("patch scoring, Grad-CAM++ at 224 px (alternative)", scorer(224), *subset_images, 2, False),
        Stage(f"MAE training step, {patches.patch_size}-px patches (default)", mae_stages[patches.patch_size][0], mae_steps,
              f"{patches.mae_epochs} epochs × {patches.mae_train_samples:,}", 1, True),
        Stage(f"MAE reconstruction, {patches.patch_size}-px patches (default)", mae_stages[patches.patch_size][1],
              *subset_images, 2, True),
        Stage("MAE training step, 16-px patches (alternative)", mae_stages[16][0], mae_steps,
              f"{patches.mae_epochs} epochs × {patches.mae_train_samples:,}", 1, False),
        Stage("MAE reconstruction, 16-px patches (alternative)", mae_stages[16][1], *subset_images, 2, False),
        Stage(f"evaluation training, {evaluation.architecture} 224 px", evaluate, arms * trained,
              f"{arms} arms × {evaluation.epochs:g} epochs × {n_train:,}", 2, True),
    ]

    loads = [os.getloadavg()[0]]
    for repeat in range(args.repeats):
        for stage in stage_list:
            stage.costs.append(stage.run())
            loads.append(os.getloadavg()[0])
            print(f"  repeat {repeat + 1}: {stage.name}: {1000 * stage.costs[-1].wall:.1f} s wall, "
                  f"{1000 * stage.costs[-1].cpu:.1f} s CPU per 1,000 (load {loads[-1]:.1f})", flush=True)
    shutil.rmtree(work)  # the source shard and one store per ingest measurement

    mean_kb = statistics.mean(len(j) for j in jpegs) / 1024
    print(f"\nImageNet-like inputs: {args.images} Fashion-MNIST images as {JPEG_SIZE[0]}×{JPEG_SIZE[1]} colour JPEGs "
          f"(mean {mean_kb:.0f} KB), stored at {STORED_SIZE}×{STORED_SIZE}×3; 1 torch thread; median of {args.repeats} "
          f"interleaved runs; load average {min(loads):.1f}–{max(loads):.1f} (1-minute, sampled between stages)")
    print("| stage | s per 1,000 images, wall (1 thread) | CPU s per 1,000 | ImageNet-1k images | processes on 2 cores "
          "| projected hours (from CPU s) |")
    print("|---|---|---|---|---|---|")
    total = 0.0
    for stage in stage_list:
        wall, cpu = (statistics.median(getattr(c, part) for c in stage.costs) for part in ("wall", "cpu"))
        hours = stage.flow_images * cpu / stage.parallel / 3600
        total += hours if stage.default_run else 0.0
        print(f"| {stage.name} | {figure(1000 * wall)} | {figure(1000 * cpu)} | {stage.flow_images:,} ({stage.what}) | "
              f"{stage.parallel} | {figure(hours)} |")
    print(f"\nThe flow's defaults end to end (ingest with its write, embeddings at {embedding.image_size} px, bins, "
          f"Grad-CAM++ at {patches.cam_image_size} px, the {patches.patch_size}-px MAE, evaluation): {total:,.0f} h "
          f"≈ {total / 24:,.1f} days on these 2 cores.")
    print("GPU: not measured (no GPU was lent to this run).")


if __name__ == "__main__":
    main()
