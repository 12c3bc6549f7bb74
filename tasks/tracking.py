"""MLflow tracking: one parent run per flow run, nested runs per evaluation arm.

Everything goes through an explicit ``MlflowClient`` and run ids rather than MLflow's
thread-local "active run", because Prefect runs tasks in worker threads. Only the flow process
logs (dask workers never touch the sqlite database).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from dq_ops.config import DQConfig
from dq_ops.errors import DQInputError
from dq_ops.locks import file_lock
from dq_ops.urls import redact_credentials

MLFLOW_DB_NAME = "mlflow.db"


def _local_root(config: DQConfig) -> Path:
    """The store's folder when it is local, else the working directory."""
    store = config.store_url
    if "://" not in store or store.startswith("file://"):
        root = Path(store.removeprefix("file://")).resolve()
        root.mkdir(parents=True, exist_ok=True)
        return root
    return Path.cwd()


def resolve_tracking_uri(config: DQConfig) -> str:
    """The configured URI, else ``MLFLOW_TRACKING_URI`` (a worker's server), else a sqlite database
    inside a local store, else ``./mlflow.db``. A server's basic-auth credentials come from
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, which MLflow's client reads itself."""
    return config.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or _store_database_uri(config)


def _store_database_uri(config: DQConfig) -> str:
    return f"sqlite:///{_local_root(config) / MLFLOW_DB_NAME}"


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """``{"bins": {"num_bins": 10}}`` → ``{"bins.num_bins": 10}`` (MLflow params are flat)."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), sub))
        return out
    return {prefix: value}


def _setup_lock(uri: str) -> AbstractContextManager[None]:
    """A lock beside a sqlite tracking database (its first use runs migrations); none for servers."""
    if uri.startswith("sqlite:///"):
        return file_lock(uri.removeprefix("sqlite:///") + ".lock")
    return nullcontext()


def _log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, redact_credentials(str(v))[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[start:start + 100])


class Tracker:
    """The MLflow side of one flow run.

    Connecting (importing MLflow, opening its database, creating the run and logging the
    configuration: about 2 s) happens in a background thread, so it overlaps the first stages;
    the first call that needs the run waits for it and re-raises its error, if any.
    """

    def __init__(self, config: DQConfig, run_name: str, tags: Mapping[str, str] | None = None):
        self.uri = resolve_tracking_uri(config)
        connecting = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dq-mlflow")
        self._connection = connecting.submit(self._connect, config, run_name, dict(tags or {}))
        connecting.shutdown(wait=False)

    def _connect(self, config: DQConfig, run_name: str, tags: dict[str, str]) -> tuple[Any, str, str]:
        import mlflow  # lazily: importing MLflow costs 1-2 s

        with _setup_lock(self.uri):  # concurrent runs: one creates (migrates) the database and the experiment
            client = mlflow.MlflowClient(tracking_uri=self.uri)
            experiment = client.get_experiment_by_name(config.tracking.experiment)
            if experiment is None:
                # Beside a default sqlite database, artifacts live in the store too (not ./mlruns).
                location = (_local_root(config) / "mlartifacts").as_uri() if self.uri == _store_database_uri(config) else None
                experiment_id = client.create_experiment(config.tracking.experiment, artifact_location=location)
            else:
                experiment_id = experiment.experiment_id
        run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        _log_params(client, run_id, flatten("", config.model_dump(mode="json")))
        return client, experiment_id, run_id

    @property
    def client(self) -> Any:
        """The ``mlflow.MlflowClient`` (waits for the connection)."""
        return self._connection.result()[0]

    @property
    def experiment_id(self) -> str:
        return self._connection.result()[1]

    @property
    def run_id(self) -> str:
        return self._connection.result()[2]

    def wait(self) -> None:
        """Wait for the connection; called before the expensive stages, so a wrong or unreachable
        tracking URI fails the run early, in one line naming it."""
        error = self._connection.exception()
        if error is not None:
            detail = (str(error).strip().splitlines() or [""])[0][:300]
            raise DQInputError(
                f"tracking.tracking_uri {redact_credentials(self.uri)}: MLflow is not usable ({type(error).__name__}: {detail})"
            ) from error

    def connected(self) -> bool:
        """Whether the run exists (waits for the connection; False when it failed)."""
        return self._connection.exception() is None

    @property
    def run_url(self) -> str:
        """Where the run shows up: on the tracking server, or in ``mlflow ui`` on its default port."""
        base = self.uri.rstrip("/") if self.uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
        return f"{base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        _log_params(self.client, run_id, params)

    def log_metrics(self, metrics: Mapping[str, float], run_id: str | None = None, step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id or self.run_id, metrics=items[start:start + 1000])

    def nested_run(self, name: str, params: Mapping[str, Any]) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=name, tags={"mlflow.parentRunId": self.run_id, "dq_role": "arm"}
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_text(self, text: str, artifact_file: str, run_id: str | None = None) -> None:
        self.client.log_text(run_id or self.run_id, text, artifact_file)

    def log_bytes(self, data: bytes, artifact_file: str, run_id: str | None = None) -> None:
        directory, _, filename = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, filename)
            with open(path, "wb") as fh:
                fh.write(data)
            self.log_file(path, directory or None, run_id)

    def log_file(self, path: str, artifact_path: str | None = None, run_id: str | None = None) -> None:
        """Log a local file (large artifacts are written to disk first, never held in memory)."""
        self.client.log_artifact(run_id or self.run_id, path, artifact_path=artifact_path)

    def finish(self, run_id: str | None = None, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id or self.run_id, status=status)
