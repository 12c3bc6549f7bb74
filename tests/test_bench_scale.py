"""bench/scale.py: its source (classes as garment × tint group, the cache --generate-only
fills) and, at a tiny size, the whole path (Parquet shards on moto's S3 server, a dask
scheduler with two workers, ``dq run`` and ``dq export`` through the CLI) and its report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import scale  # noqa: E402


def test_classes_are_garments_in_tint_groups():
    images, labels = scale._fashion_mnist("train")
    garments = scale.make_block(images, labels, 0, 2000, 32, 0, "train", classes=10)
    tinted = scale.make_block(images, labels, 0, 2000, 32, 0, "train", classes=40)
    assert tinted[0] == garments[0] and tinted[2] == garments[2]  # the same pixels and ids
    assert (tinted[1] // 4 == garments[1]).all()  # four tint groups per garment
    assert set(tinted[1].tolist()) == set(range(40))
    assert scale.tint_levels(100) == (5, 5, 4) and scale.tint_levels(7) == (7, 1, 1)
    # each channel's range cut into equal parts: the corners of the colour cube are the first and last group
    low, high = scale.FOREGROUND
    corners = np.array([[low, low, low], [high, high, high], [high - 1e-3, low, low]], dtype=np.float32)
    assert scale.tint_group(corners, 100).tolist() == [0, 99, 80]
    assert scale.class_names(20)[:3] == ["T-shirt/top (tint 0)", "T-shirt/top (tint 1)", "Trouser (tint 0)"]


def test_generate_only_fills_the_cache_and_starts_nothing(tmp_path, capsys):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    argv = ["--samples", "40", "--shard-rows", "20", "--test-samples", "10", "--classes", "20", "--jobs", "1",
            "--cache", str(tmp_path), "--generate-only"]
    folder = Path(scale.main(argv)["source"])
    assert folder.name.endswith("-classes20")
    assert sorted(p.name for p in folder.iterdir()) == [
        "test-00000-of-00001.parquet", "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    table = pq.read_table(folder / "train-00001-of-00002.parquet")
    assert table.num_rows == 20 and set(table.column("label").to_pylist()) <= set(range(20))
    assert json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]["label"]["names"] == scale.class_names(20)
    assert "generated 50 samples" in capsys.readouterr().out
    scale.main(argv)  # cached: nothing generated again
    assert "generated" not in capsys.readouterr().out
    assert not {p.pid for p in psutil.Process().children(recursive=True)} - before


def test_ten_classes_are_taken_from_a_cached_source_with_more(tmp_path, capsys):
    argv = ["--samples", "40", "--shard-rows", "20", "--test-samples", "10", "--jobs", "1", "--generate-only"]
    scale.main([*argv, "--classes", "20", "--cache", str(tmp_path / "a")])
    derived = Path(scale.main([*argv, "--classes", "10", "--cache", str(tmp_path / "a")])["source"])
    assert "generated" not in capsys.readouterr().out.split("10 classes")[1]  # relabelled, not generated
    generated = Path(scale.main([*argv, "--classes", "10", "--cache", str(tmp_path / "b")])["source"])
    for shard in sorted(generated.iterdir()):
        ours, theirs = pq.read_table(derived / shard.name), pq.read_table(shard)
        assert ours.equals(theirs) and ours.schema.metadata == theirs.schema.metadata


def test_refreshes_add_a_shard_each_and_the_first_removes_rows_from_the_first_shards(tmp_path):
    import fsspec
    import yaml

    from dq_ops.config import DQConfig

    layout = scale.Layout(samples=400, test_samples=10, shard_rows=200, size=32, seed=0, classes=10)
    source, work = tmp_path / "source", tmp_path / "work"
    source.mkdir(), work.mkdir()
    for index in range(layout.train_shards):
        scale.write_shard(source / layout.train_name(index), "train", *layout.train_rows(index), layout.size, layout.seed,
                          layout.classes)
    ids = {index: pq.read_table(source / layout.train_name(index)).column("id").to_pylist() for index in range(2)}
    fs = fsspec.filesystem("file")
    assert scale.refresh_source(fs, layout, str(source), work, 0, remove=True) == (4, 2)
    kept = pq.read_table(source / layout.train_name(0)).column("id").to_pylist()
    assert set(kept) < set(ids[0]) and len(ids[0]) - len(kept) == 2
    assert scale.refresh_source(fs, layout, str(source), work, 1, remove=False) == (4, 0)  # the append refresh
    assert pq.read_table(source / layout.train_name(0)).column("id").to_pylist() == kept
    added = [pq.read_table(source / layout.train_name(index, of=index + 1)).column("id").to_pylist() for index in (2, 3)]
    assert len(set(added[0]) | set(added[1])) == 8 and not (set(added[0]) | set(added[1])) & (set(ids[0]) | set(ids[1]))
    config = tmp_path / "scale.yaml"
    scale.write_config(config, str(source), str(tmp_path / "store"), "tcp://127.0.0.1:1", "incremental")
    assert DQConfig.model_validate(yaml.safe_load(config.read_text())).bins.refresh == "incremental"


@pytest.mark.slow
def test_scale_bench_tiny(tmp_path, capsys):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = scale.main(["--samples", "1000", "--classes", "10", "--shard-rows", "500", "--no-refresh", "--jobs", "1",
                         "--cache", str(tmp_path / "cache"), "--work", str(tmp_path / "work"),
                         "--json", str(tmp_path / "out.json"), "--subset-stages", "150"])
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
    # the pixel stages on a subset of 150, everything before sampling served from the store
    pixels = {s["name"]: s for s in result["subset-stages"]["stages"]}
    assert {pixels[name]["status"] for name in ("ingest", "embeddings", "bins")} == {"cached"}
    assert {"sample-dq-0.15", "patches", "mae", "reconstruction", "train-dq@15%-seed0", "train-dq_pixels@15%-seed0",
            "train-random@15%-seed0"} <= set(pixels)
    assert abs(result["subset-stages"]["subsets"]["0.15"]["size"] - 150) <= 10  # per-class rounding
    assert pixels["patches"]["samples"] == result["subset-stages"]["subsets"]["0.15"]["size"]
    assert pixels["patches"]["store_bytes"] > 0 and pixels["train-dq@15%-seed0"]["store_bytes"] > 0
    printed = capsys.readouterr().out
    assert "| stage | wall s | samples/s |" in printed and "| export-0.6 |" in printed
    assert "### subset-stages run" in printed
    # every server and worker it started is gone
    left = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not left
