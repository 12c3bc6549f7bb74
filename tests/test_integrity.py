"""Damaged stores through the real CLI: one chunk deleted, or 12 bytes of one chunk overwritten,
in a dataset snapshot's images, labels and ids, an embeddings artifact, a bins artifact, a subset,
a patch store, the MAE model, a reconstruction and an evaluation (which has no chunks: its
``zarr.json``, which holds its results, is what is lost or overwritten).

No command exits 0 having used damaged data: ``dq verify`` names each damaged artifact and exits 1;
a run that meets a damaged derived artifact recomputes it, and it comes back byte for byte as the
clean run wrote it; ``dq export`` of a damaged subset stops naming it, and the next run recomputes
it; a damaged snapshot stops ``dq run`` and ``dq export`` with exit 2 naming it and the
``dq ingest`` that repairs it, and that ingest restores it byte for byte.

Light runs: 300 real Fashion-MNIST images in chunks of 100 rows, 32 px embeddings; for the
patches, MAE, reconstruction and evaluation cases also patch dropping at 32 px in chunks of 10
images, an MAE trained one epoch on 64 images, and the dq and dq_pixels arms trained 5 steps.
An evaluation's timings are measurements, not results: they are left out when an evaluation is
compared with the clean run's.
"""

from __future__ import annotations

import gzip
import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from dq_ops.readers.idx import FASHION_MNIST_DIR
from tests.cli_helpers import cli_env, dq, tree_digest


def _idx(name: str, offset: int, count: int, shape: tuple[int, ...]) -> np.ndarray:
    with gzip.open(Path(FASHION_MNIST_DIR) / name) as fh:
        data = np.frombuffer(fh.read(), dtype=np.uint8, offset=offset)
    return data[: count * int(np.prod(shape))].reshape(count, *shape)


# The pixel stages and evaluation, as small as they run: what the pixels workspace turns on.
PIXELS = {
    "evaluation": {"enabled": True, "arms": ["dq", "dq_pixels"], "epochs": 1, "min_steps": 5, "max_steps": 5},
    "patches": {"enabled": True, "mae_epochs": 1, "mae_train_samples": 64, "cam_image_size": 32, "chunk_rows": 10},
}


def _config(ws, store: Path, name: str, **sections) -> Path:
    """A run's config file: the workspace's settings (``ws["pixels"]``: patches, MAE and
    evaluation on) changed by ``sections``."""
    root = ws["root"]
    raw = {
        "dataset": {"format": "npz", "url": str(root / "source.npz"), "name": "fm"},
        "store_url": str(store),
        "tracking": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
        "embedding": {"batch_size": 50, "chunk_rows": 100, "image_size": 32},
        "bins": {"num_bins": 4},
        "evaluation": {"enabled": False},
        "patches": {"enabled": False},
        "cluster": {"kind": "local", "n_workers": 1, "threads_per_worker": 1},
    }
    for section, values in [*(PIXELS.items() if ws["pixels"] else []), *sections.items()]:
        raw[section] = {**raw.get(section, {}), **values}
    path = root / f"{store.name}-{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


DERIVED_KINDS = ("embeddings", "bins", "subsets", "patches", "models", "reconstructions", "evaluations")
PIXEL_KINDS = ("patches", "models", "reconstructions", "evaluations")  # made by the pixels workspace's runs
# What an evaluation measures besides its results: never the same twice.
TIMINGS = ("train_seconds", "samples_per_second")


def _only(store: Path, kind: str) -> Path:
    (path,) = [p for p in (store / kind).iterdir() if not p.name.startswith(".")]
    return path


def _first(store: Path, kind: str) -> Path:
    return min(p for p in (store / kind).iterdir() if not p.name.startswith("."))


def _chunk(artifact: Path, array: str) -> Path:
    """The file damaged: a chunk of ``array``, or the group's own metadata for ``zarr.json``."""
    if array == "zarr.json":
        return artifact / "zarr.json"
    return sorted(p for p in (artifact / array / "c").rglob("*") if p.is_file())[1 if array == "features" else 0]


def _damage(chunk: Path, how: str) -> None:
    if how == "deleted":
        chunk.unlink()
    else:
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2:len(data) // 2 + 12] = bytes(12)
        chunk.write_bytes(bytes(data))


def _content(artifact: Path) -> dict[str, object]:
    """An artifact as comparable bytes: every file but the root metadata, its attributes, and
    its record without the creation time (an evaluation's without its timings, and without the
    digests those enter)."""
    files = {k: v for k, v in tree_digest(artifact).items() if k != "zarr.json"}
    attributes = json.loads((artifact / "zarr.json").read_text())["attributes"]
    record = {k: v for k, v in attributes.pop("dq").items() if k != "created"}
    if record["kind"] == "evaluations":
        attributes = {k: v for k, v in attributes.items() if k not in TIMINGS}
        record = {k: v for k, v in record.items() if k not in ("content_digest", "fingerprint")}
    return files | {"attributes": attributes, "record": record}


def _published(store: Path) -> dict[str, str]:
    """Every file of the published derived artifacts (staging groups left out)."""
    return {f"{kind}/{path}": digest for kind in DERIVED_KINDS
            for path, digest in tree_digest(store / kind).items() if not path.startswith(".")}


def _workspace(root: Path, pixels: bool):
    """A clean store after one run (4 bins, a 10% subset; with ``pixels`` its patches, MAE,
    reconstruction and evaluations): what a damaged store must come back to."""
    ws = {"root": root, "env": cli_env(root, PREFECT_HOME=str(root / "prefect-home")), "clean": root / "clean", "pixels": pixels}
    images = _idx("train-images-idx3-ubyte.gz", 16, 400, (28, 28))
    labels = _idx("train-labels-idx1-ubyte.gz", 8, 400, ()).astype(np.int64)
    np.savez(root / "source.npz", x_train=images[:300], y_train=labels[:300], x_test=images[300:], y_test=labels[300:])
    done = dq("run", str(_config(ws, ws["clean"], "run")), env=ws["env"], cwd=root)
    assert done.returncode == 0, done.stderr
    (ws["subset"],) = [line.split()[-1].rsplit("/", 1)[-1] for line in done.stdout.splitlines() if line.startswith("subset ")]
    return ws


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Light runs: ingest, embeddings, bins and subsets only."""
    return _workspace(tmp_path_factory.mktemp("integrity"), pixels=False)


@pytest.fixture(scope="module")
def pixels_ws(tmp_path_factory):
    """Runs with patch dropping, the MAE, reconstruction and evaluation too."""
    return _workspace(tmp_path_factory.mktemp("integrity-pixels"), pixels=True)


def _restored(ws, store: Path) -> None:
    """Every artifact of the clean run is in ``store``, byte for byte, and ``dq verify`` finds nothing."""
    for kind in ("datasets", *DERIVED_KINDS):
        for artifact in (ws["clean"] / kind).iterdir() if (ws["clean"] / kind).exists() else []:
            if not artifact.name.startswith("."):
                assert _content(store / kind / artifact.name) == _content(artifact), f"{kind}/{artifact.name}"
    verify = dq("verify", "--store", str(store), env=ws["env"], cwd=ws["root"])
    assert verify.returncode == 0, verify.stdout


def _copy(ws, name: str) -> Path:
    store = ws["root"] / name
    shutil.copytree(ws["clean"], store, ignore=shutil.ignore_patterns(".locks"))
    return store


# (artifact kind, the array damaged, its chunks, a change of configuration whose run reads it)
DERIVED = [
    ("embeddings", "features", 3, {"bins": {"num_bins": 5}}),
    ("bins", "bin_of_sample", 1, {"sampling": {"ratios": [0.2]}}),
    ("patches", "patches", 3, {"patches": {"mae_epochs": 2}}),  # another MAE reconstructs them
    ("models", "checkpoint", 1, {"patches": {"drop_ratio": 0.3}}),  # other patches: it reconstructs them
    ("reconstructions", "images", 3, {"evaluation": {"max_steps": 6}}),  # the dq_pixels arm trains on them
    ("evaluations", "zarr.json", 0, {}),  # a run opens its evaluations to report them
]
# What dq verify says of each damage: a lost or overwritten chunk, or the group's lost or
# overwritten metadata.
PROBLEMS = {("chunk", "deleted"): "1 of {chunks} chunks missing", ("chunk", "corrupted"): "does not decode",
            ("zarr.json", "deleted"): "zarr.json (the group's metadata and record) is missing",
            ("zarr.json", "corrupted"): "zarr.json does not parse"}


@pytest.mark.parametrize("how", ["deleted", "corrupted"])
@pytest.mark.parametrize(("kind", "array", "chunks", "change"), DERIVED, ids=[d[0] for d in DERIVED])
def test_a_damaged_derived_artifact_is_reported_then_recomputed_byte_for_byte(request, kind, array, chunks, change, how):
    ws = request.getfixturevalue("pixels_ws" if kind in PIXEL_KINDS else "ws")
    store = _copy(ws, f"{kind}-{how}")
    artifact = _first(store, kind)
    _damage(_chunk(artifact, array), how)

    verify = dq("verify", "--store", str(store), env=ws["env"], cwd=ws["root"])
    assert verify.returncode == 1, verify.stdout + verify.stderr
    (line,) = [line for line in verify.stdout.splitlines() if line.startswith("damaged ")]
    where = "zarr.json" if array == "zarr.json" else "chunk"
    assert f"{kind}/{artifact.name}: " + ("" if where == "zarr.json" else f"{array}:") in line, line
    assert PROBLEMS[where, how].format(chunks=chunks) in line, line

    # A run that reads the damaged artifact recomputes it first, saying so.
    run = dq("run", str(_config(ws, store, "changed", **change)), env=ws["env"], cwd=ws["root"])
    assert run.returncode == 0, run.stderr
    assert f"{store}/{kind}/{artifact.name} is damaged" in run.stderr
    _restored(ws, store)


def test_export_of_a_damaged_subset_names_it_and_the_next_run_recomputes_it(ws):
    store = _copy(ws, "subset-corrupted")
    _damage(_chunk(store / "subsets" / ws["subset"], "indices"), "corrupted")
    out = ws["root"] / "export-subset"
    export = dq("export", ws["subset"], str(out), "--format", "npz", "--store", str(store), env=ws["env"], cwd=ws["root"])
    assert export.returncode == 2, export.stderr
    assert f"{store}/subsets/{ws['subset']} is damaged: indices: chunk 0 does not decode" in export.last_line
    assert "the next run recomputes it" in export.last_line and not (out / "manifest.jsonl").exists()

    run = dq("run", str(_config(ws, store, "run")), env=ws["env"], cwd=ws["root"])
    assert run.returncode == 0, run.stderr
    _restored(ws, store)


def test_export_overwrite_that_meets_damage_keeps_the_previous_export(ws):
    store = _copy(ws, "export-overwrite")
    out = ws["root"] / "export-overwrite-out"
    first = dq("export", ws["subset"], str(out), "--format", "image-folder", "--store", str(store), env=ws["env"], cwd=ws["root"])
    assert first.returncode == 0, first.stderr
    previous = tree_digest(out)
    snapshot = _only(store, "datasets")
    _damage(_chunk(snapshot, "train/images"), "corrupted")  # found only once the pixels are read

    again = dq("export", ws["subset"], str(out), "--format", "npz", "--overwrite", "--store", str(store),
               env=ws["env"], cwd=ws["root"])
    assert again.returncode == 2, again.stderr
    assert f"{store}/datasets/{snapshot.name} is damaged" in again.last_line, again.last_line
    assert tree_digest(out) == previous  # the previous export whole, nothing of the new one
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name)) == [out.name]


@pytest.mark.parametrize("how", ["deleted", "corrupted"])
def test_a_damaged_snapshot_stops_commands_until_its_source_is_read_again(ws, how):
    store = _copy(ws, f"dataset-{how}")
    # A run on the copy first: its ingest is then in Prefect's cache, as on a store in daily use.
    primed = dq("run", str(_config(ws, store, "run")), env=ws["env"], cwd=ws["root"])
    assert primed.returncode == 0, primed.stderr
    snapshot = _only(store, "datasets")
    _damage(_chunk(snapshot, "train/images"), how)
    derived = _published(store)

    verify = dq("verify", "--store", str(store), env=ws["env"], cwd=ws["root"])
    assert verify.returncode == 1, verify.stdout + verify.stderr
    (line,) = [line for line in verify.stdout.splitlines() if line.startswith("damaged ")]
    assert f"datasets/{snapshot.name}: train/images:" in line and "dq ingest --format npz" in line

    export = dq("export", ws["subset"], str(ws["root"] / f"export-{how}"), "--format", "npz",
                "--store", str(store), env=ws["env"], cwd=ws["root"])
    # New embeddings (36 px) read the images.
    run = dq("run", str(_config(ws, store, "run36", embedding={"image_size": 36})), env=ws["env"], cwd=ws["root"])
    failed = [export] if how == "deleted" else [export, run]
    for command in failed:
        assert command.returncode == 2, command.stderr
        assert f"{store}/datasets/{snapshot.name} is damaged" in command.last_line, command.last_line
        assert "re-ingest it: dq ingest" in command.last_line and "Traceback" not in command.stderr
    if how == "deleted":  # the run's cached ingest no longer matches the store: it reads the source again
        assert run.returncode == 0, run.stderr
        assert f"{store}/datasets/{snapshot.name} is damaged" in run.stderr
    else:  # nothing was written from the damaged images; the ingest the error names repairs them
        assert _published(store) == derived  # (the embeddings' resumable staging group may stay, for a rerun)
        command = line.split("re-ingest it: ", 1)[1]
        ingest = dq(*shlex.split(command)[1:], env=ws["env"], cwd=store.parent)
        assert ingest.returncode == 0, ingest.stderr
    _restored(ws, store)


@pytest.mark.parametrize("how", ["deleted", "corrupted"])
@pytest.mark.parametrize("array", ["train/labels", "train/ids", "test/images"])
def test_verify_names_any_damaged_snapshot_array_and_the_ingest_it_names_restores_it(ws, array, how):
    store = _copy(ws, f"dataset-{array.replace('/', '-')}-{how}")
    snapshot = _only(store, "datasets")
    _damage(_chunk(snapshot, array), how)
    verify = dq("verify", "--store", str(store), env=ws["env"], cwd=ws["root"])
    assert verify.returncode == 1, verify.stdout + verify.stderr
    (line,) = [line for line in verify.stdout.splitlines() if line.startswith("damaged ")]
    assert f"datasets/{snapshot.name}: {array}:" in line, line
    ingest = dq(*shlex.split(line.split("re-ingest it: ", 1)[1])[1:], env=ws["env"], cwd=store.parent)
    assert ingest.returncode == 0, ingest.stderr
    _restored(ws, store)


def test_verify_repair_removes_a_damaged_derived_artifact_and_what_was_made_from_it(ws):
    store = _copy(ws, "repair")
    embeddings = _only(store, "embeddings")
    _damage(_chunk(embeddings, "features"), "corrupted")
    repair = dq("verify", "--repair", "--store", str(store), env=ws["env"], cwd=ws["root"])
    assert repair.returncode == 1, repair.stdout + repair.stderr
    removed = sorted(line.split()[1].split("/")[0] for line in repair.stdout.splitlines() if line.startswith("removed "))
    assert removed == ["bins", "embeddings", "subsets", "subsets"], repair.stdout  # DQ and random subsets
    assert not embeddings.exists() and _only(store, "datasets").exists()
    assert dq("verify", "--deep", "--store", str(store), env=ws["env"], cwd=ws["root"]).returncode == 0
