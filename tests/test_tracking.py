"""The MLflow tracking process of a flow run (tasks.tracking): real MLflow on a real sqlite database."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import mlflow
import pytest

from dq_ops.config import DQConfig
from dq_ops.errors import DQInputError
from tasks import tracking
from tasks.tracking import Tracker, TrackingError
from tests.cli_helpers import mlflow_server as tracking_server


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
    """Three runs of the same settings, the third on a grown source: the parent runs' headline
    metrics sit at steps 0, 1 and 2, the schedule's one trend run has each as a line over the
    three steps, and the dataset's trend table lists the runs, oldest first."""
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
    grown = DQConfig.model_validate(config.model_dump() | {"dataset": config.dataset.model_dump() | {"limit": 340}})
    summaries = [quantize(config), quantize(config), quantize(grown)]  # the second one served from the cache

    client = mlflow.MlflowClient(tracking_uri=summaries[0]["tracking_uri"])
    headline = ["selection_churn_r0.25", "selection_added_r0.25", "selection_removed_r0.25", "selection_relabeled_r0.25",
                "selection_modified_r0.25", "gap_dq_vs_random_r0.25_mean", "coverage_mean_dq_r0.25",
                "subset_size_r0.25", "train_samples", "embedded_samples"]
    for step, summary in enumerate(summaries):
        for metric in headline:
            assert [m.step for m in client.get_metric_history(summary["mlflow_run_id"], metric)] == [step], metric
    runs = [client.get_run(s["mlflow_run_id"]) for s in summaries]
    assert runs[1].data.metrics["embedded_samples"] == 0  # all served from the cache
    assert runs[2].data.metrics["selection_added_r0.25"] > 0

    # One trend run for the schedule, each metric a line over the runs, the latest run named.
    trend_id = runs[0].data.tags["dq_trend_run_id"]
    assert [run.data.tags["dq_trend_run_id"] for run in runs] == [trend_id] * 3
    trend = client.get_run(trend_id)
    assert trend.info.run_name == "trend · fm.trend" and trend.info.status == "FINISHED"
    assert trend.data.tags["dq_latest_run_id"] == runs[2].info.run_id
    assert client.search_runs([trend.info.experiment_id], f"tags.dq_trend = '{trend.data.tags['dq_trend']}'")[0].info.run_id \
        == trend_id
    assert len(client.search_runs([trend.info.experiment_id], "tags.dq_role = 'trend'")) == 1
    for metric in headline:
        points = [(m.step, m.value) for m in client.get_metric_history(trend_id, metric)]
        assert points == [(step, run.data.metrics[metric]) for step, run in enumerate(runs)], metric

    with get_client(sync_client=True) as prefect:
        tables, trend_links = [prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                                      sort="CREATED_DESC") for key in ("dq-trend-fm-trend", "dq-mlflow-trend")]
    assert trend_links[0].data.endswith(f"/runs/{trend_id})")
    rows = json.loads(tables[0].data)
    gaps = [run.data.metrics["gap_dq_vs_random_r0.25_mean"] for run in runs]
    snapshots = [s["dataset"]["url"].rsplit("/", 1)[-1] for s in summaries]
    assert [row["run"] for row in rows] == [run.info.run_name for run in runs]
    assert [row["snapshot"] for row in rows] == snapshots and snapshots[0] == snapshots[1] != snapshots[2]
    assert [row["samples"] for row in rows] == [300, 300, 340]
    assert [row["embedded"] for row in rows] == [300, 0, 40]
    assert [row["churn @25.0%"] for row in rows] == ["0.00%", "0.00%", f"{runs[2].data.metrics['selection_churn_r0.25']:.2%}"]
    assert [row["DQ − random @25.0%"] for row in rows] == [f"{100 * gap:+.2f}" for gap in gaps]
    assert rows[0]["date"] <= rows[1]["date"] <= rows[2]["date"]

TREND_KEY = "fm-0123456789abcdef"


def _scheduled_run(config: DQConfig, name: str, metrics: dict[str, float], step: int) -> tuple[str, str]:
    """One dq run of the schedule :data:`TREND_KEY`: its parent run's id and the trend run's."""
    tracker = Tracker(config, run_name=name, tags={"dq_role": "flow"})
    try:
        tracker.log_metrics(metrics, step=step)
        trend = tracker.log_trend(TREND_KEY, "trend · fm", {"dq_dataset": "fm"}, metrics, step)
        tracker.finish()
    finally:
        tracker.close()
    return tracker.run_id, trend


def _trend_runs(client: mlflow.MlflowClient, experiment: str) -> list:
    return client.search_runs([experiment], f"tags.dq_trend = '{TREND_KEY}'")


def test_a_schedule_has_one_trend_run_with_a_line_per_metric(tmp_path):
    """Three runs of a schedule log to one trend run, each at its step; re-logging a step (a
    retried run) adds no point and leaves the latest run named; the trend run stays FINISHED."""
    config = _config(tmp_path)
    churns = [0.0, 0.3, 0.1]
    runs = [_scheduled_run(config, f"run-{step}", {"selection_churn_r0.25": churn}, step)
            for step, churn in enumerate(churns)]
    client = mlflow.MlflowClient(tracking_uri=tracking.resolve_tracking_uri(config))
    parents = [client.get_run(parent) for parent, _ in runs]
    (trend,) = _trend_runs(client, parents[0].info.experiment_id)
    assert {trend_id for _, trend_id in runs} == {trend.info.run_id}
    assert [p.data.tags["dq_trend_run_id"] for p in parents] == [trend.info.run_id] * 3
    assert trend.info.run_name == "trend · fm" and trend.info.status == "FINISHED"
    assert trend.data.tags["dq_role"] == "trend" and trend.data.tags["dq_dataset"] == "fm"
    assert trend.data.tags["dq_latest_run_id"] == parents[2].info.run_id
    assert trend.data.tags["dq_latest_run_name"] == "run-2"
    history = client.get_metric_history(trend.info.run_id, "selection_churn_r0.25")
    assert [(m.step, m.value) for m in history] == list(enumerate(churns))
    assert [m.timestamp for m in history] == [p.info.start_time for p in parents]  # the time axis: the runs' dates

    _scheduled_run(config, "retry-1", {"selection_churn_r0.25": 0.9, "train_samples": 300}, 1)
    trend = client.get_run(trend.info.run_id)
    history = client.get_metric_history(trend.info.run_id, "selection_churn_r0.25")
    assert [(m.step, m.value) for m in history] == list(enumerate(churns))
    assert [(m.step, m.value) for m in client.get_metric_history(trend.info.run_id, "train_samples")] == [(1, 300)]
    assert trend.data.tags["dq_latest_run_id"] == parents[2].info.run_id and trend.info.status == "FINISHED"


def _concurrent_first_runs(config: DQConfig, runs: int) -> set[str]:
    """``runs`` connected trackers of one schedule log its first step at once; the trend run ids they got."""
    trackers = [Tracker(config, run_name=f"run-{i}", tags={"dq_role": "flow"}) for i in range(runs)]
    start, trends = threading.Barrier(runs), set()

    def log(tracker: Tracker) -> None:
        start.wait()
        trends.add(tracker.log_trend(TREND_KEY, "trend · fm", {}, {"train_samples": 300}, 0))

    try:
        for tracker in trackers:
            tracker.wait()
        threads = [threading.Thread(target=log, args=(tracker,)) for tracker in trackers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for tracker in trackers:
            tracker.finish()
    finally:
        for tracker in trackers:
            tracker.close()
    return trends


def test_concurrent_runs_of_a_schedule_share_one_trend_run(tmp_path):
    config = _config(tmp_path)
    trends = _concurrent_first_runs(config, 3)
    client = mlflow.MlflowClient(tracking_uri=tracking.resolve_tracking_uri(config))
    (trend,) = _trend_runs(client, client.get_experiment_by_name("dq").experiment_id)
    assert trends == {trend.info.run_id}


@pytest.fixture
def mlflow_server(tmp_path) -> Iterator[str]:
    with tracking_server(tmp_path / "tracking-server") as url:
        yield url


def test_a_trend_run_through_a_tracking_server(tmp_path, mlflow_server):
    """A server has no lock its clients share: runs that start the schedule at once still end up
    with one trend run (the others delete theirs), and later steps join it."""
    config = _config(tmp_path, mlflow_server)
    trends = _concurrent_first_runs(config, 3)
    parent, trend_id = _scheduled_run(config, "run-3", {"train_samples": 320}, 1)
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    (trend,) = _trend_runs(client, client.get_run(parent).info.experiment_id)
    assert trends == {trend_id} == {trend.info.run_id} and trend.info.status == "FINISHED"
    history = client.get_metric_history(trend_id, "train_samples")
    assert [(m.step, m.value) for m in history] == [(0, 300)] * len(history[:-1]) + [(1, 320)]
