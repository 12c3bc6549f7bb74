"""Telemetry is off before Prefect loads: checked in a fresh Prefect home on a real terminal.

Prefect shows its usage-data notice (and starts its SDK analytics) on ``import prefect`` in an
interactive terminal of a new Prefect home unless ``DO_NOT_TRACK`` is already set. The control
case proves the check can see the notice.
"""

from __future__ import annotations

import sys

from tests.cli_helpers import cli_env, run_in_terminal

NOTICE = "Prefect collects anonymous usage data"
# The switches dq sets, and the variables by which Prefect detects CI (where it stays quiet).
CLEARED = ("DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY", "PREFECT_SERVER_ANALYTICS_ENABLED", "CI", "GITHUB_ACTIONS")


def fresh_env(tmp_path, name):
    env = cli_env(tmp_path, PREFECT_HOME=str(tmp_path / name))
    for variable in CLEARED:
        env.pop(variable, None)
    return env


def test_a_bare_prefect_import_shows_the_notice_in_a_fresh_home(tmp_path):
    status, output = run_in_terminal([sys.executable, "-c", "import prefect"], fresh_env(tmp_path, "bare"), tmp_path)
    assert status == 0
    assert NOTICE in output


def test_flow_and_task_imports_set_the_switches_first(tmp_path):
    for module in ("flows.quantize", "tasks.embeddings"):
        env = fresh_env(tmp_path, module)
        code = f"import {module}, os; print('DO_NOT_TRACK=' + os.environ['DO_NOT_TRACK'])"
        status, output = run_in_terminal([sys.executable, "-c", code], env, tmp_path)
        assert status == 0, output
        assert NOTICE not in output
        assert "DO_NOT_TRACK=true" in output
        assert not (tmp_path / module / ".sdk_telemetry" / "notice_shown").exists()


def test_dq_run_in_a_fresh_prefect_home_prints_no_notice(tmp_path):
    env = fresh_env(tmp_path, "run")
    args = [sys.executable, "-m", "flows.cli", "run", "--store", str(tmp_path / "store"), "--limit", "10"]
    config = tmp_path / "missing-source.yaml"
    config.write_text(f"dataset: {{format: npz, url: {tmp_path / 'absent.npz'}, name: absent}}\n")
    status, output = run_in_terminal([*args, str(config)], env, tmp_path)
    assert NOTICE not in output
    assert status == 2 and "absent.npz" in output.strip().splitlines()[-1]
    assert "Traceback" not in output
