"""The MLflow tracking process of a flow run (tasks.tracking): real MLflow on a real sqlite database."""

from __future__ import annotations

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
