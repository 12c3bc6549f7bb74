"""What a person sees: headless Chromium logs in to both UIs and reads the finished deployment run.

Shares the stack and the run of tests/test_ops.py (session fixtures in tests/ops_fixtures.py).
Screenshots go to a temporary folder; with ``DQ_UPDATE_SCREENSHOTS=1`` to docs/, where the
README's "Operate it" section shows them (so a plain test run leaves the work tree clean).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

VIEWPORT = {"width": 1400, "height": 1000}


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    if os.environ.get("DQ_UPDATE_SCREENSHOTS") == "1":
        return Path(__file__).resolve().parent.parent / "docs"
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        yield browser
        browser.close()


def test_prefect_ui_shows_the_run_its_stages_and_the_report(chromium, screenshots, ops_stack, ops_run):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    run = ops_run.flow_run
    with ops_stack.prefect() as client:
        stages = [t.name for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))]
        (report,) = [a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))) if a.key == "dq-report-fashion-mnist"]
    page = chromium.new_page(viewport=VIEWPORT)
    page.goto(ops_stack.prefect_ui)
    # The server's auth is on: the UI asks for the user:password string first.
    page.get_by_placeholder("admin:pass").fill(ops_stack.topology.settings["DQ_PREFECT_AUTH"])
    page.get_by_role("button", name="Login").click()
    page.get_by_text("Dashboard").first.wait_for()

    page.goto(f"{ops_stack.prefect_ui}/runs/flow-run/{run.id}")
    page.get_by_text(stages[-1]).last.wait_for()
    page.wait_for_load_state("networkidle")
    text = page.inner_text("body")
    assert run.name in text and "Completed" in text and "fashion-mnist-weekly" in text
    assert all(stage in text for stage in stages), stages
    page.screenshot(path=screenshots / "prefect-flow-run.png")

    page.goto(f"{ops_stack.prefect_ui}/artifacts/artifact/{report.id}")
    page.get_by_text("Dataset Quantization: fashion-mnist").wait_for()
    text = page.inner_text("body")
    assert "Evaluation (test accuracy" in text and ops_run.config["store_url"] in text
    page.screenshot(path=screenshots / "prefect-report.png", full_page=True)
    page.close()


def test_mlflow_ui_shows_the_run_and_its_accuracy(chromium, screenshots, ops_stack, ops_run):
    settings = ops_stack.topology.settings
    experiment = ops_stack.mlflow("GET", "experiments/get-by-name", params={"experiment_name": "dq"})["experiment"]
    (mlflow_run,) = ops_stack.mlflow("POST", "runs/search", json={
        "experiment_ids": [experiment["experiment_id"]],
        "filter": f"tags.`prefect.flow_run_id` = '{ops_run.flow_run.id}' and tags.dq_role = 'flow'",
    })["runs"]
    accuracy = next(m["value"] for m in mlflow_run["data"]["metrics"] if m["key"] == "accuracy_dq_r0.1_mean")
    # MLflow's basic auth is HTTP basic auth: the browser answers the challenge with these credentials.
    context = chromium.new_context(
        viewport=VIEWPORT, http_credentials={"username": settings["DQ_MLFLOW_USER"], "password": settings["DQ_MLFLOW_PASSWORD"]},
    )
    page = context.new_page()
    page.goto(f"{ops_stack.topology.mlflow_url}/#/experiments/{experiment['experiment_id']}/runs/{mlflow_run['info']['run_id']}")
    page.get_by_text("accuracy_dq_r0.1_mean").first.wait_for(timeout=120_000)  # the run page renders slowly on a loaded machine
    assistant = page.get_by_role("button", name="Close")  # MLflow opens its assistant panel on a first visit
    if assistant.count():
        assistant.first.click()
    text = page.inner_text("body")
    assert mlflow_run["info"]["run_name"] in text and "Finished" in text
    assert repr(accuracy) in text or f"{accuracy:g}" in text  # JavaScript prints 1.0 as "1"
    page.screenshot(path=screenshots / "mlflow-run.png")
    context.close()
