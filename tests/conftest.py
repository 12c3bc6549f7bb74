"""Shared fixtures. Tests run offline against real files, real Zarr stores and a real Prefect server."""

from __future__ import annotations

import os
import tempfile

import pytest

# Before anything imports Prefect/MLflow: no telemetry, no hub downloads, a patient cold start.
os.environ.update({
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    # `dq run` subprocesses in tests use a temporary Prefect server: none is left running.
    "DQ_PREFECT_SERVER": "ephemeral",
})
# CLI subprocesses write their logs here, not into the user's ~/.cache/dq/logs.
os.environ.setdefault("DQ_LOG_DIR", tempfile.mkdtemp(prefix="dq-test-logs-"))


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect server (SQLite) for the whole session; results stored in a temp folder."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    with prefect_test_harness(server_startup_timeout=180), temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
        yield


# The production-like stack (servers on loopback, one deployment run), shared by test_ops and test_browser.
from ops_fixtures import ops_run, ops_stack  # noqa: E402, F401
