"""The bad-input matrix: every kind of bad source, configuration or output target, run through
the real ``dq`` CLI in a subprocess, ends the same way: exit status 2, a last line
``error: …`` that names the culprit (file, sample, field or option) and the log file with the
details, no traceback on the terminal, and the store byte for byte as it was.

The store starts with a good dataset of the same name (so a failed ingest must not touch it).
Runs that fail after ingest (on what the data must allow: patch size, an empty subset; or on an
unreachable MLflow server) find the dataset ingested by an earlier run in Prefect's cache, so they too leave every byte as it was; the MLflow
database lives outside the store in these configs.

A read-only store and a full disk are real filesystems: a read-only bind mount and a small full
tmpfs in a private mount namespace (``unshare``, no privileges needed), since chmod does not stop
root. S3 without credentials talks to moto's S3 server on loopback.
"""

from __future__ import annotations

import gzip
import io
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dq_ops.readers.idx import FASHION_MNIST_DIR
from tests.cli_helpers import Finished, cli_env, dq, free_port, tree_digest

NAME = "fm"


def _idx(name: str, offset: int, count: int, shape: tuple[int, ...]) -> np.ndarray:
    with gzip.open(Path(FASHION_MNIST_DIR) / name) as fh:
        data = np.frombuffer(fh.read(), dtype=np.uint8, offset=offset)
    return data[: count * int(np.prod(shape))].reshape(count, *shape)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace: real Fashion-MNIST sources (good and broken), a store holding the good one."""
    root = tmp_path_factory.mktemp("bad-input")
    # An unreachable MLflow server is reported at once, not after MLflow's backed-off retries.
    env = cli_env(root, PREFECT_HOME=str(root / "prefect-home"), MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    images = _idx("train-images-idx3-ubyte.gz", 16, 300, (28, 28))
    labels = _idx("train-labels-idx1-ubyte.gz", 8, 300, ()).astype(np.int64)
    good = root / "good.npz"
    np.savez(good, x_train=images[:200], y_train=labels[:200], x_test=images[200:], y_test=labels[200:])
    store = root / "store"
    done = dq("ingest", "--format", "npz", "--url", str(good), "--name", NAME, "--store", str(store), env=env, cwd=root)
    assert done.returncode == 0, done.stderr
    return {"root": root, "env": env, "store": store, "good": good, "images": images, "labels": labels}


def _config(ws, name: str, **sections) -> Path:
    """A run config on the good source, evaluation and patch dropping off unless a case turns them on."""
    raw = {
        "dataset": {"format": "npz", "url": str(ws["good"]), "name": NAME},
        "store_url": str(ws["store"]),
        "tracking": {"tracking_uri": f"sqlite:///{ws['root'] / 'mlflow.db'}"},
        "evaluation": {"enabled": False},
        "patches": {"enabled": False},
        "cluster": {"kind": "local", "n_workers": 1, "threads_per_worker": 1},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    path = ws["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _write(ws, name: str, data: bytes) -> Path:
    path = ws["root"] / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _npz(ws, name: str, **arrays) -> Path:
    path = ws["root"] / name
    np.savez(path, **arrays)
    return path


def _mixed_sizes(ws) -> Path:
    folder = ws["root"] / "mixed" / "train"
    for label, size in ((0, 28), (1, 32)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((size, size), 128, np.uint8)).save(folder / str(label) / f"{size}px.png")
    return ws["root"] / "mixed"


def _npz_with_rows_missing(ws) -> Path:
    """An archive whose ``x_train`` header promises 800 rows but holds 100 (a copy cut short)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (800, 28, 28)})
    labels = io.BytesIO()
    np.save(labels, np.resize(ws["labels"], 800))
    path = ws["root"] / "rows-missing.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x_train.npy", header.getvalue() + ws["images"][:100].tobytes())
        archive.writestr("y_train.npy", labels.getvalue())
    return path


def _png_header(width: int, height: int) -> bytes:
    """A grayscale PNG that declares ``width`` × ``height`` and holds no pixel rows: what Pillow
    reads of a huge image before deciding on its size, in 60 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _huge_image(ws) -> Path:
    _write(ws, "huge/train/0/huge.png", _png_header(30_000, 30_000))
    return ws["root"] / "huge"


def _huge_image_in_shard(ws) -> Path:
    """A WebDataset shard: a good image, then one declaring 30000 × 30000 pixels."""
    good = io.BytesIO()
    Image.fromarray(ws["images"][0]).save(good, format="PNG")
    members = {"a.png": good.getvalue(), "a.cls": b"0", "b.png": _png_header(30_000, 30_000), "b.cls": b"1"}
    path = ws["root"] / "huge-shard" / "train-0000.tar"
    path.parent.mkdir(exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.parent


def _ingest(url, fmt="npz", *extra):
    return lambda ws: ["ingest", "--format", fmt, "--url", str(url(ws) if callable(url) else url), "--name", NAME,
                       "--store", str(ws["store"]), *extra]


# (case id, argv builder, what the error line must name)
CASES = [
    ("corrupt-file", _ingest(lambda ws: _write(ws, "corrupt.npz", b"this is not a zip archive" * 40)), "corrupt.npz"),
    ("truncated-file", _ingest(lambda ws: _write(ws, "truncated.npz", ws["good"].read_bytes()[:50_000])), "truncated.npz"),
    ("unsupported-format", _ingest(lambda ws: ws["good"], "tfrecord"), "--format"),
    ("unknown-url-protocol", _ingest("foo://bucket/data.npz"), "foo://bucket/data.npz"),
    ("missing-optional-package", _ingest("gs://bucket/data.npz"), "gcsfs"),
    ("empty-dataset", _ingest(lambda ws: _npz(ws, "empty.npz", images=np.zeros((0, 28, 28), np.uint8),
                                              labels=np.zeros(0, np.int64))), "empty.npz"),
    ("count-mismatch", _ingest(lambda ws: _npz(ws, "mismatch.npz", images=ws["images"][:50], labels=ws["labels"][:40])),
     "50 images, 40 labels"),
    ("negative-label", _ingest(lambda ws: _npz(ws, "negative.npz", images=ws["images"][:20],
                                               labels=np.r_[ws["labels"][:7], -5, ws["labels"][8:20]].astype(np.int64))), "sample 7 has label -5"),
    ("non-finite-pixels", _ingest(lambda ws: _npz(ws, "nan.npz", images=np.where(np.arange(20)[:, None, None] == 3, np.nan,
                                                                                  ws["images"][:20].astype(float)),
                                                  labels=ws["labels"][:20])), "sample 3 has non-finite"),
    ("mixed-image-sizes", _ingest(_mixed_sizes, "image-folder"), "32px.png"),
    ("npz-rows-missing", _ingest(_npz_with_rows_missing), "rows-missing.npz: x_train: truncated: the header says 800 rows"),
    ("huge-image", _ingest(_huge_image, "image-folder"), "huge/train/0/huge.png: image too large"),
    ("huge-image-in-shard", _ingest(_huge_image_in_shard, "webdataset"), "train-0000.tar:b: image too large"),
    ("unknown-config-key", lambda ws: ["run", str(_config(ws, "typo", bins={"nmu_bins": 3}))], "bins.nmu_bins"),
    ("ratio-out-of-range", lambda ws: ["run", str(_config(ws, "ratio")), "--ratio", "1.5"], "sampling.ratios"),
    ("unknown-backbone", lambda ws: ["run", str(_config(ws, "backbone", embedding={"backbone": "timm:no_such_net"}))],
     "embedding.backbone"),
    ("missing-checkpoint", lambda ws: ["run", str(_config(ws, "no-ckpt", patches={"enabled": True, "mae_checkpoint":
                                                                                  str(ws["root"] / "absent.safetensors")}))],
     "absent.safetensors"),
    ("corrupt-checkpoint", lambda ws: ["run", str(_config(ws, "bad-weights", embedding={
        "backbone": "timm:resnet18", "weights": str(_write(ws, "weights.safetensors", b"\x00garbage" * 64))}))],
     "weights.safetensors"),
    ("unreachable-cluster", lambda ws: ["run", str(_config(ws, "cluster", cluster={
        "kind": "address", "address": f"tcp://127.0.0.1:{free_port()}"}))], "cluster.address"),
    ("unwritable-store", lambda ws: ["run", str(_config(ws, "ro-store", store_url="/proc/dq-store"))], "/proc/dq-store"),
    ("subset-gone", lambda ws: ["export", "0123456789abcdef", str(ws["root"] / "out"), "--format", "npz",
                                "--store", str(ws["store"])], "subsets/0123456789abcdef"),
    ("export-target-not-empty", lambda ws: ["export", "0123456789abcdef", str(_write(ws, "taken/notes.txt", b"mine").parent),
                                            "--format", "npz", "--store", str(ws["store"])], "not empty"),
    ("patch-size-does-not-divide", lambda ws: ["run", str(_config(ws, "patch", patches={"enabled": True, "patch_size": 5}))],
     "patches.patch_size=5"),
    ("ratio-gives-empty-subset", lambda ws: ["run", str(_config(ws, "tiny-ratio")), "--ratio", "0.01"], "keep ratio 0.01"),
    ("unreachable-tracking-server", lambda ws: ["run", str(_config(ws, "mlflow-down", sampling={"ratios": [0.5]}, tracking={
        "tracking_uri": f"http://127.0.0.1:{free_port()}"}))], "tracking.tracking_uri http://127.0.0.1:"),
]


# Cases that fail after ingest (served from Prefect's cache), before the expensive stages.
NEEDS_INGESTED_DATA = ("patch-size-does-not-divide", "ratio-gives-empty-subset", "unreachable-tracking-server")


@pytest.fixture(scope="module")
def primed(ws):
    """One run that ingests the good source through the flow (and fails at preflight), so later
    runs on it find the ingest in Prefect's cache and do not rewrite the dataset."""
    first = dq("run", str(_config(ws, "prime", patches={"enabled": True, "patch_size": 5})), env=ws["env"], cwd=ws["root"])
    assert first.returncode == 2 and "patches.patch_size=5" in first.last_line, first.stderr[-3000:]
    return ws


@pytest.mark.parametrize(("case", "argv", "culprit"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_naming_the_culprit_and_the_store_unchanged(request, ws, case, argv, culprit):
    if case in NEEDS_INGESTED_DATA:
        request.getfixturevalue("primed")
    args = argv(ws)
    before = tree_digest(ws["store"])
    done = dq(*args, env=ws["env"], cwd=ws["root"])
    assert done.returncode == 2, (case, done.stderr[-3000:])
    assert done.last_line.startswith("error: "), done.stderr[-3000:]
    assert culprit in done.last_line, done.last_line
    assert "Traceback" not in done.stdout + done.stderr
    assert tree_digest(ws["store"]) == before
    assert culprit in done.log_path.read_text()  # with the details the terminal leaves out


def test_a_cluster_address_where_no_scheduler_answers_fails_within_30_s_naming_it(ws):
    """A listener that accepts the connection and never replies (an HTTP port, a stalled proxy):
    distributed's client would wait without end; the run stops after the 30 s handshake."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        config = _config(ws, "silent-cluster", cluster={"kind": "address", "address": address})
        start = time.monotonic()
        done = dq("run", str(config), env=ws["env"], cwd=ws["root"], timeout=300)
        elapsed = time.monotonic() - start
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"error: cluster.address {address}: no dask scheduler answered within 30 s" in done.last_line, done.last_line
    assert "Traceback" not in done.stdout + done.stderr
    assert elapsed < 30 + 45, elapsed  # the handshake's 30 s, and the CLI's start on a busy machine


def test_there_are_at_least_15_kinds():
    assert len(CASES) >= 15


def test_s3_without_s3fs_names_the_url_and_the_extra(tmp_path):
    """s3fs ships with the dev environment; here it is made unimportable, as on a machine without the extra."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['s3fs'] = None; from flows.cli import main; "
        "sys.exit(main(['ingest', '--format', 'npz', '--url', 's3://bucket/data.npz', '--store', sys.argv[1]]))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store")], env=cli_env(tmp_path), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: s3://bucket/data.npz: the 's3://' protocol needs s3fs") and "pip install 'dq[s3]'" in last


def test_an_image_over_dataset_max_image_pixels_is_refused_naming_it_and_the_limit_can_be_raised(ws, tmp_path):
    """The limit counts width × height: 28 × 28 = 784 pixels pass at 784, and fail at 783."""
    folder = tmp_path / "small" / "0"
    folder.mkdir(parents=True)
    Image.fromarray(ws["images"][0]).save(folder / "first.png")
    done = {}
    for limit in (783, 784):
        config = tmp_path / f"limit-{limit}.yaml"
        config.write_text(yaml.safe_dump({"dataset": {"format": "image-folder", "url": str(tmp_path / "small"), "name": "small",
                                                      "max_image_pixels": limit}, "store_url": str(tmp_path / "store")}))
        done[limit] = dq("ingest", str(config), env=ws["env"], cwd=tmp_path)
    assert done[783].returncode == 2, done[783].stderr[-3000:]
    assert done[783].last_line.startswith(f"error: {tmp_path / 'small' / '0' / 'first.png'}: image too large "
                                          "(28x28 (WxH) = 784 pixels): more than dataset.max_image_pixels=783 pixels")
    assert done[784].returncode == 0, done[784].stderr[-3000:]
    assert "train       1 samples" in done[784].stdout


def test_s3_without_credentials_names_the_url(ws, tmp_path):
    """A real S3 endpoint (moto's server) holding the source: with credentials the ingest works;
    without any (no AWS_* variables, no shared files), the source URL, then the store URL, is named
    instead of botocore's ``NoCredentialsError: Unable to locate credentials``."""
    import s3fs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
                    "AWS_EC2_METADATA_DISABLED": "true"}
        credentials = {"AWS_ACCESS_KEY_ID": "dq-test", "AWS_SECRET_ACCESS_KEY": "dq-test-secret"}
        fs = s3fs.S3FileSystem(endpoint_url=endpoint["AWS_ENDPOINT_URL"], key="dq-test", secret="dq-test-secret",
                               skip_instance_cache=True)
        fs.mkdir("data")
        fs.put(str(ws["good"]), "data/good.npz")
        bare = {k: v for k, v in ws["env"].items() if not k.startswith("AWS_")} | endpoint
        store = tmp_path / "store"
        runs = {
            "with credentials": (["--url", "s3://data/good.npz", "--store", str(store)], bare | credentials),
            "s3://data/good.npz": (["--url", "s3://data/good.npz", "--store", str(store)], bare),
            "s3://data/store": (["--url", str(ws["good"]), "--store", "s3://data/store"], bare),
        }
        done = {what: dq("ingest", "--format", "npz", "--name", NAME, *args, env=env, cwd=tmp_path)
                for what, (args, env) in runs.items()}
    finally:
        server.stop()
    assert done.pop("with credentials").returncode == 0
    for url, failed in done.items():
        assert failed.returncode == 2, failed.stderr[-3000:]
        assert failed.last_line.startswith(f"error: {url}: no S3 credentials found (set AWS_ACCESS_KEY_ID"), failed.last_line
        assert "Traceback" not in failed.stdout + failed.stderr


def _unshare_works() -> bool:
    """Whether this machine lets a process make a private mount namespace without privileges."""
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--map-root-user", "--mount", "true"], capture_output=True).returncode == 0


needs_mount_namespace = pytest.mark.skipif(
    not _unshare_works(),
    reason="a read-only or full filesystem without privileges needs user namespaces (unshare --map-root-user --mount)",
)


def _dq_in_mount_namespace(ws, before: str, after: str, *args: str) -> Finished:
    """``dq ARGS`` in a private mount namespace, after the shell commands ``before`` (which mount a
    read-only or full filesystem there) and followed by ``after``. chmod cannot make a read-only
    store for root; a mount can, for root and everyone else alike, and it vanishes with the process."""
    script = f'{before} || exit 99; "$@"; status=$?; {after}; exit $status'
    proc = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", script, "sh",
                           sys.executable, "-m", "flows.cli", *args],
                          env=ws["env"], cwd=ws["root"], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 99, proc.stderr[-3000:]
    return Finished(proc.returncode, proc.stdout, proc.stderr)


@needs_mount_namespace
def test_gc_on_a_read_only_store_names_it(ws, tmp_path):
    """Two snapshots, one for ``--keep 1`` to remove, on a read-only mount: one line naming the
    store; ``--dry-run``, which writes nothing, still lists what would go."""
    from dq_ops.config import DatasetConfig
    from dq_ops.ingest import ingest
    from dq_ops.store import Store

    store = tmp_path / "store"
    for name, rows in (("first", slice(0, 40)), ("second", slice(40, 80))):
        source = _npz(ws, f"{name}.npz", images=ws["images"][rows], labels=ws["labels"][rows])
        ingest(DatasetConfig(format="npz", url=str(source), name="small"), Store(str(store)))
    before = tree_digest(store)
    read_only = f"mount --bind {store} {store} && mount -o remount,bind,ro {store}"
    dry = _dq_in_mount_namespace(ws, read_only, "true", "gc", "--keep", "1", "--dry-run", "--store", str(store))
    assert dry.returncode == 0 and "would remove datasets/small-" in dry.stdout, dry.stderr[-3000:]
    done = _dq_in_mount_namespace(ws, read_only, "true", "gc", "--keep", "1", "--store", str(store))
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.last_line.startswith(f"error: store {store} is not writable: Read-only file system"), done.last_line
    assert "Traceback" not in done.stdout + done.stderr
    assert tree_digest(store) == before


@needs_mount_namespace
@pytest.mark.parametrize("free_kib", [0, 64], ids=["full-from-the-start", "full-during-ingest"])
def test_a_full_disk_names_the_store_and_is_not_retried(ws, tmp_path, free_kib):
    """A copy of the store on a 1 MiB tmpfs filled up to ``free_kib``: with none free the run's first
    write (its run record, before ingest) fails; with 64 KiB the run starts and its ingest task
    fails on the chunks. One line names the store, Prefect does not retry (a retry cannot free the
    disk), and the store keeps every byte."""
    mount, store = tmp_path / "disk", tmp_path / "disk" / "store"
    mount.mkdir()
    # a limit the stored snapshot was not ingested under: the run's ingest reads and writes
    config = _config(ws, "full-disk", store_url=str(store), dataset={"limit": 150})
    done = _dq_in_mount_namespace(
        ws, f"mount -t tmpfs -o size=1m tmpfs {mount} && cp -a {ws['store']} {store} && "
            f"{{ dd if=/dev/zero of={mount}/filler bs=4k 2>/dev/null; true; }} && truncate -s -{free_kib}K {mount}/filler",
        f"cp -a {store} {tmp_path / 'after'}", "run", str(config))
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.last_line.startswith(f"error: store {store} cannot be written: No space left on device"), done.last_line
    assert "Traceback" not in done.stdout + done.stderr
    log = done.log_path.read_text()
    # with room to start, the ingest task met the full disk, once: no "Retry 1/2 will start"
    failed_ingest = "prefect.task_runs - Finished in state Failed('Task run encountered an exception DQStoreError"
    assert log.count(failed_ingest) == (1 if free_kib else 0)
    assert "Retry" not in log
    assert tree_digest(tmp_path / "after") == tree_digest(ws["store"])
