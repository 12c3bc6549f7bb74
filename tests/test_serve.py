"""``deployments/serve.py`` against a real Prefect server: the served deployment's runs complete.

Prefect runs a served flow in a child process that receives the flow by cloudpickle, not by
import; a run there once failed parameter validation before any task ran. The test starts a
Prefect server on a free loopback port, serves the flow with ``serve.py`` as an operator does,
triggers a run of the deployment with its served parameters and waits for it to complete.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from dq_ops.readers.idx import FASHION_MNIST_CLASSES, load_fashion_mnist
from tests.cli_helpers import REPO, free_port

DEADLINE_S = 600  # guards against a hung server or run; not a speed check


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


def test_a_served_deployment_runs_to_completion(prefect_server, tmp_path):
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    config = _tiny_config(tmp_path)
    # The runner looks for due runs every second instead of every ten.
    env = prefect_server | {"PREFECT_RUNNER_POLL_FREQUENCY": "1", "DQ_LOG_DIR": str(tmp_path / "logs")}
    log = (tmp_path / "serve.log").open("w")
    served = subprocess.Popen(
        [sys.executable, "deployments/serve.py", str(config), "--name", "served-test", "--cron", "0 3 * * 1"],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        with SyncPrefectClient(prefect_server["PREFECT_API_URL"]) as client:
            deadline = time.monotonic() + DEADLINE_S
            deployment = None
            while deployment is None:
                assert served.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline, "serve.py never registered its deployment"
                try:
                    deployment = client.read_deployment_by_name("dataset-quantization/served-test")
                except Exception:  # not registered yet
                    time.sleep(0.5)
            assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * 1"]
            assert deployment.parameters["config"]["dataset"]["name"] == "served"
            # No parameters: the run takes the served ones, as a scheduled firing does.
            flow_run = client.create_flow_run_from_deployment(deployment.id)
            while not (flow_run.state and flow_run.state.is_final()):
                assert time.monotonic() < deadline, f"run still {flow_run.state.name} after {DEADLINE_S} s"
                time.sleep(1)
                flow_run = client.read_flow_run(flow_run.id)
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        assert flow_run.state.is_completed(), f"{flow_run.state.name}: {flow_run.state.message}"
        assert flow_run.name.startswith("dq-served-")  # the run name read the validated config
        assert {run.state.name for run in task_runs} == {"Completed"}
        assert any(run.name.startswith("sample-dq-") for run in task_runs)
        assert list((tmp_path / "store" / "reports").glob("*.md"))  # the run reached its report
    finally:
        _stop(served)
        log.close()


def test_a_bad_config_stops_serve_in_one_line(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"sampling": {"ratios": [1.5]}}))
    failed = subprocess.run([sys.executable, "deployments/serve.py", str(config)], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env=os.environ | {"PYTHONPATH": str(REPO)})
    assert failed.returncode == 2
    (line,) = failed.stderr.strip().splitlines()
    assert line.startswith(f"error: {config}: invalid config: sampling.ratios:") and "[1.5]" in line
