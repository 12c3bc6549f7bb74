"""What ``dq run`` shows while it works, in a real pseudo-terminal and through plain pipes.

One light run (600 real Fashion-MNIST images, embeddings in 6 chunks of 100 rows on one dask
worker, no pixel stages, one short training of the DQ subset), then reruns on its store: live
bars and a line per stage on a terminal; plain lines without control characters through pipes
(cached stages say so, and the recomputed training reports its steps from the worker); ``-q``
prints the summary alone, and against a tracking server names that server instead of an
``mlflow ui`` command that would start a second one.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infra.services import QUIET, wait_ready
from tests.cli_helpers import cli_env, dq, free_port, run_in_terminal

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
STAGES = ("ingest-fashion-mnist", "embed-fashion-mnist-", "bins-4-cosine", "sample-dq-0.", "sample-random-0.",
          "coverage", "train-dq@")


def _stage_lines(text: str, status: str) -> dict[str, str]:
    """The stage lines of ``status`` (computed / cached) by stage, e.g. ``12:00:01 | bins-4-cosine  computed  0.1 s``."""
    found = {}
    for line in text.splitlines():
        match = re.match(rf"\d\d:\d\d:\d\d \| (\S+) +{status} +\d+\.\d s$", line.strip())
        if match:
            found[next((s for s in STAGES if match[1].startswith(s)), match[1])] = line
    return found


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("terminal")
    config = root / "light.yaml"
    config.write_text(yaml.safe_dump({
        "store_url": str(root / "store"),
        "dataset": {"limit": 600},
        "embedding": {"batch_size": 50, "chunk_rows": 100, "image_size": 64},  # ~1 s a chunk: the bar is seen
        "bins": {"num_bins": 4},
        "patches": {"enabled": False},
        "evaluation": {"enabled": True, "arms": ["dq"], "epochs": 1, "min_steps": 30, "seeds": [0]},
        "cluster": {"kind": "local", "n_workers": 1, "threads_per_worker": 1},
    }))
    env = cli_env(root, PREFECT_HOME=str(root / "prefect-home"), TERM="xterm", COLUMNS="160")
    return root, config, env


@pytest.fixture(scope="module")
def on_a_terminal(workspace):
    root, config, env = workspace
    status, output = run_in_terminal([sys.executable, "-m", "flows.cli", "run", str(config)], env, root)
    assert status == 0, output[-3000:]
    return output


def test_a_terminal_shows_a_line_per_stage_and_live_bars_with_counts_and_eta(on_a_terminal):
    text = ANSI.sub("", on_a_terminal).replace("\r", "\n")
    assert set(_stage_lines(text, "computed")) == set(STAGES), text[-3000:]
    # the embeddings' bar: its name, the chunk counts, elapsed and ETA columns, drawn in place
    bars = [line for line in text.splitlines() if line.startswith("embed-fashion-mnist-") and "━" in line]
    assert any(re.search(r" [1-5]/6 .*ETA", line) for line in bars), bars
    # the bins' bar counts classes, the coverage's the embedding rows its one pass went through
    for stage, counts in (("bins-4-cosine", r" \d+/10 "), ("coverage", r" \d+/600 ")):
        assert any(line.startswith(stage) and "━" in line and re.search(counts, line) for line in text.splitlines()), stage
    assert "\x1b[2K" in on_a_terminal  # rich redraws the bar line in place
    assert "Finished in state Completed()" not in re.sub(r"dq-fashion-mnist-\S+: Finished", "", text)  # no anonymous lines
    assert "subset 10.0%" in text and "Traceback" not in text


def test_plain_output_has_stage_lines_progress_lines_and_no_control_characters(workspace, on_a_terminal):
    root, config, env = workspace
    # another keep ratio: the dataset, embeddings and bins are served from the cache; the draws and the training are new
    run = dq("run", str(config), "--ratio", "0.2", env=env | {"DQ_PROGRESS_INTERVAL_S": "0"}, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    for stream in (run.stdout, run.stderr):
        assert "\r" not in stream and "\x1b" not in stream
    assert {"ingest-fashion-mnist", "embed-fashion-mnist-", "bins-4-cosine"} <= set(_stage_lines(run.stderr, "cached"))
    computed = _stage_lines(run.stderr, "computed")
    assert {"sample-dq-0.", "coverage", "train-dq@"} <= set(computed) and "train-dq@20%-seed0" in computed["train-dq@"], run.stderr
    # the worker's training steps, as plain lines: name, counts, share, elapsed and ETA
    progress = [line for line in run.stderr.splitlines() if re.search(r"\| train-dq@20%-seed0 +\d+/30 \(\d+%\), .* elapsed, ETA ", line)]
    assert progress, run.stderr
    assert re.search(r"\| coverage +\d+/600 \(\d+%\), .* elapsed, ETA ", run.stderr), run.stderr  # the subsets' rows
    assert "subset 20.0%" in run.stdout


@pytest.fixture
def tracking_server(tmp_path):
    """A real MLflow tracking server on a free loopback port; yields its URL."""
    port = free_port()
    log = tmp_path / "mlflow.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
            env=cli_env(tmp_path, **QUIET, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=tmp_path,  # its artifact root, ./mlartifacts, stays out of the work tree
        )
    try:
        wait_ready("mlflow", server.pid, "127.0.0.1", port, f"http://127.0.0.1:{port}/health", log, timeout=180)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker
        server.wait(timeout=60)


def test_quiet_prints_the_summary_alone_and_names_the_tracking_server(workspace, on_a_terminal, tracking_server):
    root, config, env = workspace
    run = dq("run", str(config), "-q", env=env | {"MLFLOW_TRACKING_URI": tracking_server}, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr == ""
    assert "subset 10.0%" in run.stdout and "report" in run.stdout
    assert re.search(rf"^  MLflow:  {tracking_server} \(run [0-9a-f]{{32}}\)$", run.stdout, re.M), run.stdout
    assert "mlflow ui" not in run.stdout
    ingest = dq("ingest", "--quiet", "--limit", "50", "--store", str(root / "quiet-store"), env=env, cwd=root)
    assert ingest.returncode == 0 and ingest.stderr == ""
    assert ingest.stdout.startswith("ingested fashion-mnist")
    assert Path(root / "quiet-store" / "datasets").is_dir()
