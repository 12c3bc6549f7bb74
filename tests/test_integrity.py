"""Damaged stores through the real CLI: one chunk deleted, or 12 bytes of one chunk overwritten,
in a dataset snapshot's images, labels and ids, an embeddings artifact, a bins artifact and a subset.

No command exits 0 having used damaged data: ``dq verify`` names each damaged artifact and exits 1;
a run that meets a damaged derived artifact recomputes it, and it comes back byte for byte as the
clean run wrote it; ``dq export`` of a damaged subset stops naming it, and the next run recomputes
it; a damaged snapshot stops ``dq run`` and ``dq export`` with exit 2 naming it and the
``dq ingest`` that repairs it, and that ingest restores it byte for byte.

Light runs: 300 real Fashion-MNIST images in chunks of 100 rows, 32 px embeddings, no patch
dropping, no evaluation.
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


def _config(root: Path, store: Path, name: str, **sections) -> Path:
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
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    path = root / f"{store.name}-{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _only(store: Path, kind: str) -> Path:
    (path,) = [p for p in (store / kind).iterdir() if not p.name.startswith(".")]
    return path


def _chunk(artifact: Path, array: str) -> Path:
    return sorted(p for p in (artifact / array / "c").rglob("*") if p.is_file())[1 if array == "features" else 0]


def _damage(chunk: Path, how: str) -> None:
    if how == "deleted":
        chunk.unlink()
    else:
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2:len(data) // 2 + 12] = bytes(12)
        chunk.write_bytes(bytes(data))


def _content(artifact: Path) -> dict[str, object]:
    """An artifact as comparable bytes: every file but the root record, and the record without
    its creation time."""
    files = {k: v for k, v in tree_digest(artifact).items() if k != "zarr.json"}
    record = json.loads((artifact / "zarr.json").read_text())["attributes"]["dq"]
    return files | {"record": {k: v for k, v in record.items() if k != "created"}}


def _published(store: Path) -> dict[str, str]:
    """Every file of the published derived artifacts (staging groups left out)."""
    return {f"{kind}/{path}": digest for kind in ("embeddings", "bins", "subsets")
            for path, digest in tree_digest(store / kind).items() if not path.startswith(".")}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A clean store after one run (4 bins, a 10% subset): what a damaged store must come back to."""
    root = tmp_path_factory.mktemp("integrity")
    env = cli_env(root, PREFECT_HOME=str(root / "prefect-home"))
    images = _idx("train-images-idx3-ubyte.gz", 16, 400, (28, 28))
    labels = _idx("train-labels-idx1-ubyte.gz", 8, 400, ()).astype(np.int64)
    np.savez(root / "source.npz", x_train=images[:300], y_train=labels[:300], x_test=images[300:], y_test=labels[300:])
    clean = root / "clean"
    done = dq("run", str(_config(root, clean, "run")), env=env, cwd=root)
    assert done.returncode == 0, done.stderr
    (subset,) = [line.split()[-1].rsplit("/", 1)[-1] for line in done.stdout.splitlines() if line.startswith("subset ")]
    return {"root": root, "env": env, "clean": clean, "subset": subset}


def _restored(ws, store: Path) -> None:
    """Every artifact of the clean run is in ``store``, byte for byte, and ``dq verify`` finds nothing."""
    for kind in ("datasets", "embeddings", "bins", "subsets"):
        for artifact in (ws["clean"] / kind).iterdir():
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
]


@pytest.mark.parametrize("how", ["deleted", "corrupted"])
@pytest.mark.parametrize(("kind", "array", "chunks", "change"), DERIVED, ids=[d[0] for d in DERIVED])
def test_a_damaged_derived_artifact_is_reported_then_recomputed_byte_for_byte(ws, kind, array, chunks, change, how):
    store = _copy(ws, f"{kind}-{how}")
    artifact = _only(store, kind)
    _damage(_chunk(artifact, array), how)

    verify = dq("verify", "--store", str(store), env=ws["env"], cwd=ws["root"])
    assert verify.returncode == 1, verify.stdout + verify.stderr
    (line,) = [line for line in verify.stdout.splitlines() if line.startswith("damaged ")]
    assert f"{kind}/{artifact.name}: {array}:" in line
    assert (f"1 of {chunks} chunks missing" if how == "deleted" else "does not decode") in line

    # A run that reads the damaged artifact recomputes it first, saying so.
    run = dq("run", str(_config(ws["root"], store, "changed", **change)), env=ws["env"], cwd=ws["root"])
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

    run = dq("run", str(_config(ws["root"], store, "run")), env=ws["env"], cwd=ws["root"])
    assert run.returncode == 0, run.stderr
    _restored(ws, store)


@pytest.mark.parametrize("how", ["deleted", "corrupted"])
def test_a_damaged_snapshot_stops_commands_until_its_source_is_read_again(ws, how):
    store = _copy(ws, f"dataset-{how}")
    # A run on the copy first: its ingest is then in Prefect's cache, as on a store in daily use.
    primed = dq("run", str(_config(ws["root"], store, "run")), env=ws["env"], cwd=ws["root"])
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
    run = dq("run", str(_config(ws["root"], store, "run36", embedding={"image_size": 36})), env=ws["env"], cwd=ws["root"])
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
