"""Paired evaluation in the real flow: per-seed draws, dq_pixels on reconstructions, gap metrics, bin gallery."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from dq_ops.config import DQConfig
from dq_ops.paired import paired_gap
from dq_ops.store import Store

pytestmark = pytest.mark.slow  # whole `dq run`s: minutes each


def _name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


@pytest.fixture(scope="module")
def paired_run(prefect_harness, tmp_path_factory):
    from flows.quantize import quantize

    config = DQConfig.model_validate({
        "store_url": str(tmp_path_factory.mktemp("paired") / "store"),
        "dataset": {"limit": 300},
        "sampling": {"ratios": [0.2]},
        "bins": {"num_bins": 3},
        "embedding": {"batch_size": 128},
        "cluster": {"kind": "local", "n_workers": 1, "threads_per_worker": 2},
        "patches": {"mae_epochs": 1, "mae_train_samples": 100},
        "evaluation": {"arms": ["dq", "dq_pixels", "random", "kcenter"], "seeds": [0, 1], "epochs": 1, "min_steps": 10},
    })
    state = quantize(config, return_state=True)
    return config, state, state.result()


def test_sampled_arms_draw_per_seed_and_deterministic_ones_once(paired_run):
    config, _, summary = paired_run
    store = Store(config.store_url)
    rows = {row["arm"]: row for row in summary["subsets"][0]["evaluation"]}
    assert set(rows) == {"dq", "dq_pixels", "random", "kcenter"}
    for arm in rows:
        assert rows[arm]["seeds"] == [0, 1] and len(rows[arm]["accuracies"]) == 2
    subsets = {arm: [store.open("subsets", _name(url)) for url in rows[arm]["draws"]] for arm in rows}
    for arm in ("dq", "random"):
        first, second = subsets[arm]
        assert [s.group.attrs["seed"] for s in subsets[arm]] == [0, 1]
        assert all(s.group.attrs["method"] == arm and s.group.attrs["ratio"] == 0.2 for s in subsets[arm])
        assert first.group.attrs["size"] == second.group.attrs["size"]
        assert not np.array_equal(first["indices"][:], second["indices"][:])
    # The published subset is the config seed's DQ draw; k-center selects once and is reused.
    assert rows["dq"]["draws"][0] == summary["subsets"][0]["url"]
    assert rows["kcenter"]["draws"][0] == rows["kcenter"]["draws"][1]
    assert subsets["kcenter"][0].group.attrs["seed"] == config.seed
    assert rows["dq_pixels"]["draws"] == rows["dq"]["draws"]


def test_dq_pixels_trains_on_the_reconstruction_of_its_own_draw(paired_run):
    config, _, summary = paired_run
    store = Store(config.store_url)
    rows = {row["arm"]: row for row in summary["subsets"][0]["evaluation"]}
    by_fingerprint = {r.fingerprint: r for r in (store.open("reconstructions", name) for name in store.list("reconstructions"))}
    for draw_url, evaluation_url in zip(rows["dq_pixels"]["draws"], rows["dq_pixels"]["evaluations"]):
        inputs = store.open("evaluations", _name(evaluation_url)).record["inputs"]
        used = [by_fingerprint[f] for f in inputs if f in by_fingerprint]
        assert len(used) == 1
        reconstruction, draw = used[0], store.open("subsets", _name(draw_url))
        assert reconstruction.group.attrs["subset"] == draw.name
        assert reconstruction["images"].shape[0] == draw.group.attrs["size"]
    for evaluation_url in rows["dq"]["evaluations"]:
        inputs = store.open("evaluations", _name(evaluation_url)).record["inputs"]
        assert not set(inputs) & set(by_fingerprint)


def test_gap_metrics_are_the_paired_interval_of_the_logged_accuracies(paired_run):
    config, state, summary = paired_run
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{config.store_url}/mlflow.db")
    parent = client.get_run(summary["mlflow_run_id"])
    children = {r.info.run_name: r for r in client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}

    def per_seed(arm: str) -> list[float]:
        history = client.get_metric_history(children[f"{arm}@20%"].info.run_id, "test_accuracy")
        return [m.value for m in sorted(history, key=lambda m: m.step)]

    gap = paired_gap(per_seed("dq"), per_seed("random"))
    metrics = parent.data.metrics
    assert metrics["gap_dq_vs_random_r0.2_mean"] == pytest.approx(gap.mean)
    assert metrics["gap_dq_vs_random_r0.2_ci_low"] == pytest.approx(gap.ci_low)
    assert metrics["gap_dq_vs_random_r0.2_ci_high"] == pytest.approx(gap.ci_high)
    assert children["dq_pixels@20%"].data.params["reconstructed_images"] == "True"
    report = open(summary["report_path"]).read()
    assert gap.sentence("dq", "random") in report
    assert "pictures/bin_gallery.png" in report
    assert {f.path for f in client.list_artifacts(parent.info.run_id, "pictures")} >= {"pictures/bin_gallery.png"}


def test_coverage_of_dq_and_random_is_logged_and_the_report_leads_with_the_verdict(paired_run):
    from dq_ops.coverage import subset_coverage

    config, _, summary = paired_run
    store = Store(config.store_url)
    entry = summary["subsets"][0]
    embeddings = store.open("embeddings", _name(summary["embeddings"]["url"]))
    dataset = store.open("datasets", _name(summary["dataset"]["url"]))
    features, labels = embeddings["features"][:], dataset["train/labels"][:]
    rows = {row["arm"]: row for row in entry["evaluation"]}
    metrics = mlflow.MlflowClient(tracking_uri=f"sqlite:///{config.store_url}/mlflow.db").get_run(
        summary["mlflow_run_id"]).data.metrics
    for arm in ("dq", "random"):
        subset = store.open("subsets", _name(rows[arm]["draws"][0]))  # the config seed's draw
        expected = subset_coverage(features, labels, subset["indices"][:])
        assert metrics[f"coverage_mean_{arm}_r0.2"] == pytest.approx(expected.mean, rel=1e-5)
        assert metrics[f"coverage_p95_{arm}_r0.2"] == pytest.approx(expected.p95, rel=1e-5)
        assert entry["coverage"][arm]["coverage_mean"] == pytest.approx(expected.mean, rel=1e-5)
    assert entry["coverage"]["dq"]["bins_touched_min"] >= 1
    gap = paired_gap(rows["dq"]["accuracies"], rows["random"]["accuracies"])
    word = {"ahead": "ahead", "behind": "behind", "indistinguishable": "tie"}[gap.verdict]
    head = open(summary["report_path"]).read().splitlines()[:4]
    assert head[0] == "# Dataset Quantization: fashion-mnist"
    assert head[2].startswith(f"- **20.0%**: DQ − random = {100 * gap.mean:+.2f} points") and f"**{word}**" in head[2]
    assert "Coverage" in head[3]
