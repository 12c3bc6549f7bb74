"""bench/scale.py at a tiny size: the whole path (Parquet shards on moto's S3 server, a dask
scheduler with two workers, ``dq run`` and ``dq export`` through the CLI) and its report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import scale  # noqa: E402

pytestmark = pytest.mark.slow


def test_scale_bench_tiny(tmp_path, capsys):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = scale.main(["--samples", "1000", "--shard-rows", "500", "--no-refresh", "--jobs", "1",
                         "--cache", str(tmp_path / "cache"), "--work", str(tmp_path / "work"),
                         "--json", str(tmp_path / "out.json")])
    stages = {s["name"]: s for s in result["first"]["stages"]}
    assert {"ingest", "embeddings", "bins", "sample-dq-0.1", "sample-dq-0.6", "export-0.1", "export-0.6",
            "dq run (whole)"} <= set(stages)
    assert stages["ingest"]["samples"] == 1000 + 100  # the training shards and the test shard
    assert stages["embeddings"]["samples"] == result["first"]["embedded"] > 0
    for ratio in ("0.1", "0.6"):
        # bench/scale.py read the exported Parquet back: its row count is the subset's size
        size = result["first"]["subsets"][ratio]["size"]
        assert stages[f"export-{ratio}"]["samples"] == size > 0
        assert stages[f"export-{ratio}"]["store_bytes"] > 0
    whole = stages["dq run (whole)"]["peak_rss"]
    assert {"flow", "mlflow", "worker-0", "worker-1", "scheduler"} <= set(whole)
    assert all(whole[role] > 0 for role in ("flow", "worker-0", "worker-1", "scheduler"))
    assert stages["embeddings"]["store_bytes"] > 0
    assert json.loads((tmp_path / "out.json").read_text())["samples"] == 1000
    printed = capsys.readouterr().out
    assert "| stage | wall s | samples/s |" in printed and "| export-0.6 |" in printed
    # every server and worker it started is gone
    left = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not left
