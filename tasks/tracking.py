"""MLflow tracking: one parent run per flow run, nested runs per evaluation arm, and one trend
run per schedule (:meth:`Tracker.log_trend`) that carries every run's metrics at its step.

Everything goes through an explicit ``MlflowClient`` and run ids rather than MLflow's
thread-local "active run", because Prefect runs tasks in worker threads. Only the flow's own
tracking process (:class:`Tracker`) logs; dask workers never touch the sqlite database.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
import threading
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from dq_ops.config import DQConfig
from dq_ops.errors import DQInputError
from dq_ops.locks import file_lock
from dq_ops.urls import redact_credentials

MLFLOW_DB_NAME = "mlflow.db"
# MLflow 3's UI opens an experiment by its kind: a training one on its runs table, an untagged one
# in the GenAI view, which shows no runs.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
TREND_TAG = "dq_trend"  # a trend run's schedule key: how each run of the schedule finds it


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
    """A lock beside a sqlite tracking database, held while a run makes what concurrent runs share
    (its first use runs migrations; the experiment; a schedule's trend run); none for servers."""
    if uri.startswith("sqlite:///"):
        return file_lock(uri.removeprefix("sqlite:///") + ".lock")
    return nullcontext()


def _log_metrics(client: Any, run_id: str, metrics: Mapping[str, float], timestamp_ms: int, step: int) -> None:
    from mlflow.entities import Metric

    items = [Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items() if v is not None]
    for start in range(0, len(items), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=items[start:start + 1000])


def _log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, redact_credentials(str(v))[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[start:start + 100])


class _Session:
    """The MLflow client of one flow run, inside the tracking process (:func:`_serve`)."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None):
        import mlflow

        with _setup_lock(uri):  # concurrent runs: one creates (migrates) the database and the experiment
            self.uri, self.client = uri, mlflow.MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                try:
                    self.experiment_id = self.client.create_experiment(
                        experiment, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
                except mlflow.MlflowException as exc:  # a server has no lock: a concurrent run made it first
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    self.experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
            else:
                self.experiment_id = found.experiment_id
                if EXPERIMENT_KIND_TAG not in found.tags:  # made before dq set its kind; a user's choice stays
                    self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        self.run_id, self.run_name, self.start_time = "", "", 0

    def start_run(self, run_name: str, tags: dict[str, str], params: Mapping[str, Any]) -> tuple[str, str]:
        info = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info
        self.run_id, self.run_name, self.start_time = info.run_id, info.run_name, info.start_time
        _log_params(self.client, self.run_id, params)
        return self.experiment_id, self.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        _log_params(self.client, run_id, params)

    def log_metrics(self, metrics: Mapping[str, float], run_id: str, step: int) -> None:
        _log_metrics(self.client, run_id, metrics, int(time.time() * 1000), step)

    def log_trend(self, key: str, name: str, tags: Mapping[str, str], metrics: Mapping[str, float], step: int) -> str:
        """Log ``metrics`` to the trend run ``key`` at ``step``, timed at this run's start (so a
        chart over wall time spaces the points by the runs' dates); returns the trend run's id.

        A metric the trend run already has at ``step`` (a retried run) keeps that point: MLflow
        would add a second one. The trend run names the run of its latest step
        (``dq_latest_run_id``, ``dq_latest_run_name``, a link in its description), this run names
        the trend run (``dq_trend_run_id``), and the trend run ends FINISHED each time."""
        trend = self._trend_run(key, name, tags)
        trend_id = trend.info.run_id
        logged = {k for k in trend.data.metrics.keys() & metrics.keys()
                  if any(point.step == step for point in self.client.get_metric_history(trend_id, k))}
        _log_metrics(self.client, trend_id, {k: v for k, v in metrics.items() if k not in logged}, self.start_time, step)
        if step >= int(trend.data.tags.get("dq_latest_step", -1)):  # a re-logged older step leaves the latest
            link = f"[{self.run_name}](#/experiments/{self.experiment_id}/runs/{self.run_id})"
            self.set_tags(trend_id, {
                "dq_latest_step": str(step), "dq_latest_run_id": self.run_id, "dq_latest_run_name": self.run_name,
                "mlflow.note.content": f"The metrics of every dq run of this schedule, one step per run. Latest: {link}.",
            })
        self.client.set_terminated(trend_id, status="FINISHED")
        self.client.set_tag(self.run_id, "dq_trend_run_id", trend_id)
        return trend_id

    def _trend_run(self, key: str, name: str, tags: Mapping[str, str]) -> Any:
        """The trend run ``key`` (the oldest, should a deployment without locks have made two),
        made when there is none; see :meth:`Tracker.log_trend` for the locks around it."""
        with _setup_lock(self.uri):
            found = self.client.search_runs([self.experiment_id], f"tags.{TREND_TAG} = '{key}'",
                                             order_by=["attributes.start_time ASC"], max_results=1)
            if found:
                return found[0]
            return self.client.create_run(self.experiment_id, run_name=name,
                                          tags={**tags, TREND_TAG: key, "dq_role": "trend"})

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def recent_runs(self, dataset: str, limit: int) -> list[dict[str, Any]]:
        """The latest ``limit`` flow runs of ``dataset`` in this experiment (FINISHED ones and this
        run), newest first: ``{"run_id", "name", "start_time" (ms), "tags", "metrics"}``."""
        found = self.client.search_runs(
            [self.experiment_id], f"tags.dq_role = 'flow' and params.`dataset.name` = '{dataset}'",
            max_results=4 * limit, order_by=["attributes.start_time DESC"])
        runs = [run for run in found if run.info.status == "FINISHED" or run.info.run_id == self.run_id][:limit]
        return [{"run_id": run.info.run_id, "name": run.info.run_name, "start_time": run.info.start_time,
                 "tags": dict(run.data.tags), "metrics": dict(run.data.metrics)} for run in runs]

    def nested_run(self, name: str, params: Mapping[str, Any]) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=name, tags={"mlflow.parentRunId": self.run_id, "dq_role": "arm"}
        )
        _log_params(self.client, run.info.run_id, params)
        return run.info.run_id

    def log_text(self, text: str, artifact_file: str, run_id: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_file(self, path: str, artifact_path: str | None, run_id: str) -> None:
        self.client.log_artifact(run_id, path, artifact_path=artifact_path)

    def finish(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)

    def fail_crashed(self, flow_run_ids: list[str]) -> int:
        """Mark FAILED the RUNNING runs of these (crashed) flow runs, nested runs included; their count."""
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        failed = 0
        for flow_run_id in flow_run_ids:
            parents = self.client.search_runs(
                experiments, f"tags.`prefect.flow_run_id` = '{flow_run_id}' and attributes.status = 'RUNNING'")
            runs = parents + [child for parent in parents for child in self.client.search_runs(
                experiments, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and attributes.status = 'RUNNING'")]
            for run in runs:
                self.client.set_terminated(run.info.run_id, status="FAILED")
            failed += len(runs)
        return failed


def _failure(exc: BaseException) -> tuple[str, str, str]:
    return "error", type(exc).__name__, (str(exc).strip().splitlines() or [""])[0][:300]


def _serve(connection: Connection, uri: str, experiment: str, artifact_location: str | None) -> None:
    """The tracking process: connect to MLflow, then run the flow's calls (the first one starts
    its run) one at a time until it sends ``None`` or goes away; a failed connection is the
    answer to every call."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the flow's: it still ends its run
    session, failed = None, None
    try:
        session = _Session(uri, experiment, artifact_location)
    except Exception as exc:
        failed = _failure(exc)
    try:
        for method, args in iter(connection.recv, None):
            try:
                connection.send(failed or ("ok", getattr(session, method)(*args)))
            except Exception as exc:
                connection.send(_failure(exc))
    except (EOFError, OSError):  # the flow's process is gone
        pass
    os._exit(0)  # every call was answered; the interpreter's teardown would only cost time


class TrackingError(RuntimeError):
    """An MLflow call failed in the tracking process (its type and first line)."""


def _location(config: DQConfig, uri: str) -> str | None:
    """Beside a default sqlite database, artifacts live in the store too (not ./mlruns)."""
    return (_local_root(config) / "mlartifacts").as_uri() if uri == _store_database_uri(config) else None


# Tracking processes started ahead of their flow (:func:`prewarm`), by (uri, experiment, location).
_prewarmed: dict[tuple[str, str, str | None], tuple[multiprocessing.Process, Connection]] = {}


def _spawn(target: tuple[str, str, str | None]) -> tuple[multiprocessing.Process, Connection]:
    context = multiprocessing.get_context("spawn")  # the flow's process has threads: never fork it
    connection, child = context.Pipe()
    process = context.Process(target=_serve, args=(child, *target), name="dq-mlflow", daemon=True)
    process.start()
    child.close()
    return process, connection


def prewarm(config: DQConfig) -> None:
    """Start the tracking process for ``config`` now (it connects while Prefect starts); the
    flow's :class:`Tracker` takes it over. ``dq run`` calls this before importing Prefect."""
    uri = resolve_tracking_uri(config)
    target = (uri, config.tracking.experiment, _location(config, uri))
    _prewarmed.setdefault(target, _spawn(target))


class Tracker:
    """The MLflow side of one flow run, driven from a process of its own.

    MLflow with its sqlite store imports a lot of Python (mlflow, SQLAlchemy, alembic) and
    then talks to its database. In a thread that work holds the flow's GIL against the first
    stages; in a process it runs on another core. The process
    (started here, or earlier by :func:`prewarm`) connects and creates the run while the first
    stages run, then serves the flow's calls one at a time; the first call that needs the run
    waits for it and raises its error, if any. :meth:`close` ends it.
    """

    def __init__(self, config: DQConfig, run_name: str, tags: Mapping[str, str] | None = None):
        self.uri = resolve_tracking_uri(config)
        target = (self.uri, config.tracking.experiment, _location(config, self.uri))
        self._process, self._connection = _prewarmed.pop(target, None) or _spawn(target)
        self._store_url = config.store_url
        self._lock = threading.Lock()  # one call at a time: Prefect runs tasks in threads
        self._ids: tuple[str, str] | None = None
        self._error: tuple[str, str, str] | None = None
        # Sent now, answered when the run is first needed (_connect).
        self._send("start_run", run_name, dict(tags or {}), flatten("", config.model_dump(mode="json")))

    def _send(self, method: str, *args: Any) -> None:
        try:
            self._connection.send((method, args))
        except OSError:
            raise TrackingError("the MLflow process exited") from None

    def _receive(self) -> Any:
        try:
            return self._connection.recv()
        except (EOFError, OSError):
            return "error", "EOFError", "the MLflow process exited"

    def _connect(self) -> tuple[str, str]:
        with self._lock:
            if self._ids is None and self._error is None:
                answer = self._receive()
                if answer[0] == "ok":
                    self._ids = tuple(answer[1])
                else:
                    self._error = answer
        if self._ids is None:
            raise TrackingError(f"{self._error[1]}: {self._error[2]}")
        return self._ids

    def _call(self, method: str, *args: Any) -> Any:
        self._connect()
        with self._lock:
            self._send(method, *args)
            answer = self._receive()
        if answer[0] != "ok":
            raise TrackingError(f"MLflow {method}: {answer[1]}: {answer[2]}")
        return answer[1]

    @property
    def experiment_id(self) -> str:
        return self._connect()[0]

    @property
    def run_id(self) -> str:
        return self._connect()[1]

    def wait(self) -> None:
        """Wait for the connection; called before the expensive stages, so a wrong or unreachable
        tracking URI fails the run early, in one line naming it."""
        try:
            self._connect()
        except TrackingError as error:
            raise DQInputError(
                f"tracking.tracking_uri {redact_credentials(self.uri)}: MLflow is not usable ({error})"
            ) from None

    def connected(self) -> bool:
        """Whether the run exists (waits for the connection; False when it failed)."""
        try:
            self._connect()
        except TrackingError:
            return False
        return True

    @property
    def run_url(self) -> str:
        """Where the run shows up: on the tracking server, or in ``mlflow ui`` on its default port."""
        return self.url_of(self.run_id)

    def url_of(self, run_id: str) -> str:
        """Where a run of this experiment shows up (see :attr:`run_url`)."""
        base = self.uri.rstrip("/") if self.uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
        return f"{base}/#/experiments/{self.experiment_id}/runs/{run_id}"

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        self._call("log_params", run_id, dict(params))

    def log_metrics(self, metrics: Mapping[str, float], run_id: str | None = None, step: int = 0) -> None:
        self._call("log_metrics", dict(metrics), run_id or self.run_id, step)

    def set_tags(self, tags: Mapping[str, str], run_id: str | None = None) -> None:
        self._call("set_tags", run_id or self.run_id, dict(tags))

    def log_trend(self, key: str, name: str, tags: Mapping[str, str], metrics: Mapping[str, float], step: int) -> str:
        """Log ``metrics`` at ``step`` to the long-lived trend run of the schedule ``key`` too (found
        by its tag ``dq_trend``, made as ``name`` with ``tags`` when there is none), so each metric
        reads as one line over the schedule's runs; a step it already has keeps its points. Returns
        the trend run's id.

        Concurrent runs must not make two trend runs. Runs of one schedule share its store (their
        steps come from its history): on a local store they find or make the trend run and log to
        it one at a time under the store's lock, whatever the tracking backend; on a sqlite
        database they find or make it under the lock beside it, whatever the store. With an object
        store and a tracking server, one run of a schedule at a time is up to the deployment, as it
        is for the store's own history (:mod:`dq_ops.locks`)."""
        from dq_ops.store import Store  # zarr and numpy: not at import, which the tracking process shares

        with Store(self._store_url).lock("trend", key):
            return self._call("log_trend", key, name, dict(tags), dict(metrics), step)

    def recent_runs(self, dataset: str, limit: int) -> list[dict[str, Any]]:
        """The latest ``limit`` finished flow runs of ``dataset`` (this one included), newest first."""
        return self._call("recent_runs", dataset, limit)

    def nested_run(self, name: str, params: Mapping[str, Any]) -> str:
        return self._call("nested_run", name, dict(params))

    def log_text(self, text: str, artifact_file: str, run_id: str | None = None) -> None:
        self._call("log_text", text, artifact_file, run_id or self.run_id)

    def log_bytes(self, data: bytes, artifact_file: str, run_id: str | None = None) -> None:
        directory, _, filename = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, filename)
            with open(path, "wb") as fh:
                fh.write(data)
            self.log_file(path, directory or None, run_id)

    def log_file(self, path: str, artifact_path: str | None = None, run_id: str | None = None) -> None:
        """Log a local file (large artifacts are written to disk first, never held in memory)."""
        self._call("log_file", path, artifact_path, run_id or self.run_id)

    def finish(self, run_id: str | None = None, status: str = "FINISHED") -> None:
        self._call("finish", run_id or self.run_id, status)

    def fail_crashed(self, flow_run_ids: list[str]) -> int:
        """Mark FAILED the MLflow runs (nested ones too) that crashed flow runs left RUNNING; their count."""
        return self._call("fail_crashed", list(flow_run_ids))

    def close(self) -> None:
        """End the tracking process (after its last call); idempotent."""
        with self._lock:
            if self._process.is_alive():
                try:
                    self._connection.send(None)
                except OSError:
                    pass
                self._process.join(timeout=30)
            if self._process.is_alive():
                self._process.kill()
            self._connection.close()
