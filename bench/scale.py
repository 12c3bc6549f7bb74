"""dq at production size: a Parquet dataset on S3 through the real CLI, every stage's wall time,
throughput and every process's peak memory, then a refresh.

    PYTHONPATH=$PWD .venv/bin/python bench/scale.py [--samples 1280000] [--classes 1000] [--size 32] \\
        [--json out.json] [--compare-to smaller.json] [--no-refresh] [--append-refresh] \\
        [--bins-refresh incremental] [--keep-work] [--generate-only]

What it builds and starts (all on loopback, all stopped on exit, error and Ctrl-C included):

1. **The source.** ``--samples`` training images made from the Fashion-MNIST training images of
   the Debian package (``dq_ops.readers.idx``): each sample is a random training image, flipped
   left-right with probability ½, placed at a random offset in a ``--size`` square canvas (a
   shift), its foreground and background tinted with per-sample colours (RGB), PNG-encoded. They
   are written shard by shard (never all in memory) as Parquet in the Hugging Face layout
   (``image`` struct of ``bytes``/``path``, ``label`` int64, plus an ``id`` column so that ids
   stay stable when a shard is rewritten; ``ClassLabel`` names in the schema metadata):
   ``train-00000-of-000NN.parquet`` … and one ``test-00000-of-00001.parquet`` made the same way
   from the test images. Every sample's pixels depend only on (seed, its block of rows), so the
   shards are cached on local disk between invocations (``--cache``, a folder per samples, size,
   seed, shard size and classes) and uploaded to the S3 server on each run. ``--generate-only``
   builds the cache and exits: generating 1,280,000 samples takes longer than is worth spending
   inside a measured session, and a shard is written under a temporary name and renamed when
   complete, so an interrupted generation resumes where it stopped.

   **Classes.** ``--classes`` (a multiple of 10) spreads the samples over that many labels: the
   garment's class times ``classes / 10`` tint groups, a group being a range of foreground colour
   (each colour channel's range cut into a few equal parts; every group equally likely), so a
   class is a kind of garment in one range of colours and stays visible in the pixels, which do
   not depend on ``--classes``. The default, 1,000, is ImageNet-1k's shape (1,000 classes of
   about 1,281 at 1,280,000 samples), the shape the bench exists to measure: what costs per
   class (a bins job, a coverage product, a refresh's changed classes) shows at its real count.
   ``--classes 10`` (Fashion-MNIST's own classes) is the shape of the runs made before
   ``--classes`` existed, with the same shards; its shards are taken from a cached source with
   more classes when there is one (the labels reduced to the garment, no PNG encoded again).

2. **The services.** moto's S3 server (as ``infra.services`` and ``tests/ops_fixtures.py`` start
   it) with one bucket; a Prefect server of this run's own (its own ``PREFECT_HOME``); ``dask
   scheduler`` and two ``dask worker`` processes (``--nthreads 1``, ``--memory-limit``, each with
   its nanny), with the AWS variables that point s3fs at moto.
3. **The first run.** ``dq run CONFIG`` as a subprocess: the dataset is the bucket's Parquet
   source, the store ``s3://<bucket>/store``, the cluster the scheduler's address, keep ratios
   0.1 and 0.6, patches and evaluation off (``patches.enabled``, ``evaluation.enabled``); MLflow
   logs to ``./mlflow.db`` in the work folder (dq's default for a remote store). Then ``dq export
   SUBSET s3://<bucket>/exports/r<ratio> --format parquet`` for each DQ subset; the exported row
   counts are checked against the subset sizes.
4. **The refresh.** +1% new samples (a new training shard) and −0.5% removed (the first shards
   rewritten without some rows), then the same ``dq run`` and exports again. ``--append-refresh``
   adds a second refresh, ``append``, that only adds a shard (+1%), as a dataset that only grows
   is refreshed. A new shard gives every class new samples, so exact bins (``bins.refresh:
   exact``, the default) re-bin every class; ``--bins-refresh incremental`` runs every run with
   ``bins.refresh: incremental``, where a refresh joins the new samples to the bins before.

**Stage boundaries** come from what ``dq run`` prints on stderr: one line per task run when it
finishes, ``HH:MM:SS | <task run name> computed|cached <seconds> s``. The line is read as it
arrives (a reader thread on the pipe), so a stage's interval is [arrival − its seconds,
arrival]; the seconds are the console's own measure from the task's start record to its end.
Exports are their own subprocesses, timed around the call. Stages overlap little (sampling
runs its ratios and baselines side by side), and a peak is counted in every stage whose
interval holds it. The row ``outside stages`` is the run's wall time that no stage interval
covers: Prefect's flow start, the MLflow tracking process's start, the report and publishing.

**Memory**: every 0.5 s the RSS (psutil) of each process: the flow (the ``dq run`` process), its
MLflow tracking process (its largest child), each dask worker (the worker process below its
nanny; the nanny itself is small and shown apart), the scheduler, the export CLI, and the
services (moto holding the bucket in memory, the Prefect server). A stage's peak per process is
the largest sample inside the stage's interval; a process's peak for the run is the largest
sample while the run was going. Sampling every 0.5 s can miss a shorter spike.

**samples/s**: the training samples the stage went through (ingest: training + test; the
embeddings stage: what the run says it embedded; exports: the subset's size) over its wall
seconds. **store bytes**: after each run, the bytes under the store's folder of the stage's
artifact kind (``datasets``, ``embeddings``, ``bins``, ``subsets``) and under each export.

``--json`` writes every figure; ``--compare-to`` a smaller run's JSON prints growth factors of
every process's peak (at this size / at that one) and per-stage throughput ratios.
``--subset-stages N`` adds a last ``dq run`` on the same store with the pixel stages on: keep ratio
N / training samples (a subset of about N images), patch dropping, the MAE and its
reconstructions, and evaluation (arms ``dq``, ``dq_pixels`` and ``random``, one draw) for
``--subset-epochs`` passes (default 1: a throughput figure, not a converged accuracy). Ingest,
embeddings and bins are served from the store; those stages' rows count the subset's samples.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dq_ops.readers.idx import FASHION_MNIST_CLASSES  # noqa: E402

BIN = Path(sys.executable).parent
BUCKET = "dq-scale"
QUIET = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
ROWS_PER_BLOCK = 1000  # generation unit and Parquet row group: one block of pixels in memory at a time
SAMPLE_INTERVAL_S = 0.5
EPOCH = time.monotonic()  # the JSON's stage intervals are seconds since the bench started
RATIOS = (0.1, 0.6)
STAGE_LINE = re.compile(r"^\d\d:\d\d:\d\d \| (?P<name>\S+)\s+(?P<status>computed|cached)\s+(?P<seconds>[\d.]+) s\s*$")
SUBSET_LINE = re.compile(r"^subset\s+(?P<ratio>[\d.]+)%\s+(?P<size>[\d,]+) samples\s+(?P<url>\S+)")
EMBEDDED_LINE = re.compile(r"^embedded\s+(?P<n>[\d,]+) samples this run")


# ---------------------------------------------------------------- the source


FOREGROUND = (90, 255)  # range of every foreground colour channel (uniform)


def _tint(gray: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(n, s, s) uint8 → (n, s, s, 3): a per-sample foreground and background colour; and the
    (n, 3) foreground colours."""
    n = len(gray)
    fg = rng.uniform(*FOREGROUND, size=(n, 1, 1, 3)).astype(np.float32)
    bg = rng.uniform(0, 70, size=(n, 1, 1, 3)).astype(np.float32)
    alpha = gray[..., None].astype(np.float32) / 255
    return (bg + (fg - bg) * alpha).round().astype(np.uint8), fg.reshape(n, 3)


def tint_levels(groups: int) -> tuple[int, int, int]:
    """Levels per colour channel (red, green, blue) whose product is ``groups``, as even as
    possible (the largest as small as it can be): 100 → (5, 5, 4)."""
    splits = [(a, b, groups // (a * b)) for a in range(1, groups + 1) if groups % a == 0
              for b in range(1, a + 1) if (groups // a) % b == 0 and groups // (a * b) <= b]
    return min(splits, key=lambda levels: levels[0])


def tint_group(foreground: np.ndarray, groups: int) -> np.ndarray:
    """(n, 3) foreground colours → (n,) tint groups in [0, groups): each channel's range cut
    into :func:`tint_levels` equal parts. The channels are independent and uniform, so every
    group is equally likely."""
    levels = np.array(tint_levels(groups))
    low, high = FOREGROUND
    level = np.minimum(((foreground - low) / (high - low) * levels).astype(np.int64), levels - 1)
    return (level[:, 0] * levels[1] + level[:, 1]) * levels[2] + level[:, 2]


def make_block(images: np.ndarray, labels: np.ndarray, start: int, stop: int, size: int, seed: int,
               split: str, classes: int = 10) -> tuple[list[bytes], np.ndarray, list[str]]:
    """Samples ``start``..``stop`` of a split: PNG bytes, labels and ids. Deterministic in
    (seed, split, start), so a cached shard and a refresh's new rows are reproducible.

    ``classes`` (a multiple of the 10 Fashion-MNIST classes): label = fashion class ·
    (classes / 10) + :func:`tint_group` of the sample's foreground colour, so a class is a kind
    of garment in one range of colours. The pixels do not depend on ``classes``."""
    from PIL import Image

    rng = np.random.default_rng([seed, 0 if split == "train" else 1, start])
    n = stop - start
    source = rng.integers(0, len(images), size=n)
    gray = images[source]
    flip = rng.random(n) < 0.5
    gray[flip] = gray[flip, :, ::-1]
    inner = max(1, round(28 * size / 32))  # the 28 px image at the canvas's scale, a few px of room to shift
    if inner != 28:
        gray = np.stack([np.asarray(Image.fromarray(g).resize((inner, inner), Image.BILINEAR)) for g in gray])
    canvas = np.zeros((n, size, size), np.uint8)
    room = size - inner
    dy, dx = rng.integers(0, room + 1, size=n), rng.integers(0, room + 1, size=n)
    for i in range(n):
        canvas[i, dy[i]:dy[i] + inner, dx[i]:dx[i] + inner] = gray[i]
    rgb, foreground = _tint(canvas, rng)
    encoded = []
    for pixels in rgb:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    ids = [f"{split}-{start + i:08d}" for i in range(n)]
    groups = classes // len(FASHION_MNIST_CLASSES)
    return encoded, labels[source] * groups + tint_group(foreground, groups), ids


def class_names(classes: int) -> list[str]:
    """The ClassLabel names: the garment, and the tint group when there are several per garment."""
    groups = classes // len(FASHION_MNIST_CLASSES)
    if groups == 1:
        return list(FASHION_MNIST_CLASSES)
    return [f"{garment} (tint {group})" for garment in FASHION_MNIST_CLASSES for group in range(groups)]


def _schema(classes: int):
    import pyarrow as pa

    features = {"image": {"_type": "Image"}, "label": {"names": class_names(classes), "_type": "ClassLabel"},
                "id": {"dtype": "string", "_type": "Value"}}
    return pa.schema(
        [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64()), ("id", pa.string())],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )


def write_shard(path: Path, split: str, start: int, stop: int, size: int, seed: int, classes: int,
                keep: set[str] | None = None) -> int:
    """Generate rows ``start``..``stop`` of ``split`` into one Parquet file, block by block;
    ``keep``: only these ids (a shard rewritten without some rows). Returns the rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images, labels = _fashion_mnist(split)
    partial = path.with_suffix(".partial")
    written = 0
    schema = _schema(classes)
    with pq.ParquetWriter(partial, schema) as writer:
        for block in range(start, stop, ROWS_PER_BLOCK):
            encoded, block_labels, ids = make_block(images, labels, block, min(block + ROWS_PER_BLOCK, stop), size, seed, split,
                                                  classes)
            rows = [i for i, sample_id in enumerate(ids) if keep is None or sample_id in keep]
            image = pa.StructArray.from_arrays(
                [pa.array([encoded[i] for i in rows], pa.binary()), pa.array([f"{ids[i]}.png" for i in rows])],
                names=["bytes", "path"])
            writer.write_table(pa.table({"image": image, "label": pa.array(block_labels[rows], pa.int64()),
                                         "id": pa.array([ids[i] for i in rows])}, schema=schema))
            written += len(rows)
    partial.rename(path)
    return written


@functools.cache
def _fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    from dq_ops.readers.idx import load_fashion_mnist

    return load_fashion_mnist(split)


def _write_train_shard(path: Path, start: int, stop: int, size: int, seed: int, classes: int) -> int:
    return write_shard(path, "train", start, stop, size, seed, classes)


@dataclass(frozen=True)
class Layout:
    samples: int
    test_samples: int
    shard_rows: int
    size: int
    seed: int
    classes: int

    @property
    def train_shards(self) -> int:
        return -(-self.samples // self.shard_rows)

    def train_name(self, index: int, of: int | None = None) -> str:
        return f"train-{index:05d}-of-{of or self.train_shards:05d}.parquet"

    def train_rows(self, index: int) -> tuple[int, int]:
        return index * self.shard_rows, min((index + 1) * self.shard_rows, self.samples)

    @property
    def test_name(self) -> str:
        return "test-00000-of-00001.parquet"


def garment_shard(source: Path, target: Path) -> None:
    """``source``, a shard with several tint groups per garment, with its labels reduced to the
    garment (label // groups): the shard generated with 10 classes, without encoding a PNG."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(source)
    groups = len(json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]["label"]["names"]) // len(FASHION_MNIST_CLASSES)
    garments = pa.array(table.column("label").to_numpy() // groups, pa.int64())
    table = table.set_column(table.schema.get_field_index("label"), "label", garments).cast(_schema(len(FASHION_MNIST_CLASSES)))
    partial = target.with_suffix(".partial")
    pq.write_table(table, partial, row_group_size=ROWS_PER_BLOCK)
    partial.rename(target)


def build_source(layout: Layout, cache: Path, jobs: int) -> Path:
    """The cached shards of ``layout``; returns their folder. A missing shard is generated
    (``jobs`` processes), or with 10 classes taken from a cached source with more
    (:func:`garment_shard`)."""
    from concurrent.futures import ProcessPoolExecutor, as_completed

    base = f"n{layout.samples}-t{layout.test_samples}-px{layout.size}-seed{layout.seed}-rows{layout.shard_rows}"
    # (10 classes leave the name as it was before --classes: those shards are the same)
    garments_only = layout.classes == len(FASHION_MNIST_CLASSES)
    folder = cache / (base if garments_only else f"{base}-classes{layout.classes}")
    folder.mkdir(parents=True, exist_ok=True)
    started, made = time.perf_counter(), 0
    if garments_only:
        for name in [layout.train_name(i) for i in range(layout.train_shards)] + [layout.test_name]:
            tinted = sorted(cache.glob(f"{base}-classes*/{name}"))
            if tinted and not (folder / name).exists():
                garment_shard(tinted[0], folder / name)
                print(f"  {name}: the garments of {tinted[0]}", flush=True)
    missing = [i for i in range(layout.train_shards) if not (folder / layout.train_name(i)).exists()]
    if missing:
        with ProcessPoolExecutor(jobs) as pool:
            futures = {pool.submit(_write_train_shard, folder / layout.train_name(i), *layout.train_rows(i),
                                   layout.size, layout.seed, layout.classes): i for i in missing}
            for future in as_completed(futures):
                made += future.result()
                print(f"  generated {layout.train_name(futures[future])} ({made:,} samples, "
                      f"{time.perf_counter() - started:.0f} s)", flush=True)
    if not (folder / layout.test_name).exists():
        made += write_shard(folder / layout.test_name, "test", 0, layout.test_samples, layout.size, layout.seed, layout.classes)
    if made:
        print(f"source: generated {made:,} samples in {time.perf_counter() - started:.0f} s into {folder}", flush=True)
    return folder


# ---------------------------------------------------------------- processes and memory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class Processes:
    """The processes this bench starts, each in a session of its own, stopped (whole process
    groups: a server's children too) by :meth:`stop_all`, including on errors and Ctrl-C."""

    def __init__(self, logs: Path, env: dict[str, str]):
        self.logs, self.env = logs, env
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, role: str, argv: list[str], env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen:
        kwargs.setdefault("stdout", (self.logs / f"{role}.log").open("wb"))
        kwargs.setdefault("stderr", subprocess.STDOUT)
        process = subprocess.Popen(argv, env=env or self.env, start_new_session=True, **kwargs)
        self.started[role] = process
        return process

    def stop(self, role: str, grace_s: float = 20) -> None:
        process = self.started.pop(role, None)
        if process is None:
            return
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:  # what is left of its group (a child that outlived it) goes too
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()

    def stop_all(self) -> None:
        for role in reversed(list(self.started)):
            self.stop(role)


def _rss_tree(pid: int) -> list[tuple[psutil.Process, int]]:
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    out = []
    for process in processes:
        try:
            out.append((process, process.memory_info().rss))
        except psutil.Error:
            continue
    return out


def _is_spawned(process: psutil.Process) -> bool:
    try:
        return "spawn_main" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def roles_rss(started: dict[str, subprocess.Popen]) -> dict[str, int]:
    """RSS of every role now: a flow's MLflow child and a worker's nanny apart from the process itself."""
    rss: dict[str, int] = {}
    for role, popen in list(started.items()):
        tree = _rss_tree(popen.pid)
        if not tree:
            continue
        if role.startswith("worker-"):  # the Popen is the nanny; the worker is its spawned child
            rss[f"{role}-nanny"] = tree[0][1]
            children = [r for p, r in tree[1:] if _is_spawned(p)]
            rss[role] = max(children, default=0)
        elif role in ("flow", "export"):
            rss[role] = tree[0][1]
            children = [r for p, r in tree[1:] if _is_spawned(p)]
            if role == "flow" and children:
                rss["mlflow"] = max(children)
        else:  # a server and its helpers
            rss[role] = sum(r for _, r in tree)
    return rss


@dataclass
class Sampler:
    """RSS of every role every ``SAMPLE_INTERVAL_S`` in a thread: (monotonic time, {role: bytes})."""

    processes: Processes
    samples: list[tuple[float, dict[str, int]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self.samples.append((time.monotonic(), roles_rss(self.processes.started)))

    def peaks(self, start: float, stop: float) -> dict[str, int]:
        """Each role's largest sample in [start, stop]; the sample just after stop too (a short stage)."""
        peaks: dict[str, int] = {}
        inside = [s for s in self.samples if start <= s[0] <= stop]
        after = [s for s in self.samples if s[0] > stop][:1]
        for _, rss in inside + after:
            for role, value in rss.items():
                peaks[role] = max(peaks.get(role, 0), value)
        return peaks

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------- the runs


@dataclass
class Stage:
    name: str
    status: str
    wall_s: float
    start: float
    stop: float
    samples: int = 0
    peaks: dict[str, int] = field(default_factory=dict)
    store_bytes: int | None = None

    def row(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "wall_s": round(self.wall_s, 2), "samples": self.samples,
                "interval_s": [round(self.start - EPOCH, 2), round(self.stop - EPOCH, 2)],
                "samples_per_s": self.samples / self.wall_s if self.samples and self.wall_s > 0 else None,
                "peak_rss": self.peaks, "store_bytes": self.store_bytes}


def stage_key(task_run_name: str) -> str:
    """A task run's name without its dataset and hashes: the key shared by runs of any size."""
    for prefix, key in (("ingest-", "ingest"), ("embed", "embeddings"), ("bins-", "bins"), ("drop-patches-", "patches"),
                        ("mae-", "mae"), ("reconstruct-", "reconstruction")):
        if task_run_name.startswith(prefix):
            return key
    return task_run_name


def store_kind(name: str) -> str | None:
    if name.startswith("export"):
        return None
    kinds = {"ingest": "datasets", "embeddings": "embeddings", "bins": "bins", "patches": "patches", "mae": "models",
             "reconstruction": "reconstructions"}
    if name.startswith("train-"):
        return "evaluations"
    return kinds.get(name, "subsets" if name.startswith("sample-") else None)


@dataclass
class RunResult:
    wall_s: float
    stages: list[Stage]
    subsets: dict[float, tuple[int, str]]  # ratio → (size, subset name)
    embedded: int


def dq_run(processes: Processes, sampler: Sampler, config: Path, work: Path, label: str,
           train_samples: int, test_samples: int, pixel_stages: bool = False) -> RunResult:
    """One ``dq run`` subprocess; its stage lines read as they arrive. ``pixel_stages``: a run of
    one keep ratio whose later stages work on its subset (their rows count the subset's samples)."""
    log = (work / f"{label}.stderr").open("w")
    started = time.monotonic()
    process = processes.start("flow", [str(BIN / "dq"), "run", str(config)], cwd=work,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stages: list[Stage] = []
    stdout: list[str] = []

    def read_stderr() -> None:
        for line in process.stderr:
            now = time.monotonic()
            log.write(line)
            log.flush()
            match = STAGE_LINE.match(line.strip())
            if match:
                seconds = float(match["seconds"])
                stages.append(Stage(stage_key(match["name"]), match["status"], seconds, now - seconds, now))

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    for line in process.stdout:
        stdout.append(line)
    code = process.wait()
    reader.join()
    wall = time.monotonic() - started
    processes.started.pop("flow", None)
    log.close()
    (work / f"{label}.stdout").write_text("".join(stdout))
    if code:
        raise SystemExit(f"dq run ({label}) exited with {code}; see {work / f'{label}.stderr'}:\n"
                         + "".join(open(work / f"{label}.stderr").readlines()[-20:]))
    subsets, embedded = {}, 0
    for line in stdout:
        if match := SUBSET_LINE.match(line.strip()):
            subsets[round(float(match["ratio"]) / 100, 4)] = (int(match["size"].replace(",", "")), match["url"].rsplit("/", 1)[-1])
        if match := EMBEDDED_LINE.match(line.strip()):
            embedded = int(match["n"].replace(",", ""))
    subset_samples = next(iter(subsets.values()))[0] if pixel_stages else None
    for stage in stages:
        stage.peaks = sampler.peaks(stage.start, stage.stop)
        stage.samples = (train_samples + test_samples if stage.name == "ingest" else
                         embedded if stage.name == "embeddings" else
                         train_samples if subset_samples is None or stage.name in ("bins", "coverage") or stage.name.startswith("sample-")
                         else subset_samples)
    # What no stage line covers: Prefect's flow start, the tracking process, the report and publishing.
    covered, end = 0.0, started
    for stage in sorted(stages, key=lambda s: s.start):
        covered += max(0.0, stage.stop - max(stage.start, end))
        end = max(end, stage.stop)
    outside = Stage("outside stages", "", wall - covered, started, started + wall)
    total = Stage("dq run (whole)", "", wall, started, started + wall, train_samples, sampler.peaks(started, started + wall))
    return RunResult(wall, [*stages, outside, total], subsets, embedded)


def dq_export(processes: Processes, sampler: Sampler, work: Path, store: str, subset: str, out: str,
              size: int, label: str) -> Stage:
    started = time.monotonic()
    argv = [str(BIN / "dq"), "export", subset, out, "--format", "parquet", "--store", store, "--overwrite"]
    with (work / f"{label}.log").open("w") as log:
        process = processes.start("export", argv, cwd=work, stdout=log, stderr=subprocess.STDOUT)
        code = process.wait()
    processes.started.pop("export", None)
    stop = time.monotonic()
    if code:
        raise SystemExit(f"dq export ({label}) exited with {code}; see {work / f'{label}.log'}")
    return Stage(label, "computed", stop - started, started, stop, size, sampler.peaks(started, stop))


def s3fs_for(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(key="scale", secret="scale", client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"},
                             skip_instance_cache=True)


def du(fs, path: str) -> int:
    fs.invalidate_cache()  # listings cached before a rewrite would give stale sizes and ETags
    try:
        return int(fs.du(path, total=True))
    except FileNotFoundError:
        return 0


def parquet_rows(fs, path: str) -> int:
    import pyarrow.parquet as pq

    fs.invalidate_cache()
    rows = 0
    for file in sorted(fs.glob(f"{path}/**/*.parquet")):
        with fs.open(file, "rb") as fh:
            rows += pq.ParquetFile(fh).metadata.num_rows
    return rows


def refresh_source(fs, layout: Layout, source: str, work: Path, refresh: int, remove: bool) -> tuple[int, int]:
    """The ``refresh``-th change (from 0) of the source in the bucket: +1% new samples (a new
    training shard) and, with ``remove``, −0.5% removed (the first shards rewritten without some
    rows, a random choice). Returns (added, removed)."""
    added, removed = max(1, layout.samples // 100), max(1, layout.samples // 200) if remove else 0
    index = layout.train_shards + refresh
    new_name = layout.train_name(index, of=index + 1)
    start = layout.samples + refresh * added
    write_shard(work / new_name, "train", start, start + added, layout.size, layout.seed, layout.classes)
    fs.put(str(work / new_name), f"{source}/{new_name}")
    rng = np.random.default_rng(layout.seed + 1)
    left, index = removed, 0
    while left > 0:
        start, stop = layout.train_rows(index)
        take = min(left, stop - start - 1)  # a shard keeps a row: it stays a shard
        gone = set(rng.choice(np.arange(start, stop), size=take, replace=False).tolist())
        keep = {f"train-{i:08d}" for i in range(start, stop) if i not in gone}
        path = work / f"rewritten-{layout.train_name(index)}"
        write_shard(path, "train", start, stop, layout.size, layout.seed, layout.classes, keep=keep)
        fs.put(str(path), f"{source}/{layout.train_name(index)}")
        left, index = left - take, index + 1
    return added, removed


def start_services(processes: Processes, work: Path, worker_memory: str) -> tuple[str, str, str]:
    """moto, a Prefect server, a dask scheduler and two workers; (S3 endpoint, Prefect API, scheduler address)."""
    s3_port, prefect_port = free_port(), free_port()
    endpoint = f"http://127.0.0.1:{s3_port}"
    processes.env.update({"AWS_ACCESS_KEY_ID": "scale", "AWS_SECRET_ACCESS_KEY": "scale", "AWS_ENDPOINT_URL": endpoint,
                          "AWS_DEFAULT_REGION": "us-east-1"})
    processes.start("moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)])
    prefect_home = work / "prefect-home"
    prefect_home.mkdir(exist_ok=True)
    prefect_env = processes.env | {"PREFECT_HOME": str(prefect_home)}
    prefect_env.pop("PREFECT_API_URL", None)
    # A server of this bench's own (its own database): runs of other sessions stay out of its figures.
    processes.start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                    env=prefect_env)
    scheduler_file = work / "scheduler.json"
    common = ["--no-dashboard", "--host", "127.0.0.1"]
    processes.start("scheduler", [str(BIN / "dask"), "scheduler", "--port", "0", "--scheduler-file", str(scheduler_file), *common])
    deadline, address = time.monotonic() + 180, None
    while address is None:
        try:
            address = json.loads(scheduler_file.read_text())["address"]
        except (OSError, ValueError, KeyError):  # not there yet, or half written
            if time.monotonic() > deadline:
                raise SystemExit(f"no dask scheduler after 180 s; see {work / 'logs' / 'scheduler.log'}") from None
            time.sleep(0.2)
    for w in range(2):
        processes.start(f"worker-{w}", [str(BIN / "dask"), "worker", address, "--nthreads", "1", "--memory-limit", worker_memory,
                                        "--name", f"worker-{w}", "--local-directory", str(work / f"worker-{w}"), *common])
    api_url = f"http://127.0.0.1:{prefect_port}/api"
    for name, url in (("moto", f"{endpoint}/moto-api/"), ("prefect-server", f"{api_url}/health")):
        deadline = time.monotonic() + 300
        while not _healthy(url):
            if processes.started[name].poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name} did not start; see {work / 'logs' / f'{name}.log'}")
            time.sleep(0.5)
    from distributed import Client

    with Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=300)
    return endpoint, api_url, address


def write_config(path: Path, source: str, store: str, address: str, bins_refresh: str,
                 subset_ratio: float | None = None, subset_epochs: float = 1.0) -> None:
    """The bench's run configuration; with ``subset_ratio``, the pixel stages on a subset of that ratio."""
    import yaml

    stages: dict[str, Any] = {"bins": {"refresh": bins_refresh}, "sampling": {"ratios": list(RATIOS)},
                              "patches": {"enabled": False}, "evaluation": {"enabled": False}}
    if subset_ratio is not None:
        stages |= {"sampling": {"ratios": [subset_ratio]}, "patches": {"enabled": True},
                  "evaluation": {"enabled": True, "seeds": [0], "epochs": subset_epochs, "min_steps": 1}}
    path.write_text(yaml.safe_dump({
        "store_url": store,
        "dataset": {"format": "parquet", "url": source, "name": "scale"},
        **stages,
        "cluster": {"kind": "address", "address": address},
    }))


def measure(args: argparse.Namespace, layout: Layout, cached: Path, work: Path) -> dict[str, Any]:
    (work / "logs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ) | QUIET
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["DQ_LOG_DIR"] = str(work / "logs")
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "DQ_PREFECT_SERVER"):
        env.pop(name, None)
    processes = Processes(work / "logs", env)
    sampler = None
    try:
        started = time.monotonic()
        endpoint, api_url, address = start_services(processes, work, args.worker_memory)
        env["PREFECT_API_URL"] = api_url
        print(f"services up in {time.monotonic() - started:.0f} s: S3 {endpoint}, Prefect {api_url}, dask {address}", flush=True)
        fs = s3fs_for(endpoint)
        import boto3

        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="scale", aws_secret_access_key="scale",
                     region_name="us-east-1").create_bucket(Bucket=BUCKET)  # as infra.services does (s3fs sends a location)
        source, store = f"s3://{BUCKET}/source", f"s3://{BUCKET}/store"
        started = time.monotonic()
        fs.put(f"{cached}/", f"{BUCKET}/source/", recursive=True)
        print(f"uploaded the source ({du(fs, f'{BUCKET}/source'):,} bytes) in {time.monotonic() - started:.0f} s", flush=True)
        config = work / "scale.yaml"
        write_config(config, source, store, address, args.bins_refresh)
        sampler = Sampler(processes)
        results: dict[str, Any] = {}
        refreshes = [] if args.no_refresh else ["refresh"] + (["append"] if args.append_refresh else [])
        train = layout.samples
        for label in ["first", *refreshes] + (["subset-stages"] if args.subset_stages else []):
            run_config = config
            if label == "subset-stages":
                run_config = work / "subset-stages.yaml"
                write_config(run_config, source, store, address, args.bins_refresh, round(args.subset_stages / train, 6), args.subset_epochs)
            if label in refreshes:
                added, removed = refresh_source(fs, layout, f"{BUCKET}/source", work, refreshes.index(label), label == "refresh")
                train += added - removed
                results[f"{label}_change"] = {"added": added, "removed": removed}
                print(f"{label}: +{added:,} new samples (one shard), −{removed:,} removed", flush=True)
            print(f"dq run ({label}) …", flush=True)
            load_before = os.getloadavg()
            run = dq_run(processes, sampler, run_config, work, label, train, layout.test_samples, label == "subset-stages")
            print(f"dq run ({label}) done in {run.wall_s:.0f} s", flush=True)
            exports = []
            for ratio, (size, name) in sorted(run.subsets.items()):
                if ratio not in RATIOS or label == "subset-stages":
                    continue
                out = f"s3://{BUCKET}/exports/r{ratio}"
                stage = dq_export(processes, sampler, work, store, name, out, size, f"export-{ratio}")
                rows = parquet_rows(fs, out)
                if rows != size:
                    raise SystemExit(f"export of subset {name} ({size:,} samples) to {out} has {rows:,} rows")
                stage.store_bytes = du(fs, out)
                exports.append(stage)
            for stage in run.stages:
                kind = store_kind(stage.name)
                if kind:
                    stage.store_bytes = du(fs, f"{BUCKET}/store/{kind}")
            whole = run.stages[-1]
            whole.store_bytes = du(fs, f"{BUCKET}/store")
            results[label] = {
                "wall_s": run.wall_s, "with_exports_s": run.wall_s + sum(s.wall_s for s in exports),
                "train_samples": train, "embedded": run.embedded,
                "subsets": {str(r): {"size": s, "name": n} for r, (s, n) in run.subsets.items()},
                "stages": [s.row() for s in [*run.stages[:-1], *exports, whole]],
                "load_before": load_before, "load_after": os.getloadavg(),
                "source_bytes": du(fs, f"{BUCKET}/source"),
            }
        results["services_peak_rss"] = sampler.peaks(0, time.monotonic())
        return results
    finally:
        # A second signal must not cut the cleanup short (``timeout`` signals the bench and then
        # its process group, so the bench gets two), or the services outlive the bench.
        with _signals_ignored():
            if sampler is not None:
                sampler.close()
            processes.stop_all()


# ---------------------------------------------------------------- the report

ROLES = ("flow", "mlflow", "worker-0", "worker-1", "scheduler", "export")
SERVICE_ROLES = ("moto", "prefect-server", "worker-0-nanny", "worker-1-nanny")


def _gib(value: int | None) -> str:
    return "—" if not value else f"{value / 2**30:.2f}"


def print_table(result: dict[str, Any], label: str) -> None:
    run = result[label]
    print(f"\n### {label} run: {run['train_samples']:,} training samples, {run['embedded']:,} embedded; "
          f"dq run {run['wall_s']:.0f} s, with exports {run['with_exports_s']:.0f} s; "
          f"load average {run['load_before'][0]:.1f} before, {run['load_after'][0]:.1f} after\n")
    print("| stage | wall s | samples/s | peak RSS GiB: " + " / ".join(ROLES) + " | store bytes |")
    print("|---|---|---|---|---|")
    for stage in run["stages"]:
        rate = stage["samples_per_s"]
        peaks = " / ".join(_gib(stage["peak_rss"].get(role)) for role in ROLES)
        stored = "—" if stage["store_bytes"] is None else f"{stage['store_bytes']:,}"
        status = f" ({stage['status']})" if stage["status"] == "cached" else ""
        print(f"| {stage['name']}{status} | {stage['wall_s']:.1f} | {'—' if rate is None else f'{rate:,.0f}'} | {peaks} | {stored} |")


def print_comparison(result: dict[str, Any], smaller: dict[str, Any]) -> None:
    n, m = result["samples"], smaller["samples"]
    print(f"\n### growth: {n:,} against {m:,} samples ({n / m:.1f}× the data)\n")
    big = {s["name"]: s for s in result["first"]["stages"]}
    small = {s["name"]: s for s in smaller["first"]["stages"]}
    whole_big, whole_small = big["dq run (whole)"]["peak_rss"], small["dq run (whole)"]["peak_rss"]
    print("| process | peak RSS here | there | growth |")
    print("|---|---|---|---|")
    for role in ROLES:
        a, b = whole_big.get(role) or max((s["peak_rss"].get(role, 0) for s in big.values()), default=0), \
            whole_small.get(role) or max((s["peak_rss"].get(role, 0) for s in small.values()), default=0)
        if a and b:
            print(f"| {role} | {_gib(a)} GiB | {_gib(b)} GiB | {a / b:.2f}× |")
    for role in SERVICE_ROLES:  # over the whole bench (moto holds the bucket's small objects in memory)
        a, b = result["services_peak_rss"].get(role), smaller["services_peak_rss"].get(role)
        if a and b:
            print(f"| {role} (whole bench) | {_gib(a)} GiB | {_gib(b)} GiB | {a / b:.2f}× |")
    print("\n| stage | samples/s here | there | throughput ratio |")
    print("|---|---|---|---|")
    for name, stage in big.items():
        other = small.get(name)
        if other and stage["samples_per_s"] and other["samples_per_s"]:
            print(f"| {name} | {stage['samples_per_s']:,.0f} | {other['samples_per_s']:,.0f} | "
                  f"{stage['samples_per_s'] / other['samples_per_s']:.2f} |")


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM ignored inside the block, their handlers restored after it."""
    handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: the finally blocks stop every process we started


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_280_000, help="training samples (default 1,280,000)")
    parser.add_argument("--test-samples", type=int, help="samples of the test shard (default min(10,000, samples / 10))")
    parser.add_argument("--classes", type=int, default=1000,
                        help="labels, a multiple of 10: garment × tint group (default 1,000, ImageNet-1k's; 10: "
                             "Fashion-MNIST's own)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--shard-rows", type=int, default=10_000, help="samples per training shard (default 10,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="processes generating shards (default: every core)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dq-bench-scale",
                        help="where generated shards are kept between invocations")
    parser.add_argument("--work", type=Path, help="work folder: logs, config, MLflow database (default: a temporary one)")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--worker-memory", default="6GiB", help="dask worker --memory-limit (default 6GiB)")
    parser.add_argument("--no-refresh", action="store_true", help="only the first run")
    parser.add_argument("--append-refresh", action="store_true",
                        help="after the refresh, a second one that only adds a shard (+1%%)")
    parser.add_argument("--bins-refresh", choices=("exact", "incremental"), default="exact",
                        help="the runs' bins.refresh (default exact, dq's default)")
    parser.add_argument("--generate-only", action="store_true",
                        help="build and cache the source's shards, then exit (nothing started, nothing measured)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--compare-to", type=Path, help="a smaller run's --json: growth factors")
    parser.add_argument("--subset-stages", type=int, metavar="N",
                        help="then patches, MAE and evaluation on a subset of about N samples (module docstring)")
    parser.add_argument("--subset-epochs", type=float, default=1.0, help="evaluation epochs of --subset-stages (default 1)")
    args = parser.parse_args(argv)
    if args.classes < 1 or args.classes % len(FASHION_MNIST_CLASSES):
        parser.error(f"--classes must be a positive multiple of {len(FASHION_MNIST_CLASSES)}, got {args.classes}")
    test_samples = args.test_samples if args.test_samples is not None else min(10_000, max(1, args.samples // 10))
    layout = Layout(args.samples, test_samples, args.shard_rows, args.size, args.seed, args.classes)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where the shell started us ignoring it
    print(f"scale bench: {layout.samples:,} training + {test_samples:,} test samples in {layout.classes:,} classes, "
          f"{layout.size} px RGB, {layout.train_shards} training shards; load average {os.getloadavg()}", flush=True)
    cached = build_source(layout, args.cache, args.jobs)
    if args.generate_only:
        print(f"source cached in {cached}", flush=True)
        return {"source": str(cached)}
    work = args.work or Path(tempfile.mkdtemp(prefix="dq-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = {"samples": layout.samples, "test_samples": test_samples, "classes": layout.classes, "size": layout.size,
                  "shard_rows": layout.shard_rows, "bins_refresh": args.bins_refresh, "cpus": os.cpu_count(),
                  "memory_gib": psutil.virtual_memory().total / 2**30} | measure(args, layout, cached, work)
    finally:
        if args.work is None and not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        elif args.work is None:
            print(f"work folder kept: {work}")
    print_table(result, "first")
    for label in ("refresh", "append"):
        if label in result:
            print_table(result, label)
            first, refresh, change = result["first"], result[label], result[f"{label}_change"]
            print(f"\n{label} (+{change['added']:,} −{change['removed']:,}): "
                  f"dq run {refresh['wall_s'] / first['wall_s']:.1%} of the first run's wall "
                  f"({refresh['wall_s']:.0f} s / {first['wall_s']:.0f} s); with exports "
                  f"{refresh['with_exports_s'] / first['with_exports_s']:.1%}")
    if "subset-stages" in result:
        print_table(result, "subset-stages")
    services = result["services_peak_rss"]
    print("\nservices, peak RSS over the whole bench: "
          + ", ".join(f"{role} {_gib(services.get(role))} GiB" for role in SERVICE_ROLES))
    if args.compare_to:
        print_comparison(result, json.loads(args.compare_to.read_text()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
