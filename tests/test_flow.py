"""The real flow on a small real slice: Prefect server, Zarr on disk, MLflow sqlite, dask LocalCluster."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dq_ops.config import DQConfig
from dq_ops.errors import DQInputError
from dq_ops.readers.idx import load_fashion_mnist
from dq_ops.sampling import bin_intensities, sample_bins
from dq_ops.store import Store
from tests.test_docs import README, python_blocks

pytestmark = pytest.mark.slow  # whole `dq run`s: minutes each


def _config(store_url: str, ratios: list[float]) -> DQConfig:
    return DQConfig.model_validate({
        "store_url": store_url,
        "dataset": {"limit": 500},
        "sampling": {"ratios": ratios},
        "bins": {"num_bins": 5},
        "embedding": {"batch_size": 128},
        "cluster": {"kind": "local", "n_workers": 1, "threads_per_worker": 2},
        "patches": {"mae_epochs": 1, "mae_train_samples": 200},
        "evaluation": {"arms": ["dq", "random"], "epochs": 1, "min_steps": 20},
    })


def _task_states(flow_run_id) -> dict[str, str]:
    """Task-run name → state name of one flow run, from the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run.state.name for run in runs}


def _artifacts(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key or f"{a.type}-{a.id}": a for a in found}


@pytest.fixture(scope="module")
def first_run(prefect_harness, tmp_path_factory):
    from flows.quantize import quantize

    store_url = str(tmp_path_factory.mktemp("flow") / "store")
    config = _config(store_url, [0.1])
    state = quantize(config, return_state=True)
    return config, state


def test_flow_produces_bins_subset_and_tracking(first_run):
    import mlflow

    config, state = first_run
    summary = state.result()
    store = Store(config.store_url)

    bins = store.open("bins", summary["bins"]["url"].rsplit("/", 1)[-1])
    bin_of_sample = bins["bin_of_sample"][:]
    assert bin_of_sample.shape == (500,) and set(np.unique(bin_of_sample)) == set(range(5))
    # Sample ids carried from ingest: the subset's ids are the dataset's ids at its indices.
    subset = store.open("subsets", summary["subsets"][0]["url"].rsplit("/", 1)[-1])
    indices, ids = subset["indices"][:], subset["ids"][:]
    dataset_ids = store.open("datasets", "fashion-mnist")["train/ids"][:]
    assert (dataset_ids[indices] == ids).all()
    # The default draw of an image dataset: round(10% of each class), spread over its bins with
    # the 'budget-aware' weights (a class keeping fewer samples than it has bins: one from each of
    # its first bins; otherwise bin b drawn b+1 times as intensely as bin 0).
    _, labels = load_fashion_mnist("train")
    labels = labels[:500]
    for c in range(10):
        assert (labels[indices] == c).sum() == round(0.1 * (labels == c).sum()), c
    bins_list = [np.flatnonzero(bin_of_sample == b) for b in range(5)]
    weights = bin_intensities("budget-aware", bins_list, labels, ratio=0.1)
    expected = sample_bins(bins_list, labels, 0.1, config.seed, ids=dataset_ids, weights=weights, rounding="per-class")
    assert np.array_equal(indices, expected)
    assert subset.group.attrs["bin_weights"] == "budget-aware"
    assert summary["subsets"][0]["size"] == len(indices)

    artifacts = _artifacts(state.state_details.flow_run_id)
    assert {"dq-report-fashion-mnist", "dq-bin-sizes", "dq-mlflow-run"} <= set(artifacts)
    assert "fashion-mnist" in artifacts["dq-report-fashion-mnist"].data and "50" in artifacts["dq-report-fashion-mnist"].data
    assert any(a.type == "progress" for a in artifacts.values())

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{config.store_url}/mlflow.db")
    experiment = client.get_experiment_by_name("dq")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.dq_role = 'flow'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["bins.num_bins"] == "5"
    assert run.data.metrics["subset_size_r0.1"] == sum(round(0.1 * (labels == c).sum()) for c in range(10))
    assert run.data.metrics["train_samples"] == 500
    assert run.data.metrics["time_bins_s"] > 0
    # Pixel stages: only kept patches are stored, and the bytes are measured, not assumed.
    patches = summary["subsets"][0]["patches"]
    assert patches["patch_keep_ratio"] == 39 / 49  # θ = 0.2 of a 7×7 grid keeps ⌊49·0.8⌋
    assert 0 < patches["stored_bytes"] < patches["whole_image_bytes"]
    assert run.data.metrics["stored_bytes_r0.1"] == patches["stored_bytes"]
    assert run.data.metrics["storage_keep_ratio_r0.1"] == pytest.approx(len(indices) / 500 * 39 / 49)
    reconstruction = store.open("reconstructions", patches["reconstruction_url"].rsplit("/", 1)[-1])
    assert reconstruction["images"].shape == (len(indices), 28, 28, 1)
    # Evaluation: one nested MLflow run per arm; 'dq' trains on the original images (dq_pixels: test_flow_eval.py).
    children = {r.info.run_name: r for r in client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")}
    assert set(children) == {"dq@10%", "random@10%"}
    assert children["dq@10%"].data.params["reconstructed_images"] == "False"
    assert 0.1 <= children["random@10%"].data.metrics["test_accuracy_mean"] <= 1
    artifact_files = {f.path for f in client.list_artifacts(run.info.run_id, "pictures")}
    assert artifact_files == {"pictures/reconstruction_r0.1.png", "pictures/bin_gallery.png"}


def test_second_identical_run_is_served_from_cache(first_run):
    from flows.quantize import quantize

    config, _ = first_run
    state = quantize(config, return_state=True)
    states = _task_states(state.state_details.flow_run_id)
    assert states and set(states.values()) == {"Cached"}, states


def test_new_ratio_reuses_bins(first_run):
    from flows.quantize import quantize

    config, _ = first_run
    state = quantize(_config(config.store_url, [0.1, 0.3]), return_state=True)
    states = _task_states(state.state_details.flow_run_id)
    assert states["bins-5-cosine"] == "Cached" and states["ingest-fashion-mnist"] == "Cached"
    assert states["sample-dq-0.3"] == "Completed" and states["sample-dq-0.1"] == "Cached"
    mae_runs = [state for name, state in states.items() if name.startswith("mae-fashion-mnist-")]  # the snapshot's
    assert mae_runs == ["Cached"]  # the MAE does not depend on the ratio
    assert 140 <= state.result()["subsets"][1]["size"] <= 160  # 30% of 500, up to per-cell rounding


def subset_labels(store: Store, rows: np.ndarray) -> np.ndarray:
    return store.open("datasets", "fashion-mnist")["train/labels"].get_orthogonal_selection((rows,))


def test_export_and_torch_dataset_of_the_subset(first_run, tmp_path):
    from PIL import Image

    from dq_ops.export import export_subset
    from dq_ops.torch_dataset import subset_torch_dataset

    config, state = first_run
    summary = state.result()
    store = Store(config.store_url)
    name = summary["subsets"][0]["name"]
    subset = store.open("subsets", name)
    rows, ids = subset["indices"][:], subset["ids"][:]
    originals = store.open("datasets", "fashion-mnist")["train/images"].get_orthogonal_selection((rows,))

    export_subset(store, name, str(tmp_path / "npz"), "npz")
    with np.load(tmp_path / "npz" / "subset.npz") as npz:
        assert (npz["images"] == originals).all() and (npz["ids"] == ids).all()

    export_subset(store, name, str(tmp_path / "folder"), "image-folder")
    manifest = [json.loads(line) for line in (tmp_path / "folder" / "manifest.jsonl").read_text().splitlines()]
    assert [m["id"] for m in manifest] == list(ids)
    first = np.asarray(Image.open(tmp_path / "folder" / manifest[0]["file"]))
    assert (first == originals[0, ..., 0]).all()

    # A second export into the same folder: refused, or with overwrite the old export is replaced
    # whole (never two formats side by side).
    with pytest.raises(DQInputError, match="not empty"):
        export_subset(store, name, str(tmp_path / "folder"), "npz")
    export_subset(store, name, str(tmp_path / "folder"), "npz", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["manifest.jsonl", "subset.npz"]

    # the README's example of reading a run's results, run against this run
    readme = next(b for b in python_blocks(README) if "subset_torch_dataset" in b)
    namespace: dict = {}
    exec(readme.replace('"./dq-store"', repr(config.store_url)).replace('"b5af329d068b27f2"', repr(name)), namespace)
    images, batch_labels = next(iter(namespace["loader"]))
    assert images.shape[1:] == (1, 28, 28) and set(batch_labels.tolist()) <= set(namespace["labels"].tolist())

    plain = subset_torch_dataset(store, name)
    image, label = plain[0]
    assert image.shape == (1, 28, 28) and label == subset_labels(store, rows)[0]
    assert ((image.numpy()[0] * 255).round().astype(np.uint8) == originals[0, ..., 0]).all()
    mae_name = store.list("models")[0]
    restored = subset_torch_dataset(store, name, mae_name)
    assert len(restored) == len(plain) and restored[0][0].shape == (1, 28, 28)
    reconstruction = store.open("reconstructions", summary["subsets"][0]["patches"]["reconstruction_url"].rsplit("/", 1)[-1])
    assert np.allclose(restored[0][0].numpy()[0] * 255, reconstruction["images"][0][..., 0], atol=0.5)
