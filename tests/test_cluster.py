"""The flow on a real multi-process cluster: a ``dask scheduler`` and two ``dask worker``
processes started here on loopback (``cluster.kind: address``), against a run into a fresh store
on a local cluster with one worker. Every stage's artifact must be byte-identical: what DQ selects,
drops and restores may not depend on how many workers there are or where a chunk ran."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from distributed import Client

from dq_ops.config import DQConfig
from dq_ops.store import Store, array_digest, sidecars_unlisted

REPO = Path(__file__).resolve().parents[1]
DASK = str(Path(sys.executable).parent / "dask")


def _start(args: list[str], log: Path) -> subprocess.Popen:
    # Workers unpickle dq_ops functions by reference: they need this checkout first on their path.
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([DASK, *args], stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def scheduler_address(tmp_path_factory):
    """A scheduler and two single-threaded workers (separate OS processes) on 127.0.0.1."""
    folder = tmp_path_factory.mktemp("dask")
    scheduler_file = folder / "scheduler.json"
    common = ["--no-dashboard", "--host", "127.0.0.1"]
    processes = [_start(["scheduler", "--port", "0", "--scheduler-file", str(scheduler_file), *common],
                        folder / "scheduler.log")]
    try:
        deadline = time.monotonic() + 120
        while not scheduler_file.exists():
            if time.monotonic() > deadline or processes[0].poll() is not None:
                pytest.fail(f"dask scheduler did not start: {(folder / 'scheduler.log').read_text()}")
            time.sleep(0.2)
        for name in ("worker-a", "worker-b"):
            processes.append(_start(
                ["worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1", "--name", name,
                 "--local-directory", str(folder / name), "--memory-limit", "3GB", *common],
                folder / f"{name}.log",
            ))
        address = json.loads(scheduler_file.read_text())["address"]
        with Client(address) as client:
            client.wait_for_workers(2, timeout=180)
        yield address
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _config(store_url: str, cluster: dict) -> DQConfig:
    return DQConfig.model_validate({
        "store_url": store_url,
        "dataset": {"limit": 1000},
        "sampling": {"ratios": [0.2]},
        "bins": {"num_bins": 5},
        "embedding": {"batch_size": 128},
        # 64 px Grad-CAM and 40-image chunks: five patch/reconstruction chunks, quickly.
        "patches": {"cam_image_size": 64, "chunk_rows": 40, "mae_epochs": 1, "mae_train_samples": 256},
        "evaluation": {"enabled": False},
        "cluster": cluster,
    })


def _digests(store_url: str, summary: dict) -> dict[str, str]:
    """Digest of every array of the run's bins, subset, patch store and reconstruction."""
    store = Store(store_url)
    subset = summary["subsets"][0]
    artifacts = {
        "bins": store.open("bins", summary["bins"]["url"].rsplit("/", 1)[-1]),
        "subsets": store.open("subsets", subset["name"]),
        "patches": store.open("patches", subset["patches"]["url"].rsplit("/", 1)[-1]),
        "reconstructions": store.open("reconstructions", subset["patches"]["reconstruction_url"].rsplit("/", 1)[-1]),
    }
    with sidecars_unlisted():  # a subset's coverage.json beside its arrays
        return {
            f"{kind}/{path}": array_digest(array)
            for kind, artifact in artifacts.items()
            for path, array in artifact.group.arrays()
        }


def test_a_two_worker_cluster_and_a_one_worker_cluster_give_identical_artifacts(
    prefect_harness, scheduler_address, tmp_path
):
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

    from flows.quantize import quantize

    remote_store, local_store = str(tmp_path / "remote"), str(tmp_path / "local")
    with temporary_settings({PREFECT_TASKS_REFRESH_CACHE: True}):  # both runs compute every stage
        remote = quantize(_config(remote_store, {"kind": "address", "address": scheduler_address}))
        local = quantize(_config(local_store, {"kind": "local", "n_workers": 1, "threads_per_worker": 1}))
    with Client(scheduler_address) as client:
        # Both worker processes scored patches: each loaded its own Grad-CAM++ classifier.
        loaded = client.run(lambda: sorted(type(k).__name__ for k in importlib.import_module("dq_ops.pixel_work")._MODELS))
    assert len(loaded) == 2 and all("ScorerSpec" in models for models in loaded.values()), loaded

    remote_digests, local_digests = _digests(remote_store, remote), _digests(local_store, local)
    assert set(remote_digests) >= {
        "bins/bin_of_sample", "subsets/ids", "patches/patches", "patches/mask", "patches/ids",
        "reconstructions/images", "reconstructions/ids",
    }
    assert remote_digests == local_digests
    # Byte counts and PSNR, combined from per-chunk sums, agree too.
    keys = ("stored_bytes", "whole_image_bytes", "patch_keep_ratio", "psnr_mae_db", "psnr_mean_fill_db", "psnr_zero_fill_db")
    figures = [{k: run["subsets"][0]["patches"][k] for k in keys} for run in (remote, local)]
    assert figures[0] == figures[1]
    assert figures[0]["patch_keep_ratio"] == pytest.approx(39 / 49) and figures[0]["psnr_mae_db"] > 0


def test_a_scheduler_without_workers_is_an_error_naming_it_not_a_wait_without_end():
    """A real scheduler with no workers: asking for the workers' precision gives up after the timeout."""
    from distributed import LocalCluster

    from dq_ops.cluster import check_scheduler, workers_precision
    from dq_ops.errors import DQInputError

    with LocalCluster(n_workers=0, processes=True, dashboard_address=":0") as cluster, Client(cluster) as client:
        check_scheduler(cluster.scheduler_address)  # it answers the handshake
        with pytest.raises(DQInputError, match=f"cluster.address {cluster.scheduler_address}: .* has no workers"):
            workers_precision(client, timeout=2)


def test_the_flow_process_never_imports_torch_when_a_cluster_runs_the_models(scheduler_address, tmp_path):
    """Every model (backbone, Grad-CAM++, MAE, evaluation network) runs on the workers, so the
    process that runs the flow only plans: it never imports torch (some 470 MB of RSS). Checked
    on a whole `dq run`, evaluation included: the modules it imported, listed as it exits."""
    import yaml

    config = _config(str(tmp_path / "store"), {"kind": "address", "address": scheduler_address}).model_dump(mode="json")
    config["evaluation"] = {"enabled": True, "seeds": [0], "epochs": 1, "min_steps": 1}
    path, modules = tmp_path / "run.yaml", tmp_path / "modules.json"
    path.write_text(yaml.safe_dump(config))
    script = textwrap.dedent(f"""
        import atexit, json, sys
        atexit.register(lambda: open({str(modules)!r}, "w").write(json.dumps(sorted(sys.modules))))
        sys.argv = ["dq", "run", {str(path)!r}]
        from flows.cli import entrypoint
        entrypoint()
    """)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    imported = set(json.loads(modules.read_text()))
    assert {"dq_ops.stages", "distributed"} <= imported  # the list is the run's
    assert not {name for name in imported if name.split(".")[0] == "torch"}
    evaluations = Store(str(tmp_path / "store")).list("evaluations")
    assert len(evaluations) == 3  # dq, dq_pixels and random trained (on the workers)
