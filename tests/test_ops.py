"""Operating dq for real: Postgres, S3 (moto), the Prefect and MLflow servers with auth, dask and a
process worker as processes on loopback; the deployments of deployments/prefect.yaml; one run.

Everything is checked through the servers' APIs (and Postgres itself), as an operator would.
The stack and the run are session fixtures in tests/ops_fixtures.py, shared with test_browser.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import yaml

from dq_ops.store import Store
from infra import services

pytestmark = pytest.mark.slow


def _artifacts(ops_stack, flow_run_id) -> dict[str, object]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with ops_stack.prefect() as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {artifact.key: artifact for artifact in found if artifact.key}


def _flow_mlflow_run(ops_stack, flow_run_id) -> dict:
    experiment = ops_stack.mlflow("GET", "experiments/get-by-name", params={"experiment_name": "dq"})["experiment"]
    runs = ops_stack.mlflow("POST", "runs/search", json={
        "experiment_ids": [experiment["experiment_id"]],
        "filter": f"tags.`prefect.flow_run_id` = '{flow_run_id}' and tags.dq_role = 'flow'",
    })["runs"]
    assert len(runs) == 1
    return runs[0]


def test_deployment_run_completes_every_stage_on_the_worker(ops_stack, ops_run):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from tasks.bins import generate_bins_task
    from tasks.embeddings import compute_embeddings
    from tasks.evaluation import evaluate_arm
    from tasks.ingest import ingest_dataset
    from tasks.sampling import sample_subset

    run = ops_run.flow_run
    assert run.state.name == "Completed", run.state.message
    assert run.work_pool_name == services.WORK_POOL
    with ops_stack.prefect() as client:
        assert client.read_deployment(run.deployment_id).name == "fashion-mnist-weekly"
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    states = {task_run.task_key: task_run.state.name for task_run in task_runs}
    stages = [ingest_dataset, compute_embeddings, generate_bins_task, sample_subset, evaluate_arm]
    assert {stage.task_key: "Completed" for stage in stages}.items() <= states.items()


def test_report_table_and_link_artifacts(ops_stack, ops_run):
    artifacts = _artifacts(ops_stack, ops_run.flow_run.id)
    report = artifacts["dq-report-fashion-mnist"]
    assert report.type == "markdown"
    assert "Dataset Quantization: fashion-mnist" in report.data and ops_run.config["store_url"] in report.data
    assert artifacts["dq-bin-sizes"].type == "table"
    # A link artifact is stored as markdown: [MLflow run](<url on the tracking server>).
    assert f"]({ops_stack.topology.mlflow_url}/#/experiments/" in artifacts["dq-mlflow-run"].data


def test_mlflow_run_on_the_server_has_metrics_and_artifacts_on_s3(ops_stack, ops_run):
    import s3fs

    run = _flow_mlflow_run(ops_stack, ops_run.flow_run.id)
    assert run["info"]["status"] == "FINISHED"
    metrics = {metric["key"]: metric["value"] for metric in run["data"]["metrics"]}
    assert 0 < metrics["accuracy_dq_r0.1_mean"] <= 1
    assert metrics["train_samples"] == ops_run.config["dataset"]["limit"]

    # The store and the MLflow artifacts are objects in the S3 bucket (credentials from the env file).
    settings = ops_stack.topology.settings
    storage_options = {
        "key": settings["AWS_ACCESS_KEY_ID"], "secret": settings["AWS_SECRET_ACCESS_KEY"],
        "endpoint_url": settings["AWS_ENDPOINT_URL"],
    }
    store = Store(ops_run.config["store_url"], storage_options)
    # the DQ subset, and the random subset of the same sizes whose coverage the run reports
    subsets = {store.open("subsets", name).group.attrs["method"]: store.open("subsets", name) for name in store.list("subsets")}
    assert set(subsets) == {"dq", "random"}
    assert metrics["subset_size_r0.1"] == subsets["dq"]["ids"].shape[0] == subsets["random"]["ids"].shape[0]
    kept = json.loads(store.read_sidecar("subsets", subsets["dq"].name, "coverage.json"))
    assert metrics["coverage_mean_dq_r0.1"] == pytest.approx(kept["coverage_mean"])
    run_artifacts = ops_stack.mlflow("GET", "artifacts/list", params={"run_id": run["info"]["run_id"]})
    assert "report.md" in {f["path"] for f in run_artifacts["files"]}
    bucket_files = s3fs.S3FileSystem(**storage_options).find(f"{settings['DQ_S3_BUCKET']}/mlflow")
    assert any(path.endswith(f"{run['info']['run_id']}/artifacts/report.md") for path in bucket_files)


def test_both_servers_keep_their_state_in_postgres(ops_stack, ops_run):
    import psycopg2

    t = ops_stack.topology
    mlflow_run = _flow_mlflow_run(ops_stack, ops_run.flow_run.id)
    queries = {
        "prefect": ("SELECT state_type FROM flow_run WHERE id = %s", str(ops_run.flow_run.id), "COMPLETED"),
        "mlflow": ("SELECT status FROM runs WHERE run_uuid = %s", mlflow_run["info"]["run_id"], "FINISHED"),
    }
    for database, (query, key, expected) in queries.items():
        with psycopg2.connect(
            host=t.host("postgres"), port=t.ports["postgres"], dbname=database,
            user=t.settings["DQ_POSTGRES_USER"], password=t.settings["DQ_POSTGRES_PASSWORD"],
        ) as connection, connection.cursor() as cursor:
            cursor.execute(query, (key,))
            assert cursor.fetchall() == [(expected,)], database


def test_cron_deployments_have_their_next_runs_scheduled(ops_stack):
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.server.schemas.schedules import CronSchedule

    declared = yaml.safe_load((services.REPO / services.PREFECT_FILE).read_text())["deployments"]
    with ops_stack.prefect() as client:
        for spec in declared:
            deployment = client.read_deployment_by_name(f"dataset-quantization/{spec['name']}")
            scheduled = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["SCHEDULED"]))),
            )
            times = sorted(run.expected_start_time for run in scheduled)
            assert times, spec["name"]
            # Exactly the cron's next dates after the deployment was created.
            cron = CronSchedule(**spec["schedules"][0])
            expected = asyncio.run(cron.get_dates(n=len(times), start=deployment.created))
            assert times == expected, spec["name"]


def test_requests_without_credentials_are_refused(ops_stack):
    t = ops_stack.topology
    prefect_user, _, prefect_password = t.settings["DQ_PREFECT_AUTH"].partition(":")
    prefect = f"{t.prefect_api_url}/flows/filter"
    assert httpx.post(prefect).status_code == 401
    assert httpx.post(prefect, auth=(prefect_user, "wrong")).status_code == 401
    assert httpx.post(prefect, auth=(prefect_user, prefect_password)).status_code == 200

    mlflow = f"{t.mlflow_url}/api/2.0/mlflow/experiments/search"
    params = {"max_results": 1}
    assert httpx.get(mlflow, params=params).status_code == 401
    assert httpx.get(mlflow, params=params, auth=(t.settings["DQ_MLFLOW_USER"], "wrong")).status_code == 401
    assert httpx.get(mlflow, params=params, auth=(t.settings["DQ_MLFLOW_USER"], t.settings["DQ_MLFLOW_PASSWORD"])).status_code == 200


def test_no_secret_in_any_log(ops_stack, ops_run):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with ops_stack.prefect() as client:
        flow_logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[ops_run.flow_run.id])))
    texts = {"flow run": "\n".join(log.message for log in flow_logs)}
    texts |= {log.name: log.read_text(errors="replace") for log in Path(ops_stack.stack.logs).iterdir()}
    assert len(flow_logs) > 5
    for name, text in texts.items():
        for secret in ops_stack.secrets:
            assert secret not in text, name
