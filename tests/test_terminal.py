"""What ``dq run`` shows while it works, in a real pseudo-terminal and through plain pipes.

One light run (600 real Fashion-MNIST images, embeddings in 6 chunks of 100 rows on one dask
worker, no pixel stages, one short training of the DQ subset), then reruns on its store: live
bars and a line per stage on a terminal; plain lines without control characters through pipes
(cached stages say so, and the recomputed training reports its steps from the worker); ``-q``
prints the summary alone.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from tests.cli_helpers import cli_env, dq, run_in_terminal

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
STAGES = ("ingest-fashion-mnist", "embed-fashion-mnist-", "bins-4-cosine", "sample-dq-0.", "sample-random-0.",
          "train-dq@")


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
    assert {"sample-dq-0.", "train-dq@"} <= set(computed) and "train-dq@20%-seed0" in computed["train-dq@"], run.stderr
    # the worker's training steps, as plain lines: name, counts, share, elapsed and ETA
    progress = [line for line in run.stderr.splitlines() if re.search(r"\| train-dq@20%-seed0 +\d+/30 \(\d+%\), .* elapsed, ETA ", line)]
    assert progress, run.stderr
    assert "subset 20.0%" in run.stdout


def test_quiet_prints_the_summary_alone(workspace, on_a_terminal):
    root, config, env = workspace
    run = dq("run", str(config), "-q", env=env, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr == ""
    assert "subset 10.0%" in run.stdout and "report" in run.stdout
    ingest = dq("ingest", "--quiet", "--limit", "50", "--store", str(root / "quiet-store"), env=env, cwd=root)
    assert ingest.returncode == 0 and ingest.stderr == ""
    assert ingest.stdout.startswith("ingested fashion-mnist")
    assert Path(root / "quiet-store" / "datasets").is_dir()
