"""The MLflow tracking process of a flow run (tasks.tracking): real MLflow on a real sqlite database."""

from __future__ import annotations

import json

import mlflow
import pytest

from dq_ops.config import DQConfig
from dq_ops.errors import DQInputError
from tasks import tracking
from tasks.tracking import Tracker, TrackingError


def _config(tmp_path, uri: str | None = None) -> DQConfig:
    return DQConfig.model_validate({"store_url": str(tmp_path / "store"), "tracking": {"tracking_uri": uri}})


def test_runs_metrics_and_artifacts_are_logged_from_the_tracking_process(tmp_path):
    tracker = Tracker(_config(tmp_path), run_name="parent", tags={"dq_role": "flow"})
    try:
        tracker.wait()
        assert tracker._process.pid is not None and tracker._process.is_alive()
        tracker.log_metrics({"selection_churn": 0.25})
        arm = tracker.nested_run("dq@10%", {"arm": "dq"})
        tracker.log_metrics({"test_accuracy": 0.9}, run_id=arm, step=1)
        tracker.log_bytes(b"\x89PNG fake", "plots/bin_sizes.png")
        tracker.finish(arm)
        tracker.finish()
    finally:
        tracker.close()
    assert not tracker._process.is_alive()
    client = mlflow.MlflowClient(tracking_uri=tracker.uri)
    parent, child = client.get_run(tracker.run_id), client.get_run(arm)
    assert parent.info.status == child.info.status == "FINISHED"
    assert parent.data.metrics["selection_churn"] == 0.25 and parent.data.tags["dq_role"] == "flow"
    assert parent.data.params["store_url"] == str(tmp_path / "store")
    assert child.data.tags["mlflow.parentRunId"] == tracker.run_id and child.data.params["arm"] == "dq"
    assert [a.path for a in client.list_artifacts(tracker.run_id, "plots")] == ["plots/bin_sizes.png"]


def test_a_failed_call_raises_and_the_process_keeps_serving(tmp_path):
    tracker = Tracker(_config(tmp_path), run_name="parent")
    try:
        with pytest.raises(TrackingError, match="MLflow log_metrics"):
            tracker.log_metrics({"x": 1.0}, run_id="no-such-run")
        tracker.finish()
        assert mlflow.MlflowClient(tracking_uri=tracker.uri).get_run(tracker.run_id).info.status == "FINISHED"
    finally:
        tracker.close()
    tracker.close()  # idempotent


def test_a_prewarmed_process_is_taken_over_by_the_flows_tracker(tmp_path):
    config = _config(tmp_path)
    tracking.prewarm(config)
    prewarmed = next(iter(tracking._prewarmed.values()))[0]
    tracker = Tracker(config, run_name="parent")
    try:
        assert tracker._process is prewarmed and not tracking._prewarmed
        tracker.finish()
    finally:
        tracker.close()


def test_an_unusable_tracking_uri_fails_in_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the tracking process inherits it
    tracker = Tracker(_config(tmp_path, "http://127.0.0.1:9"), run_name="parent")  # port 9: refused
    try:
        with pytest.raises(DQInputError, match=r"^tracking.tracking_uri http://127.0.0.1:9: MLflow is not usable"):
            tracker.wait()
        assert not tracker.connected()
        with pytest.raises(TrackingError):
            tracker.finish()
    finally:
        tracker.close()


def _one_run(config: DQConfig) -> Tracker:
    tracker = Tracker(config, run_name="run")
    try:
        tracker.finish()
    finally:
        tracker.close()
    return tracker


def test_the_experiment_is_made_for_model_training_so_the_ui_opens_on_its_runs(tmp_path):
    config = _config(tmp_path)
    client = mlflow.MlflowClient(tracking_uri=tracking.resolve_tracking_uri(config))
    experiment = _one_run(config).experiment_id
    assert client.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"
    # An experiment made before dq set its kind gets it ...
    client.delete_experiment_tag(experiment, "mlflow.experimentKind")
    _one_run(config)
    assert client.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"
    # ... and a kind someone chose stays.
    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    _one_run(DQConfig.model_validate(config.model_dump() | {"tracking": {"experiment": "chosen"}}))
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_a_schedule_reads_as_lines_over_time(prefect_harness, tmp_path):
    """Two runs of the same settings: the parent runs' headline metrics sit at steps 0 and 1, and
    the dataset's trend table lists both runs, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.quantize import quantize

    config = DQConfig.model_validate({
        "store_url": str(tmp_path / "store"),
        "dataset": {"limit": 300, "name": "fm.trend"},
        "bins": {"num_bins": 4},
        "sampling": {"ratios": [0.25]},
        "embedding": {"batch_size": 64},
        "patches": {"enabled": False},
        "evaluation": {"arms": ["dq", "random"], "epochs": 1, "min_steps": 5},
        "cluster": {"kind": "local", "n_workers": 1, "threads_per_worker": 2},
    })
    first, second = quantize(config), quantize(config)  # the second one served from the cache

    client = mlflow.MlflowClient(tracking_uri=first["tracking_uri"])
    headline = ["selection_churn_r0.25", "selection_added_r0.25", "selection_removed_r0.25", "selection_relabeled_r0.25",
                "selection_modified_r0.25", "gap_dq_vs_random_r0.25_mean", "coverage_mean_dq_r0.25",
                "subset_size_r0.25", "train_samples", "embedded_samples"]
    for step, summary in enumerate((first, second)):
        for metric in headline:
            assert [m.step for m in client.get_metric_history(summary["mlflow_run_id"], metric)] == [step], metric
    assert client.get_run(second["mlflow_run_id"]).data.metrics["embedded_samples"] == 0  # all served from the cache

    with get_client(sync_client=True) as prefect:
        tables = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["dq-trend-fm-trend"])),
                                        sort="CREATED_DESC")
    rows = json.loads(tables[0].data)
    runs = [client.get_run(s["mlflow_run_id"]) for s in (first, second)]
    gaps = [run.data.metrics["gap_dq_vs_random_r0.25_mean"] for run in runs]
    snapshot = first["dataset"]["url"].rsplit("/", 1)[-1]
    assert [row["run"] for row in rows] == [run.info.run_name for run in runs]
    assert [row["snapshot"] for row in rows] == [snapshot, snapshot]
    assert [row["samples"] for row in rows] == [300, 300]
    assert [row["embedded"] for row in rows] == [300, 0]
    assert [row["churn @25.0%"] for row in rows] == ["0.00%", "0.00%"]
    assert [row["DQ − random @25.0%"] for row in rows] == [f"{100 * gap:+.2f}" for gap in gaps]
    assert rows[0]["date"] <= rows[1]["date"]
