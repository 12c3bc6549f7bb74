"""``deployments/serve.py`` against a real Prefect server: the served deployment's runs complete.

Prefect runs a served flow in a child process that receives the flow by cloudpickle, not by
import; a run there once failed parameter validation before any task ran. The test starts a
Prefect server on a free loopback port, serves the flow with ``serve.py`` as an operator does,
triggers a run of the deployment with its served parameters and waits for it to complete.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.responses import DeploymentResponse as Deployment
from prefect.exceptions import ObjectNotFound

from dq_ops.readers.idx import FASHION_MNIST_CLASSES, load_fashion_mnist
from dq_ops.selection import CATEGORIES, position, selection_history
from dq_ops.store import Store
from tests.cli_helpers import REPO, free_port

DEADLINE_S = 600  # for each run (and for serve.py to register): guards against a hang, not a speed check


def _wait_healthy(api_url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the Prefect server exited with status {server.returncode}"
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"no healthy Prefect server at {api_url} after 180 s")


def _stop(process: subprocess.Popen) -> None:
    """End a process started in its own session, and its children (the server's uvicorn)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A real Prefect server (SQLite under a temporary PREFECT_HOME) on a free loopback port;
    yields the environment that points a process at it."""
    home, port = tmp_path_factory.mktemp("prefect-home"), free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if k not in ("DQ_PREFECT_SERVER", "PREFECT_API_URL")}
    env |= {"PREFECT_HOME": str(home), "PYTHONPATH": str(REPO)}
    log = (home / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_healthy(api_url, server)
        yield env | {"PREFECT_API_URL": api_url}
    finally:
        _stop(server)
        log.close()


def _tiny_config(folder: Path) -> Path:
    """120 real Fashion-MNIST images as an .npz, pixel stages and evaluation off: a run of seconds."""
    images, labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    source = folder / "source.npz"
    np.savez(source, x_train=images[:120], y_train=labels[:120], x_test=test_images[:40], y_test=test_labels[:40],
             class_names=np.array(FASHION_MNIST_CLASSES))
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump({
        "store_url": str(folder / "store"),
        "dataset": {"format": "npz", "url": str(source), "name": "served"},
        "bins": {"num_bins": 2},
        "sampling": {"ratios": [0.25]},
        "embedding": {"batch_size": 64},
        "patches": {"enabled": False},
        "evaluation": {"enabled": False},
        "cluster": {"kind": "local", "n_workers": 1, "threads_per_worker": 1},
    }))
    return config


@contextmanager
def _serving(config: Path, name: str, env: dict[str, str], folder: Path) -> Iterator[subprocess.Popen]:
    """``python deployments/serve.py CONFIG --name NAME`` as an operator starts it, stopped at the end."""
    # The runner looks for due runs every second instead of every ten.
    env = env | {"PREFECT_RUNNER_POLL_FREQUENCY": "1", "DQ_LOG_DIR": str(folder / "logs")}
    with (folder / f"serve-{name}.log").open("w") as log:
        served = subprocess.Popen(
            [sys.executable, "deployments/serve.py", str(config), "--name", name, "--cron", "0 3 * * 1"],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            yield served
        finally:
            _stop(served)


def _served_deployment(client: SyncPrefectClient, name: str, served: subprocess.Popen, log: Path) -> Deployment:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        assert served.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "serve.py never registered its deployment"
        try:
            return client.read_deployment_by_name(f"dataset-quantization/{name}")
        except ObjectNotFound:  # not registered yet
            time.sleep(0.5)


def _run_served(client: SyncPrefectClient, deployment: Deployment, log: Path) -> tuple[FlowRun, dict[str, str]]:
    """A run of the deployment with no parameters (it takes the served ones, as a scheduled firing
    does), waited for to its final state; the run and its task runs' states by name. ``log``: the
    serving process's output (where a crashed run's traceback is)."""
    flow_run = client.create_flow_run_from_deployment(deployment.id)
    deadline = time.monotonic() + DEADLINE_S
    while not (flow_run.state and flow_run.state.is_final()):
        assert time.monotonic() < deadline, f"run still {flow_run.state.name} after {DEADLINE_S} s"
        time.sleep(1)
        flow_run = client.read_flow_run(flow_run.id)
    task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    assert flow_run.state.is_completed(), f"{flow_run.state.name}: {flow_run.state.message}\n{log.read_text()[-5000:]}"
    return flow_run, {run.name: run.state.name for run in task_runs}


@pytest.mark.slow
def test_a_served_deployment_runs_to_completion(prefect_server, tmp_path):
    config = _tiny_config(tmp_path)
    with _serving(config, "served-test", prefect_server, tmp_path) as served, \
            SyncPrefectClient(prefect_server["PREFECT_API_URL"]) as client:
        log = tmp_path / "serve-served-test.log"
        deployment = _served_deployment(client, "served-test", served, log)
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * 1"]
        assert deployment.parameters["config"]["dataset"]["name"] == "served"
        flow_run, task_states = _run_served(client, deployment, log)
    assert flow_run.name.startswith("dq-served-")  # the run name read the validated config
    assert set(task_states.values()) == {"Completed"}
    assert any(name.startswith("sample-dq-") for name in task_states)
    assert list((tmp_path / "store" / "reports").glob("*.md"))  # the run reached its report


# The schedule's source over four versions (rows of Fashion-MNIST's training split, named fm-<row>):
# v1 the first rows; v2 some removed, some added, some changed in place; v3 unchanged; v4 some relabelled.
V1_ROWS = np.arange(300)
V2_REMOVED, V2_ADDED, V2_MODIFIED = np.arange(0, 300, 50), np.arange(300, 312), np.arange(5, 300, 40)
V2_ROWS = np.concatenate([np.setdiff1d(V1_ROWS, V2_REMOVED), V2_ADDED])
V4_RELABELED = np.arange(7, 300, 40)
ALL = 1.0  # the keep ratio that selects every sample: each category's ids are known exactly


def _write_source(path: Path, rows: np.ndarray, modified: np.ndarray, relabeled: np.ndarray) -> None:
    """Fashion-MNIST ``rows`` named ``fm-<row>`` (a name survives other rows leaving), written over
    ``path`` as the source's owner updates it; ``modified`` rows get inverted pixels (same name,
    new content), ``relabeled`` rows the next class."""
    images, labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    images, labels = images.copy(), labels.copy()
    images[modified] = 255 - images[modified]
    labels[relabeled] = (labels[relabeled] + 1) % len(FASHION_MNIST_CLASSES)
    np.savez(path, x_train=images[rows], y_train=labels[rows], ids_train=np.array([f"fm-{r}" for r in rows]),
             x_test=test_images[:40], y_test=test_labels[:40], class_names=np.array(FASHION_MNIST_CLASSES))


def _names(rows: np.ndarray) -> set[str]:
    return {f"fm-{r}" for r in rows}


@pytest.mark.slow
def test_a_served_schedule_explains_every_version_of_a_changing_source(prefect_server, tmp_path):
    """The four-version schedule through ``serve.py``: each version of the source (rewritten in
    place, as its owner updates it) is quantized by a run of the served deployment; the store keeps
    each change's id lists and every run's history entry, the reports say what changed since the
    previous run, MLflow has each run's per-ratio counts at a step per run and the schedule's trend
    run has them as lines, and the last run's Prefect trend table lists them all."""
    import mlflow

    source = tmp_path / "source.npz"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "store_url": str(tmp_path / "store"),
        "dataset": {"format": "npz", "url": str(source), "name": "changing"},
        "bins": {"num_bins": 2},
        "sampling": {"ratios": [0.25, ALL]},
        "embedding": {"batch_size": 64},
        "patches": {"enabled": False},
        "evaluation": {"enabled": False},
        "cluster": {"kind": "local", "n_workers": 1, "threads_per_worker": 1},
    }))
    none = np.array([], dtype=int)
    versions = [  # (rows, modified in place, relabelled) of v1..v4
        (V1_ROWS, none, none), (V2_ROWS, V2_MODIFIED, none), None, (V2_ROWS, V2_MODIFIED, V4_RELABELED),
    ]
    runs: list[FlowRun] = []
    states: list[dict[str, str]] = []
    with _serving(config, "schedule", prefect_server, tmp_path) as served, \
            SyncPrefectClient(prefect_server["PREFECT_API_URL"]) as client:
        log = tmp_path / "serve-schedule.log"
        deployment = _served_deployment(client, "schedule", served, log)
        for version in versions:
            if version is not None:  # v3: the source is left as it is
                _write_source(source, *version)
            flow_run, task_states = _run_served(client, deployment, log)
            runs.append(flow_run)
            states.append(task_states)
    assert set(states[2].values()) == {"Cached"}, states[2]  # v3 changed nothing: served from the cache

    # The kept history: one entry per run, per keep ratio, naming each run's snapshot.
    store = Store(str(tmp_path / "store"))
    keys = [path.rsplit("/", 1)[-1].removesuffix(".json") for path in store.fs.ls(f"{store.url}/refs/subsets")]
    histories = {key: selection_history(store, key) for key in keys}
    assert len(histories) == 2
    (all_key,) = [k for k, h in histories.items() if store.open("subsets", h[-1]["subset"])["ids"].shape[0] == len(V2_ROWS)]
    history = histories[all_key]
    for entries in histories.values():
        assert [e["run"] for e in entries] == [run.name for run in runs]
        assert entries[2]["status"] == "no change" and entries[2]["snapshot"] == entries[1]["snapshot"]
    assert [e["status"] for e in history] == ["first run", "changed", "no change", "changed"]
    assert len({e["snapshot"] for e in history}) == 3  # v1, v2 (= v3), v4

    # Every category's ids in the diff files (at 100% every sample is selected).
    def diff_of(entry: dict) -> dict:
        return json.loads(store.fs.cat_file(f"{store.url}/subsets/{entry['subset']}/{entry['diff']}"))

    first_ids = {str(i) for i in store.open("subsets", history[0]["subset"])["ids"][:]}
    v2, v4 = diff_of(history[1]), diff_of(history[3])
    assert {position(i) for i in v2["added"]} == _names(V2_ADDED)
    assert {position(i) for i in v2["removed"]} == _names(V2_REMOVED)
    assert {position(i) for i in v2["modified"]} == _names(V2_MODIFIED) and not first_ids & set(v2["modified"])
    assert v2["relabeled"] == []
    assert {position(i) for i in v4["relabeled"]} == _names(V4_RELABELED)
    assert v4["added"] == v4["removed"] == v4["modified"] == []
    assert history[2]["diff"] is None and store.fs.exists(f"{store.url}/subsets/{history[1]['subset']}/{history[1]['diff']}")
    counts = [{c: e[c] for c in ("added", "removed", "relabeled", "modified")} for e in history]
    assert counts[1] == {"added": len(V2_ADDED), "removed": len(V2_REMOVED), "relabeled": 0, "modified": len(V2_MODIFIED)}
    assert counts[2] == dict.fromkeys(counts[2], 0)
    assert counts[3] == {"added": 0, "removed": 0, "relabeled": len(V4_RELABELED), "modified": 0}

    # Each run's report: "Since the previous run".
    reports = [(tmp_path / "store" / "reports" / f"{run.name}.md").read_text() for run in runs]
    assert "## Since the previous run\n\nThis is the first run of these settings" in reports[0]
    assert f"- Previous run: `{runs[0].name}` at " in reports[1]
    assert f"- Samples embedded this run: {len(V2_ADDED) + len(V2_MODIFIED)}" in reports[1]
    assert (f"| 100.0% | changed | {len(V2_ADDED)} | {len(V2_REMOVED)} | 0 | {len(V2_MODIFIED)} | "
            f"{len(V2_REMOVED) / len(V1_ROWS):.2%} |") in reports[1]
    assert f"- Previous run: `{runs[1].name}` at " in reports[2] and "(the same snapshot as this run)" in reports[2]
    assert "- Samples embedded this run: 0" in reports[2]
    assert (f"| 100.0% | no change; last change at {history[1]['at']} (run `{runs[1].name}`): +{len(V2_ADDED)} "
            f"−{len(V2_REMOVED)}, 0 relabelled, {len(V2_MODIFIED)} modified |") in reports[2]
    assert "- Samples embedded this run: 0" in reports[3]  # a relabel keeps its embedding
    assert f"| 100.0% | changed | 0 | 0 | {len(V4_RELABELED)} | 0 | 0.00% |" in reports[3]

    # MLflow: each run's per-ratio counts.
    tracking = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    experiment = tracking.get_experiment_by_name("dq").experiment_id
    metrics, run_ids, churns = [], [], []
    for run in runs:
        (tracked,) = tracking.search_runs([experiment], f"tags.`prefect.flow_run_id` = '{run.id}'")
        assert tracked.info.status == "FINISHED"
        metrics.append({c: tracked.data.metrics[f"selection_{c}_r{ALL}"] for c in (*CATEGORIES, "churn")})
        run_ids.append(tracked.info.run_id)
        churns.append(tracked.data.metrics["selection_churn_r0.25"])
        assert "selection_churn_r0.25" in tracked.data.metrics and "selection_churn" not in tracked.data.metrics
    assert [{c: m[c] for c in CATEGORIES} for m in metrics] == [
        dict.fromkeys(CATEGORIES, 0), counts[1], counts[2], counts[3]]
    assert [m["churn"] for m in metrics] == [0, len(V2_REMOVED) / len(V1_ROWS), 0, 0]

    # The trend: in MLflow a step per run of these settings (the charts draw lines over the
    # schedule), the experiment opening on its runs; in Prefect the last runs in one table.
    steps = [[m.step for m in tracking.get_metric_history(run_id, f"selection_churn_r{ALL}")] for run_id in run_ids]
    assert steps == [[0], [1], [2], [3]]
    # ... and one trend run for the schedule (both keep ratios), each metric one line over the runs.
    (trend,) = tracking.search_runs([experiment], "tags.dq_role = 'trend'")
    assert trend.info.status == "FINISHED" and trend.data.tags["dq_latest_run_id"] == run_ids[-1]
    assert {tracking.get_run(run_id).data.tags["dq_trend_run_id"] for run_id in run_ids} == {trend.info.run_id}

    def line(metric: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in tracking.get_metric_history(trend.info.run_id, metric)]

    for category in (*CATEGORIES, "churn"):
        assert line(f"selection_{category}_r{ALL}") == list(enumerate(m[category] for m in metrics)), category
    assert line("selection_churn_r0.25") == list(enumerate(churns))
    assert tracking.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"
    with SyncPrefectClient(prefect_server["PREFECT_API_URL"]) as client:
        (trend,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[runs[-1].id]), key=ArtifactFilterKey(any_=["dq-trend-changing"])))
    rows = json.loads(trend.data)
    assert [row["run"] for row in rows] == [run.name for run in runs]  # oldest first
    assert [row["snapshot"] for row in rows] == [entry["snapshot"] for entry in history]
    assert [row["samples"] for row in rows] == [len(V1_ROWS), len(V2_ROWS), len(V2_ROWS), len(V2_ROWS)]
    assert [row["embedded"] for row in rows] == [len(V1_ROWS), len(V2_ADDED) + len(V2_MODIFIED), 0, 0]
    assert [row["churn @100.0%"] for row in rows] == ["0.00%", f"{len(V2_REMOVED) / len(V1_ROWS):.2%}", "0.00%", "0.00%"]
    assert {row["DQ − random @100.0%"] for row in rows} == {"—"}  # evaluation is off


def test_a_bad_config_stops_serve_in_one_line(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"sampling": {"ratios": [1.5]}}))
    failed = subprocess.run([sys.executable, "deployments/serve.py", str(config)], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env=os.environ | {"PYTHONPATH": str(REPO)})
    assert failed.returncode == 2
    (line,) = failed.stderr.strip().splitlines()
    assert line.startswith(f"error: {config}: invalid config: sampling.ratios:") and "[1.5]" in line
