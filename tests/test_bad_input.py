"""The bad-input matrix: every kind of bad source, configuration or output target, run through
the real ``dq`` CLI in a subprocess, ends the same way: exit status 2, a last line
``error: …`` that names the culprit (file, sample, field or option) and the log file with the
details, no traceback on the terminal, and the store byte for byte as it was.

The store starts with a good dataset of the same name (so a failed ingest must not touch it).
Runs that fail after ingest (on what the data must allow: patch size, an empty subset; or on an
unreachable MLflow server) find the dataset ingested by an earlier run in Prefect's cache, so they too leave every byte as it was; the MLflow
database lives outside the store in these configs.
"""

from __future__ import annotations

import gzip
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dq_ops.readers.idx import FASHION_MNIST_DIR
from tests.cli_helpers import cli_env, dq, free_port, tree_digest

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


def _ingest(url, fmt="npz", *extra):
    return lambda ws: ["ingest", "--format", fmt, "--url", str(url(ws) if callable(url) else url), "--name", NAME,
                       "--store", str(ws["store"]), *extra]


# (case id, argv builder, what the error line must name)
CASES = [
    ("corrupt-file", _ingest(lambda ws: _write(ws, "corrupt.npz", b"this is not a zip archive" * 40)), "corrupt.npz"),
    ("truncated-file", _ingest(lambda ws: _write(ws, "truncated.npz", ws["good"].read_bytes()[:50_000])), "truncated.npz"),
    ("unsupported-format", _ingest(lambda ws: ws["good"], "parquet"), "--format"),
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
