"""Re-quantizing a refreshed dataset with the real flow: snapshots, incremental embeddings and
bins, stable selections and their diff, cache keys that agree with the store, and gc.

Sources are real Fashion-MNIST images written as an ``.npz`` with sample names (ids survive
rows being removed) and as an image folder; the flow runs on a real Prefect server, Zarr on disk
and a one-worker dask cluster, with the pixel stages and evaluation off to keep it quick.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dq_ops.config import DQConfig
from dq_ops.readers.idx import FASHION_MNIST_CLASSES, load_fashion_mnist
from dq_ops.store import Store

FIRST = 400  # training images of the first source
REMOVED = np.arange(0, 400, 40)  # 10 samples the refresh removes (one per class band)
ADDED = np.arange(400, 420)  # 20 samples it adds
TEST = 100
NONE = np.array([], dtype=int)


def _write_npz(path: Path, rows: np.ndarray, relabeled: np.ndarray = NONE, modified: np.ndarray = NONE) -> Path:
    """Fashion-MNIST ``rows`` named ``fm-<row>``; ``relabeled`` rows move to the next class and
    ``modified`` rows have their pixels inverted (same name, new content)."""
    images, labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    images, labels = images.copy(), labels.copy()
    labels[relabeled] = (labels[relabeled] + 1) % len(FASHION_MNIST_CLASSES)
    images[modified] = 255 - images[modified]
    np.savez(
        path, x_train=images[rows], y_train=labels[rows], ids_train=np.array([f"fm-{r}" for r in rows]),
        x_test=test_images[:TEST], y_test=test_labels[:TEST], class_names=np.array(FASHION_MNIST_CLASSES),
    )
    return path


def _config(store: Path | str, source: Path, name: str = "fm", **sections) -> DQConfig:
    raw = {
        "store_url": str(store),
        "dataset": {"format": "npz", "url": str(source), "name": name},
        "bins": {"num_bins": 4},
        "sampling": {"ratios": [0.25]},
        "embedding": {"batch_size": 64},
        "patches": {"enabled": False},
        "evaluation": {"enabled": False},
        "cluster": {"kind": "local", "n_workers": 1, "threads_per_worker": 2},
    }
    for section, values in sections.items():
        raw[section] = raw.get(section, {}) | values if isinstance(values, dict) else values
    return DQConfig.model_validate(raw)


def _task_states(state) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    return {run.name: run.state.name for run in runs}


def _state_of(states: dict[str, str], prefix: str) -> str:
    (state,) = [s for name, s in states.items() if name.startswith(prefix)]
    return state


def _run(config: DQConfig):
    from flows.quantize import quantize

    state = quantize(config, return_state=True)
    return state.result(), _task_states(state)


def _open(store_url: str, url: str):
    kind, name = url.rstrip("/").rsplit("/", 2)[-2:]
    return Store(store_url).open(kind, name)


@pytest.fixture(scope="module")
def refreshed(prefect_harness, tmp_path_factory):
    """A first run on 400 images, then the same store after the source lost 10 and gained 20."""
    folder = tmp_path_factory.mktemp("refresh")
    first_rows = np.arange(FIRST)
    second_rows = np.concatenate([np.setdiff1d(first_rows, REMOVED), ADDED])
    source = folder / "source.npz"
    _write_npz(source, first_rows)
    config = _config(folder / "store", source)
    first, _ = _run(config)
    _write_npz(source, second_rows)  # the same file, rewritten in place
    second, states = _run(config)
    return {"folder": folder, "config": config, "first": first, "second": second, "states": states,
            "second_rows": second_rows, "source": source}


def test_a_refresh_embeds_only_new_samples_and_rebins_only_touched_classes(refreshed):
    first, second = refreshed["first"], refreshed["second"]
    assert first["embedded_samples"] == FIRST
    assert second["embedded_samples"] == len(ADDED)
    assert first["dataset"]["url"] != second["dataset"]["url"]  # a new snapshot
    _, labels = load_fashion_mnist("train")
    touched = set(labels[REMOVED].tolist()) | set(labels[ADDED].tolist())
    assert set(second["classes_rebinned"]) == touched
    # Reused rows are the first run's bytes, found by sample id.
    store_url = refreshed["config"].store_url
    old, new = _open(store_url, first["embeddings"]["url"]), _open(store_url, second["embeddings"]["url"])
    old_rows = {str(i): r for r, i in enumerate(old["ids"][:])}
    new_ids = [str(i) for i in new["ids"][:]]
    kept = [(r, old_rows[i]) for r, i in enumerate(new_ids) if i in old_rows]
    assert len(kept) == FIRST - len(REMOVED)
    new_features, old_features = new["features"][:], old["features"][:]
    assert all(new_features[r].tobytes() == old_features[o].tobytes() for r, o in kept)


def test_a_refresh_reproduces_a_full_run_in_a_second_store(refreshed):
    """`--store` switched to a fresh store runs there (nothing served from the first store) and
    computes exactly what the incremental refresh computed."""
    folder, second = refreshed["folder"], refreshed["second"]
    config = _config(folder / "other-store", refreshed["source"])
    full, states = _run(config)
    assert "Cached" not in states.values()
    assert full["embedded_samples"] == len(refreshed["second_rows"])
    incremental = {kind: _open(refreshed["config"].store_url, second[kind]["url"]) for kind in ("embeddings", "bins")}
    scratch = {kind: _open(config.store_url, full[kind]["url"]) for kind in ("embeddings", "bins")}
    assert scratch["embeddings"]["features"][:].tobytes() == incremental["embeddings"]["features"][:].tobytes()
    assert (scratch["bins"]["bin_of_sample"][:] == incremental["bins"]["bin_of_sample"][:]).all()
    assert scratch["bins"].fingerprint == incremental["bins"].fingerprint  # same content, params and inputs
    assert full["subsets"][0]["fingerprint"] == second["subsets"][0]["fingerprint"]


def test_the_selection_changes_only_where_the_data_changed(refreshed):
    first, second = refreshed["first"], refreshed["second"]
    store = Store(refreshed["config"].store_url)
    old = {str(i) for i in _open(store.url, first["subsets"][0]["url"])["ids"][:]}
    subset = _open(store.url, second["subsets"][0]["url"])
    new = {str(i) for i in subset["ids"][:]}
    removed_names = {f"fm-{r}" for r in REMOVED}
    assert not any(i.split(":")[0] in removed_names for i in new)  # removed samples left the subset
    selection = second["subsets"][0]["selection"]
    assert selection["diff_url"] == f"{subset.url}/selection_diff-from-{first['subsets'][0]['name']}.json"
    diff = json.loads(store.fs.cat_file(selection["diff_url"]))
    assert set(diff["added"]) == new - old and set(diff["removed"]) == old - new
    assert diff["relabeled"] == diff["modified"] == []  # rows removed and added, none changed in place
    assert diff["previous"] == first["subsets"][0]["name"]
    assert second["subsets"][0]["selection"]["churn"] == pytest.approx(len(old - new) / len(old))
    # Classes the change did not touch keep their selection exactly.
    _, labels = load_fashion_mnist("train")
    touched = {FASHION_MNIST_CLASSES[c] for c in set(labels[REMOVED].tolist()) | set(labels[ADDED].tolist())}
    assert set(diff["per_class"]) <= touched
    # ... and the MLflow run says so.
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store.url}/mlflow.db")
    run = client.get_run(second["mlflow_run_id"])
    assert run.data.metrics["embedded_samples"] == len(ADDED)
    assert run.data.metrics["selection_added_r0.25"] == len(new - old)
    assert run.data.metrics["selection_removed_r0.25"] == len(old - new)
    assert "selection_added" not in run.data.metrics  # per ratio only


def test_a_refresh_sorts_relabels_and_in_place_changes_and_keeps_its_history(prefect_harness, tmp_path):
    """v1 → v2 (rows added, removed, relabelled, changed in place) → v3 unchanged. At ratio 1.0
    every sample is selected, so each category is known exactly; the unchanged run records
    "no change" and leaves v2's diff on record as the last change."""
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from dq_ops.selection import position, selection_history

    rows, removed, added = np.arange(200), np.arange(0, 200, 50), np.arange(200, 204)
    relabeled, modified = np.arange(7, 200, 40), np.arange(5, 200, 40)
    source = _write_npz(tmp_path / "source.npz", rows)
    config = _config(tmp_path / "store", source, bins={"num_bins": 2}, sampling={"ratios": [0.25, 1.0]})
    v1, _ = _run(config)
    _write_npz(source, np.concatenate([np.setdiff1d(rows, removed), added]), relabeled, modified)
    v2, _ = _run(config)
    v3, _ = _run(config)
    assert v2["embedded_samples"] == len(added) + len(modified)  # a relabel keeps its embedding

    store = Store(config.store_url)
    first_ids = {str(i) for i in _open(store.url, v1["subsets"][1]["url"])["ids"][:]}
    diff = json.loads(store.fs.cat_file(v2["subsets"][1]["selection"]["diff_url"]))
    assert {position(i) for i in diff["added"]} == {f"fm-{r}" for r in added}
    assert {position(i) for i in diff["removed"]} == {f"fm-{r}" for r in removed}
    assert {position(i) for i in diff["modified"]} == {f"fm-{r}" for r in modified}
    assert not first_ids & set(diff["modified"])  # new content, new ids
    assert {position(i) for i in diff["relabeled"]} == {f"fm-{r}" for r in relabeled}
    assert set(diff["relabeled"]) <= first_ids  # same content, same ids
    assert v3["subsets"][1]["selection"]["status"] == "no change" and store.fs.exists(v2["subsets"][1]["selection"]["diff_url"])

    (key,) = [p.rsplit("/", 1)[-1].removesuffix(".json") for p in store.fs.ls(f"{store.url}/refs/subsets")
              if store.read_ref("subsets", p.rsplit("/", 1)[-1].removesuffix(".json"))["latest"] == v3["subsets"][1]["name"]]
    history = selection_history(store, key)
    assert [e["status"] for e in history] == ["first run", "changed", "no change"]
    assert {k: history[1][k] for k in ("added", "removed", "relabeled", "modified")} == {
        "added": len(added), "removed": len(removed), "relabeled": len(relabeled), "modified": len(modified)}

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store.url}/mlflow.db")
    metrics = client.get_run(v2["mlflow_run_id"]).data.metrics
    assert {k: metrics[f"selection_{k}_r1.0"] for k in ("added", "removed", "relabeled", "modified", "churn")} == {
        "added": len(added), "removed": len(removed), "relabeled": len(relabeled), "modified": len(modified),
        "churn": len(removed) / len(rows)}
    assert "selection_relabeled_r0.25" in metrics and "selection_churn" not in metrics  # per ratio only
    logged = json.loads(mlflow.artifacts.load_text(f"{client.get_run(v2['mlflow_run_id']).info.artifact_uri}/selection/diff_r1.0.json"))
    assert {k: logged[k] for k in ("added", "removed", "relabeled", "modified")} == {
        k: diff[k] for k in ("added", "removed", "relabeled", "modified")}
    # The unchanged run's Prefect table still points at the last change.
    flow_run_id = client.get_run(v3["mlflow_run_id"]).data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as prefect:
        (table,) = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=["dq-selection-diff-r1000"])))
    assert "no change since the previous run; last change" in table.description

    # The reports say what came before: v1 is a first run, v2 lists its diff, v3 names v2's change.
    def report(summary: dict) -> str:
        return Path(summary["report_path"]).read_text()

    assert "## Since the previous run\n\nThis is the first run of these settings" in report(v1)
    second, third = report(v2), report(v3)
    v1_run = client.get_run(v1["mlflow_run_id"]).info.run_name
    v2_run = client.get_run(v2["mlflow_run_id"]).info.run_name
    v1_snapshot, v2_snapshot = (v["dataset"]["url"].rsplit("/", 1)[-1] for v in (v1, v2))
    assert f"- Previous run: `{v1_run}` at " in second and f"on snapshot `{v1_snapshot}` (this run reads `{v2_snapshot}`)" in second
    assert f"- Samples embedded this run: {len(added) + len(modified)}" in second
    assert f"- Classes re-binned: {len(v2['classes_rebinned'])}" in second
    v2_diff = v2["subsets"][1]["selection"]["diff_url"]
    assert (f"| 100.0% | changed | {len(added)} | {len(removed)} | {len(relabeled)} | {len(modified)} | "
            f"{len(removed) / len(rows):.2%} | `{v2_diff}` |") in second
    assert f"- Previous run: `{v2_run}` at " in third and "(the same snapshot as this run)" in third
    assert "- Samples embedded this run: 0" in third and "- Classes re-binned: 0\n" in third
    assert (f"| 100.0% | no change; last change at {history[1]['at']} (run `{v2_run}`): +{len(added)} −{len(removed)}, "
            f"{len(relabeled)} relabelled, {len(modified)} modified | 0 | 0 | 0 | 0 | 0.00% | `{v2_diff}` |") in third
    assert "patch" not in second.lower()  # patches are off


def test_an_unchanged_source_is_served_from_the_cache(refreshed):
    summary, states = _run(refreshed["config"])
    assert states and set(states.values()) == {"Cached"}, states
    assert summary["embedded_samples"] == 0
    assert summary["subsets"][0]["selection"] == {
        "previous": refreshed["second"]["subsets"][0]["name"], "previous_size": summary["subsets"][0]["size"],
        "status": "no change", "added": 0, "removed": 0, "relabeled": 0, "modified": 0, "churn": 0.0, "diff_url": None,
    }
    # ... and the refresh's diff is still the last change on record.
    assert Store(refreshed["config"].store_url).fs.exists(refreshed["second"]["subsets"][0]["selection"]["diff_url"])


def test_an_old_subset_exports_its_own_snapshot(refreshed, tmp_path):
    from dq_ops.export import export_subset

    store = Store(refreshed["config"].store_url)
    name = refreshed["first"]["subsets"][0]["name"]
    export_subset(store, name, str(tmp_path / "old"), "npz")
    images, _ = load_fashion_mnist("train")
    with np.load(tmp_path / "old" / "subset.npz") as npz:
        rows = [int(str(i).split(":")[0].removeprefix("fm-")) for i in npz["ids"]]
        assert (npz["images"][..., 0] == images[rows]).all()
        assert {f"fm-{r}" for r in REMOVED} & {str(i).split(":")[0] for i in npz["ids"]}  # it still has removed samples


def test_a_deleted_artifact_and_a_bumped_stage_version_are_recomputed(refreshed, monkeypatch):
    from dq_ops.stages import SampleStage

    config, second = refreshed["config"], refreshed["second"]
    store = Store(config.store_url)
    subset = second["subsets"][0]["name"]
    shutil.rmtree(f"{store.url}/subsets/{subset}")
    summary, states = _run(config)
    assert states["sample-dq-0.25"] == "Completed" and _state_of(states, "bins-") == "Cached"
    assert store.exists("subsets", subset) and summary["subsets"][0]["name"] == subset

    monkeypatch.setattr(SampleStage, "version", SampleStage.version + 1)
    summary, states = _run(config)
    assert states["sample-dq-0.25"] == "Completed" and _state_of(states, "bins-") == "Cached"
    assert summary["subsets"][0]["name"] != subset  # a new stage version names a new artifact


def test_gc_keeps_everything_a_kept_snapshot_needs(refreshed):
    from dq_ops.errors import DQInputError
    from dq_ops.export import export_subset

    config, first, second = refreshed["config"], refreshed["first"], refreshed["second"]
    store = Store(config.store_url)
    assert store.gc(keep=2) == []
    removed = store.gc(keep=1)
    first_snapshot = first["dataset"]["url"].rsplit("/", 1)[-1]
    assert f"datasets/{first_snapshot}" in removed
    assert f"subsets/{first['subsets'][0]['name']}" in removed
    for kind in ("dataset", "embeddings", "bins"):
        assert _open(store.url, second[kind]["url"]).fingerprint == second[kind]["fingerprint"]
    assert store.exists("subsets", second["subsets"][0]["name"])
    with pytest.raises(DQInputError, match="no such artifact"):
        export_subset(store, first["subsets"][0]["name"], "/nonexistent-export", "npz")
    _, states = _run(config)  # the kept snapshot's run is still whole
    assert set(states.values()) == {"Cached"}, states


def test_a_weights_file_replaced_in_place_is_recomputed(prefect_harness, tmp_path):
    import torch
    from safetensors.torch import save_file

    from dq_ops.backbones import load_classifier

    weights = tmp_path / "lite0.safetensors"
    state = {k: v.contiguous() for k, v in load_classifier().model.state_dict().items()}
    save_file(state, weights)
    source = _write_npz(tmp_path / "source.npz", np.arange(120))
    config = _config(tmp_path / "store", source, embedding={"weights": str(weights)}, bins={"num_bins": 2})
    first, _ = _run(config)
    save_file({k: v * 1.01 if v.is_floating_point() else v for k, v in state.items()}, weights)
    second, states = _run(config)
    assert _state_of(states, "embed-") == "Completed" and states["ingest-fm"] == "Cached"
    assert second["embeddings"]["url"] != first["embeddings"]["url"]
    assert not torch.equal(torch.tensor(_open(config.store_url, second["embeddings"]["url"])["features"][:]),
                           torch.tensor(_open(config.store_url, first["embeddings"]["url"])["features"][:]))


def test_the_cache_serves_ingest_only_while_the_store_agrees(prefect_harness, tmp_path):
    from dq_ops.ingest import ingest

    source = _write_npz(tmp_path / "source.npz", np.arange(120))
    config = _config(tmp_path / "store", source, bins={"num_bins": 2})
    first, _ = _run(config)
    # another source ingested under the same name makes its snapshot latest: the run's ingest
    # stage is not done any more, whatever Prefect's cache holds, and reads its own source again
    ingest(config.dataset.model_copy(update={"url": str(_write_npz(tmp_path / "other.npz", np.arange(60)))}),
           Store(config.store_url))
    second, states = _run(config)
    assert states["ingest-fm"] == "Completed" and _state_of(states, "bins-") == "Cached"
    assert second["dataset"]["url"] == first["dataset"]["url"]
    assert Store(config.store_url).open("datasets", "fm").fingerprint == first["dataset"]["fingerprint"]


def test_a_grown_image_folder_embeds_only_new_files(prefect_harness, tmp_path):
    images, labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    root = tmp_path / "folder"

    def write(split: str, rows: range, pixels: np.ndarray, classes: np.ndarray) -> None:
        for r in rows:
            folder = root / split / FASHION_MNIST_CLASSES[classes[r]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[r]).save(folder / f"{r:05d}.png")

    write("train", range(150), images, labels)
    write("test", range(40), test_images, test_labels)
    config = _config(tmp_path / "store", root, name="folder", dataset={"format": "image-folder"}, bins={"num_bins": 2})
    first, _ = _run(config)
    write("train", range(150, 162), images, labels)
    second, states = _run(config)
    assert first["embedded_samples"] == 150 and second["embedded_samples"] == 12
    assert states["ingest-folder"] == "Completed"
    assert second["subsets"][0]["selection"]["previous"] == first["subsets"][0]["name"]


def test_incremental_bins_keep_existing_samples_in_their_bins(prefect_harness, tmp_path):
    source = tmp_path / "source.npz"
    _write_npz(source, np.arange(FIRST))
    config = _config(tmp_path / "store", source, bins={"num_bins": 4, "refresh": "incremental", "rebuild_fraction": 0.2})
    first, _ = _run(config)
    _write_npz(source, np.concatenate([np.setdiff1d(np.arange(FIRST), REMOVED), ADDED]))
    second, states = _run(config)
    store = Store(config.store_url)
    old, new = _open(store.url, first["bins"]["url"]), _open(store.url, second["bins"]["url"])
    assert new.record["inputs"][2] == old.fingerprint  # the previous bins are an input
    before = dict(zip((str(i) for i in old["ids"][:]), old["bin_of_sample"][:].tolist()))
    after = dict(zip((str(i) for i in new["ids"][:]), new["bin_of_sample"][:].tolist()))
    assert all(after[i] == b for i, b in before.items() if i in after)
    assert new.group.attrs["joined_since_rebuild"] == len(ADDED)
    assert new.group.attrs["removed_since_rebuild"] == len(REMOVED)  # they count toward the rebuild too
    assert 0 < second["subsets"][0]["selection"]["churn"] <= 2 * (len(ADDED) + len(REMOVED)) / FIRST
    _, states = _run(config)
    assert set(states.values()) == {"Cached"}, states


def test_an_incremental_rebuild_forgets_the_chain(tmp_path):
    """Past ``rebuild_fraction`` the bins are rebuilt exactly and no longer name the previous
    bins as an input (so `dq gc` can drop what came before the last rebuild). Library level."""
    from dq_ops.config import BinsConfig, DatasetConfig, EmbeddingConfig
    from dq_ops.embed import embed_dataset
    from dq_ops.ingest import ingest
    from dq_ops.stages import BinsStage

    store, source = Store(str(tmp_path / "store")), tmp_path / "source.npz"
    config = BinsConfig(num_bins=2, refresh="incremental", rebuild_fraction=0.02)
    artifacts = []
    for rows in (np.arange(200), np.arange(200 + len(ADDED))):  # +20 samples: 9% > 2%
        _write_npz(source, rows)
        snapshot = ingest(DatasetConfig(format="npz", url=str(source), name="fm"), store)
        dataset = store.open("datasets", snapshot.name)
        embeddings = embed_dataset(store, snapshot.name, "train", EmbeddingConfig(batch_size=64), None, seed=0).artifact
        artifacts.append(BinsStage(store, dataset, embeddings, config).run())
    first, rebuilt = artifacts
    assert first.name != rebuilt.name
    assert len(rebuilt.record["inputs"]) == 2 and rebuilt.group.attrs["joined_since_rebuild"] == 0


def test_an_incremental_refresh_moves_relabelled_samples_to_their_new_class(tmp_path):
    """A relabel (same id, new label) leaves its old class's bin and joins its new class by its
    GraphCut gain: the new classes count as re-binned, the relabels as joined samples, and
    enough of them trigger a rebuild. Library level: real store, real embeddings."""
    from dq_ops.config import BinsConfig, DatasetConfig, EmbeddingConfig
    from dq_ops.embed import embed_dataset
    from dq_ops.ingest import ingest
    from dq_ops.stages import BinsStage

    rows, relabeled = np.arange(200), np.arange(3, 200, 20)  # 10 relabels: 5% of the data
    _, labels = load_fashion_mnist("train")
    new_labels = (labels[relabeled] + 1) % len(FASHION_MNIST_CLASSES)
    outcomes = {}
    for fraction in (0.2, 0.02):
        store, source = Store(str(tmp_path / f"store-{fraction}")), tmp_path / f"source-{fraction}.npz"
        config = BinsConfig(num_bins=3, refresh="incremental", rebuild_fraction=fraction)
        stages = []
        for relabel in (NONE, relabeled):
            _write_npz(source, rows, relabeled=relabel)
            snapshot = ingest(DatasetConfig(format="npz", url=str(source), name="fm"), store)
            dataset = store.open("datasets", snapshot.name)
            embeddings = embed_dataset(store, snapshot.name, "train", EmbeddingConfig(batch_size=64), None, seed=0).artifact
            stage = BinsStage(store, dataset, embeddings, config)
            stages.append((stage, stage.run()))
        outcomes[fraction] = stages

    (_, old), (stage, new) = outcomes[0.2]
    assert len(new.record["inputs"]) == 3  # joined to the previous bins, not rebuilt
    assert new.group.attrs["joined_since_rebuild"] == len(relabeled)
    assert sorted(stage.classes_rebinned) == sorted(set(new_labels.tolist()))
    assert (np.asarray(new["labels"][:])[relabeled] == new_labels).all()
    moved = np.isin(rows, relabeled)
    assert (new["bin_of_sample"][:][~moved] == old["bin_of_sample"][:][~moved]).all()  # the rest stay put
    for c, sizes in zip(new.group.attrs["classes"], new.group.attrs["bin_sizes"]):
        members = np.flatnonzero(np.asarray(new["labels"][:]) == c)
        assert sizes == np.bincount(new["bin_of_sample"][:][members], minlength=3).tolist()

    (_, _), (stage, rebuilt) = outcomes[0.02]  # 10 relabels > 2% of 200: a rebuild
    assert len(rebuilt.record["inputs"]) == 2 and rebuilt.group.attrs["joined_since_rebuild"] == 0
