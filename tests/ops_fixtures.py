"""The dq stack as real processes on loopback, shared by tests/test_ops.py and tests/test_browser.py.

``ops_stack`` starts Postgres, moto's S3 server, the Prefect server, the MLflow server, a dask
scheduler and worker and a Prefect process worker exactly as ``python -m infra.services up`` does
(free ports, fresh secrets written to an env file), and deploys ``deployments/prefect.yaml``.
``ops_run`` triggers one small run of the weekly Fashion-MNIST deployment and waits for it.
Both are session-scoped so the servers start once; leaving the session stops every process.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from infra import services

DEPLOYMENT = "dataset-quantization/fashion-mnist-weekly"
BUCKET = "dq-ops"
# A few thousand real samples, one evaluation arm with a few dozen steps, no pixel stages: about a minute.
SMALL_RUN = {
    "dataset": {"limit": 2000},
    "bins": {"num_bins": 5},
    "sampling": {"ratios": [0.1]},
    "embedding": {"batch_size": 128},
    "patches": {"enabled": False},
    "evaluation": {"arms": ["dq"], "epochs": 1, "min_steps": 20, "max_steps": 40},
}


def _free_ports() -> dict[str, int]:
    sockets = []
    for _ in services.PORTS:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
    ports = {name: sock.getsockname()[1] for name, sock in zip(services.PORTS, sockets)}
    for sock in sockets:
        sock.close()
    return ports


def _write_env_file(path, ports: dict[str, int]) -> None:
    """Fresh secrets for this session, in the same format as infra/dq.env."""
    values = {
        "DQ_POSTGRES_USER": "dq", "DQ_POSTGRES_PASSWORD": secrets.token_urlsafe(16),
        "DQ_PREFECT_AUTH": f"admin:{secrets.token_urlsafe(16)}",
        "DQ_MLFLOW_USER": "admin", "DQ_MLFLOW_PASSWORD": secrets.token_urlsafe(16),
        "DQ_MLFLOW_SECRET_KEY": secrets.token_hex(32), "DQ_S3_BUCKET": BUCKET,
        "AWS_ACCESS_KEY_ID": f"dq{secrets.token_hex(8)}", "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(24),
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}",
    }
    path.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    path.chmod(0o600)


@dataclass
class OpsStack:
    stack: services.LocalStack

    @property
    def topology(self) -> services.Topology:
        return self.stack.t

    @property
    def prefect_ui(self) -> str:
        return self.topology.prefect_api_url.removesuffix("/api")

    def prefect(self):
        """A Prefect client with the stack's credentials (no global settings touched)."""
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.topology.prefect_api_url, auth_string=self.topology.settings["DQ_PREFECT_AUTH"])

    def mlflow(self, method: str, endpoint: str, **kwargs: Any) -> dict[str, Any]:
        """One MLflow REST call as the basic-auth user flows log as."""
        settings = self.topology.settings
        response = httpx.request(
            method, f"{self.topology.mlflow_url}/api/2.0/mlflow/{endpoint}",
            auth=(settings["DQ_MLFLOW_USER"], settings["DQ_MLFLOW_PASSWORD"]), timeout=30, **kwargs,
        )
        response.raise_for_status()
        return response.json()

    @property
    def secrets(self) -> list[str]:
        s = self.topology.settings
        return [s["DQ_POSTGRES_PASSWORD"], s["DQ_PREFECT_AUTH"].partition(":")[2], s["DQ_MLFLOW_PASSWORD"],
                s["DQ_MLFLOW_SECRET_KEY"], s["AWS_SECRET_ACCESS_KEY"]]


@pytest.fixture(scope="session")
def ops_stack(tmp_path_factory) -> Iterator[OpsStack]:
    state = tmp_path_factory.mktemp("ops")
    ports = _free_ports()
    _write_env_file(state / "dq.env", ports)
    topology = services.Topology(services.read_env_file(state / "dq.env"), ports=ports)
    with services.LocalStack(topology, state) as stack:
        for command in services.deploy_commands():
            stack.run(command)
        yield OpsStack(stack)


@dataclass
class OpsRun:
    flow_run: Any  # prefect.client.schemas.objects.FlowRun, final state
    config: dict[str, Any]


@pytest.fixture(scope="session")
def ops_run(ops_stack: OpsStack) -> OpsRun:
    """One run of the weekly deployment on S3 and the dask scheduler, triggered as an operator would."""
    config = SMALL_RUN | {
        "store_url": f"s3://{BUCKET}/store",
        "cluster": {"kind": "address", "address": ops_stack.topology.dask_address},
    }
    with ops_stack.prefect() as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        flow_run = client.create_flow_run_from_deployment(deployment.id, parameters={"config": config})
        deadline = time.monotonic() + 600  # a guard against a hung run, not a speed check
        while not (flow_run.state and flow_run.state.is_final()) and time.monotonic() < deadline:
            time.sleep(2)
            flow_run = client.read_flow_run(flow_run.id)
    return OpsRun(flow_run, config)
