"""The text path of the flow on real text: Debian fortunes as JSONL records, MiniLM on dask."""

from __future__ import annotations

import json
from pathlib import Path

from dq_ops.config import DQConfig
from dq_ops.export import export_subset
from dq_ops.store import Store

FORTUNES = Path("/usr/share/games/fortunes")
TOPICS = ("art", "computers", "food", "love", "science")


def test_text_flow_bins_samples_evaluates_and_exports(prefect_harness, tmp_path):
    from flows.quantize import quantize

    source = tmp_path / "records.jsonl"
    with source.open("w") as fh:
        for topic in TOPICS:
            entries = [e.strip() for e in (FORTUNES / topic).read_text(errors="replace").split("\n%\n") if e.strip()]
            for entry in entries[:80]:
                fh.write(json.dumps({"instruction": entry, "input": "", "output": "", "label": topic}) + "\n")
    config = DQConfig.model_validate({
        "store_url": str(tmp_path / "store"),
        "dataset": {"format": "jsonl", "url": str(source), "name": "fortunes", "test_fraction": 0.25},
        "bins": {"num_bins": 4, "kernel": "dot"},
        "sampling": {"ratios": [0.25]},
        "cluster": {"kind": "local", "n_workers": 1, "threads_per_worker": 2},
        "evaluation": {"arms": ["dq", "random", "full"]},
    })
    summary = quantize(config)

    assert summary["embeddings"]["dim"] == 384
    report = Path(summary["report_path"]).read_text()
    assert "- Features: `all-MiniLM-L6-v2` sentence embeddings, 384-d" in report and "efficientnet" not in report
    subset = summary["subsets"][0]
    train_size = summary["dataset"]["counts"]["train"]
    assert abs(subset["size"] - 0.25 * train_size) <= 4 * len(TOPICS)
    arms = {row["arm"]: row for row in subset["evaluation"] + summary["full"]}
    assert set(arms) == {"dq", "random", "full"}
    for row in arms.values():  # five topics: chance is 20%
        assert 0.3 < row["mean"] <= 1.0
    # The bin gallery of a text dataset: example records per bin, in MLflow (and a Prefect table).
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=summary["tracking_uri"])
    examples = json.loads(Path(client.download_artifacts(summary["mlflow_run_id"], "tables/bin_examples.json", str(tmp_path))).read_text())
    assert {row["bin"] for row in examples} == set(range(4))
    assert all(row["class"] in TOPICS and row["example"] for row in examples)

    out = tmp_path / "export"
    result = export_subset(Store(config.store_url), subset["name"], str(out), "jsonl")
    lines = [json.loads(line) for line in (out / "subset.jsonl").read_text().splitlines()]
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert result.samples == len(lines) == len(manifest) == subset["size"]
    assert [m["id"] for m in manifest] == [line["id"] for line in lines]
    assert all(line["text"] for line in lines)


def test_shipped_fortunes_config_runs_on_the_real_fortune_files(prefect_harness, tmp_path):
    """deployments/configs/fortunes-text.yaml as shipped (the fortunes reader on /usr/share/games/fortunes),
    made small: 600 entries interleaved over all 43 long-tailed topics, so several topics have fewer
    entries than bins; they fill their first bins instead of failing the run."""
    from prefect.client.orchestration import get_client

    from flows.quantize import quantize

    shipped = DQConfig.from_yaml(Path(__file__).resolve().parents[1] / "deployments/configs/fortunes-text.yaml")
    assert shipped.dataset.format == "fortunes" and Path(shipped.dataset.url) == FORTUNES
    raw = shipped.model_dump()
    raw["store_url"] = str(tmp_path / "store")
    raw["dataset"]["limit"] = 600
    raw["sampling"]["ratios"] = [0.5]
    raw["evaluation"]["arms"] = ["dq", "random"]
    raw["cluster"] = {"kind": "local", "n_workers": 1, "threads_per_worker": 2}
    config = DQConfig.model_validate(raw)
    summary = quantize(config)

    topics = sorted(p.name for p in FORTUNES.iterdir() if not p.is_symlink() and p.suffix != ".dat")
    assert summary["class_names"] == topics
    bins = Store(config.store_url).open("bins", summary["bins"]["url"].rsplit("/", 1)[-1])
    sizes = bins.group.attrs["bin_sizes"]  # classes × bins
    small = [row for row in sizes if sum(row) < config.bins.num_bins]
    assert small and all(row == sorted(row, reverse=True) for row in small)  # first bins only
    assert summary["subsets"][0]["size"] > 0
    with get_client(sync_client=True) as client:
        names = {run.name for run in client.read_task_runs()}
    # The embedding task says which model runs (the dataset is named by its snapshot: fortunes-<fingerprint>).
    assert any(name.startswith("embed-fortunes-") and name.endswith("-train-all-MiniLM-L6-v2") for name in names), names
