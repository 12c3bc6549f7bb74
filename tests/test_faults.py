"""Faults with real processes and real signals: two ``dq run``s on one store at once, Ctrl-C and
``kill -9`` during the embeddings, ``kill -9`` during ingest, patch scoring and evaluation
training, writers killed inside a store write.

Light runs: 600 real Fashion-MNIST images, embeddings in chunks of 100 rows on one dask worker,
no patch dropping, no evaluation. The uninterrupted runs are the reference for the interrupted
one: the same bins and subsets, byte for byte.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from dq_ops.store import STAGING, Store
from tests.cli_helpers import Finished, cli_env, dq, mlflow_server, wait_while_running

CHUNKS = 6  # 600 rows / 100


def _config(root: Path, store: Path) -> Path:
    path = root / f"{store.name}.yaml"
    path.write_text(yaml.safe_dump({
        "store_url": str(store),
        "dataset": {"limit": 600},
        # 64 px: a chunk takes ~0.7 s on the worker, a window wide enough to kill a run between chunks.
        "embedding": {"batch_size": 50, "chunk_rows": 100, "image_size": 64},
        "bins": {"num_bins": 4},
        "patches": {"enabled": False},
        "evaluation": {"enabled": False},
        "cluster": {"kind": "local", "n_workers": 1, "threads_per_worker": 1},
    }))
    return path


def _start(config: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """``dq run CONFIG`` in its own process group (the group is what a terminal signals)."""
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(config)], env=env, cwd=cwd,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 900) -> Finished:
    stdout, stderr = proc.communicate(timeout=timeout)  # a hang guard, not a speed check
    return Finished(proc.returncode, stdout, stderr)


def _chunks_done(store: Path, kind: str = "embeddings") -> int:
    """Finished chunks in the store's resumable staging group of ``kind`` (0 when there is none)."""
    staging = store / kind / STAGING
    for group in staging.glob("*/done") if staging.exists() else []:
        try:
            return int(np.asarray(zarr.open_array(str(group), mode="r")[:]).sum())
        except Exception:  # being created right now: look again
            return 0
    return 0


def _wait_for_chunks(proc: subprocess.Popen, store: Path, at_least: int) -> None:
    wait_while_running(proc, lambda: _chunks_done(store) >= at_least, every=0.2)


def _results(store: Path, finished: Finished) -> dict[str, str]:
    """Fingerprints (content + parameters + inputs) of the run's embeddings, bins and subset."""
    urls = {line.split()[0]: line.split()[-1] for line in finished.stdout.splitlines() if line.startswith(("bins", "subset"))}
    s = Store(str(store))
    bins = s.open("bins", urls["bins"].rsplit("/", 1)[-1])
    subset = s.open("subsets", urls["subset"].rsplit("/", 1)[-1])
    embeddings = s.open("embeddings", s.list("embeddings")[0])
    return {"embeddings": embeddings.record["content_digest"], "bins": bins.record["content_digest"],
            "subset": subset.record["content_digest"], "subset_name": subset.name}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return {"root": root, "env": cli_env(root, PREFECT_HOME=str(root / "prefect-home"))}


@pytest.fixture(scope="module")
def reference(workspace):
    """Two runs on one store at the same time, both to the end: the uninterrupted reference."""
    root, env = workspace["root"], workspace["env"]
    store = root / "shared-store"
    config = _config(root, store)
    procs = [_start(config, env, root) for _ in range(2)]
    runs = [_finish(p) for p in procs]
    return store, runs


@pytest.mark.slow
def test_two_runs_on_one_store_at_once_both_succeed(reference):
    store, runs = reference
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
        assert "Traceback" not in run.stderr
    first, second = (_results(store, run) for run in runs)
    assert first == second  # one set of artifacts, written once, read by both
    leftovers = [p for p in store.glob(f"*/{STAGING}/*")]
    assert leftovers == []  # no shared or orphaned staging left behind
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dq")
    finished = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'FINISHED' and tags.dq_role = 'flow'")
    assert len(finished) == 2
    (trend,) = client.search_runs([experiment.experiment_id], filter_string="tags.dq_role = 'trend'")  # one per schedule
    assert {run.data.tags["dq_trend_run_id"] for run in finished} == {trend.info.run_id}


@pytest.mark.slow
def test_ctrl_c_then_kill_9_during_embeddings_then_a_rerun_resumes_to_identical_results(workspace, reference):
    root, env = workspace["root"], workspace["env"]
    store = root / "interrupted-store"
    config = _config(root, store)

    # Ctrl-C (SIGINT to the whole process group, as a terminal sends it) once a chunk is done.
    proc = _start(config, env, root)
    _wait_for_chunks(proc, store, 1)
    os.killpg(proc.pid, signal.SIGINT)
    interrupted = _finish(proc, timeout=120)
    assert interrupted.returncode == 130
    assert interrupted.last_line == "interrupted"
    assert "Traceback" not in interrupted.stdout + interrupted.stderr

    # kill -9 of everything (the run, its dask worker, its Prefect server) a chunk later.
    proc = _start(config, env, root)
    _wait_for_chunks(proc, store, min(CHUNKS - 1, _chunks_done(store) + 1))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    done_before = _chunks_done(store)
    assert 0 < done_before < CHUNKS

    resumed = _finish(_start(config, env, root))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = [line for line in resumed.stderr.splitlines() if "resumed: " in line]
    assert said and f"of {CHUNKS} chunks already done" in said[0]
    assert int(said[0].split("resumed: ")[1].split()[0]) >= done_before
    reference_store, reference_runs = reference
    assert _results(store, resumed) == _results(reference_store, reference_runs[0])
    assert list(store.glob(f"*/{STAGING}/*")) == []


def _staged_images(store: Path) -> bool:
    """Whether an ingest is writing the snapshot's training images into the store's staging."""
    staging = store / "datasets" / STAGING
    return staging.exists() and any(staging.glob("*/train/images"))


@pytest.mark.parametrize("stage", ["ingest", "embeddings"])
@pytest.mark.slow
def test_a_run_closes_what_a_run_killed_before_it_left_running(prefect_harness, workspace, stage):
    """``kill -9`` during ingest or mid-embeddings leaves the run's Prefect flow and task runs
    Running (and its MLflow run RUNNING, once it was started: it starts while ingest runs); the next
    run on the store finds the killed run's record, sees its process gone, closes them (Crashed,
    FAILED) and says so in one line. The run killed during ingest reads all 70,000 images of
    Fashion-MNIST (a window of seconds) and tracks in the store's SQLite; the run killed
    mid-embeddings tracks on a real MLflow server, which the next run closes its runs on."""
    from prefect.settings import PREFECT_API_URL

    root = workspace["root"]
    env = workspace["env"] | {"PREFECT_API_URL": PREFECT_API_URL.value()}  # one server for both runs
    store = root / f"crashed-during-{stage}"
    with contextlib.ExitStack() as servers:
        if stage == "embeddings":
            env["MLFLOW_TRACKING_URI"] = servers.enter_context(mlflow_server(root / "tracking-server"))
        _kill_then_rerun_closes_it(root, env, store, stage)


def _kill_then_rerun_closes_it(root: Path, env: dict[str, str], store: Path, stage: str) -> None:
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    tracking_uri = env.get("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    config = _config(root, store)
    if stage == "ingest":
        whole = root / f"{store.name}-whole.yaml"
        whole.write_text(yaml.safe_dump(yaml.safe_load(config.read_text()) | {"dataset": {}}))
        proc = _start(whole, env, root)
        wait_while_running(proc, lambda: _staged_images(store), every=0.05)
    else:
        proc = _start(config, env, root)
        _wait_for_chunks(proc, store, 1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    (record,) = [json.loads(path.read_text()) for path in (store / "runs").glob("*.json")]
    flow_run_id = record["flow_run_id"]

    def prefect_states() -> tuple[str, dict[str, str]]:
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(flow_run_id)
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return flow_run.state.name, {run.name: run.state.name for run in task_runs}

    def mlflow_runs() -> list:
        if "MLFLOW_TRACKING_URI" not in env and not (store / "mlflow.db").exists():  # killed before it was made
            return []
        tracking = mlflow.MlflowClient(tracking_uri=tracking_uri)
        experiment = tracking.get_experiment_by_name("dq")
        return [] if experiment is None else tracking.search_runs(
            [experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")

    flow_state, task_states = prefect_states()
    assert flow_state == "Running"
    if stage == "ingest":
        # the server learns of a task run from its events, sent in batches: a kill may beat the first
        assert set(task_states.items()) <= {("ingest-fashion-mnist", "Running")}, task_states
    else:
        assert "Running" in task_states.values(), task_states
    open_tasks = bool(task_states)
    killed = mlflow_runs()
    assert [run.info.status for run in killed] == ["RUNNING"] * len(killed)
    assert killed or stage == "ingest"  # mid-embeddings its MLflow run is there

    rerun = _finish(_start(config, env, root))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    said = [line for line in rerun.stderr.splitlines() if "whose process was killed" in line]
    assert len(said) == 1 and flow_run_id in said[0] and f"pid {record['pid']}" in said[0], rerun.stderr[-3000:]
    assert f"{len(killed)} MLflow run(s) marked FAILED" in said[0]
    flow_state, task_states = prefect_states()
    assert flow_state == "Crashed" and ("Crashed" in task_states.values() or not open_tasks), task_states
    assert not {"Running", "Pending", "Scheduled"} & set(task_states.values()), task_states
    assert [run.info.status for run in mlflow_runs()] == ["FAILED"] * len(killed)
    assert not (store / "runs").exists()  # the killed run's record closed, the rerun's removed at its end

    again = _finish(_start(config, env, root))  # nothing left to close: nothing said
    assert again.returncode == 0 and "whose process was killed" not in again.stderr, again.stderr[-3000:]
    assert "selection vs previous run: +0 −0, 0 modified, 0 relabelled (churn 0.00%)" in again.stdout, again.stdout


def test_a_run_record_tells_a_gone_process_from_a_live_one(tmp_path):
    """Gone: a pid that exited, or a live pid with another start time (reused); a record of
    another host is never judged from here."""
    import socket
    from dataclasses import asdict

    import psutil

    from dq_ops.runs import RunRecord, crashed_runs, record_run, remove_run_record

    store = Store(str(tmp_path / "store"))
    live = record_run(store, "live", "this-process")
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait(timeout=60)
    started = psutil.Process().create_time()
    host = socket.gethostname()
    records = {"exited": RunRecord("exited", "a", host, exited.pid, started),
               "reused": RunRecord("reused", "b", host, os.getpid(), started - 3600),
               "elsewhere": RunRecord("elsewhere", "c", f"not-{host}", exited.pid, started)}
    for record in records.values():
        (tmp_path / "store" / "runs" / f"{record.flow_run_id}.json").write_text(json.dumps(asdict(record)))
    assert [r.flow_run_id for r in crashed_runs(store)] == ["reused", "exited"]  # oldest first
    assert not live.process_gone()
    remove_run_record(store, "reused")
    assert [r.flow_run_id for r in crashed_runs(store)] == ["exited"]


def _pixel_config(root: Path, store: Path) -> Path:
    """The light run with the pixel stages (patch scoring in 4 chunks) and evaluation on."""
    path = _config(root, store)
    config = yaml.safe_load(path.read_text())
    config["patches"] = {"enabled": True, "cam_image_size": 64, "mae_epochs": 1, "mae_train_samples": 200, "chunk_rows": 16}
    config["evaluation"] = {"enabled": True, "arms": ["dq", "random"], "epochs": 1, "min_steps": 20, "seeds": [0]}
    path.write_text(yaml.safe_dump(config))
    return path


def _digests(store: Path) -> dict[str, str]:
    """Content digest of every artifact that is a pure function of the inputs (not evaluations:
    they hold timings), by kind/name."""
    s = Store(str(store))
    return {f"{kind}/{name}": s.open(kind, name).record["content_digest"]
            for kind in ("datasets", "embeddings", "bins", "subsets", "models", "patches", "reconstructions")
            for name in s.list(kind)}


@pytest.fixture(scope="module")
def pixel_reference(workspace):
    root, env = workspace["root"], workspace["env"]
    store = root / "pixel-reference"
    run = _finish(_start(_pixel_config(root, store), env, root))
    assert run.returncode == 0, run.stderr[-3000:]
    return store


@pytest.mark.parametrize("stage", ["patch scoring", "evaluation"])
@pytest.mark.slow
def test_kill_9_during_a_stage_then_a_rerun_completes_with_identical_results(workspace, pixel_reference, stage):
    root, env = workspace["root"], workspace["env"]
    store = root / f"killed-during-{stage.replace(' ', '-')}"
    config = _pixel_config(root, store)
    proc = _start(config, env, root)
    staging = store / "evaluations" / STAGING
    wait_while_running(proc, lambda: _chunks_done(store, "patches") >= 1 if stage == "patch scoring"
                       else staging.exists() and any(staging.iterdir()))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)

    resumed = _finish(_start(config, env, root))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if stage == "patch scoring":
        assert any("resumed: " in line for line in resumed.stderr.splitlines())
    assert _digests(store) == _digests(pixel_reference)
    assert len(Store(str(store)).list("evaluations")) == len(Store(str(pixel_reference)).list("evaluations"))
    assert list(store.glob(f"*/{STAGING}/*")) == []


WRITER = textwrap.dedent("""
    import sys, time
    from dq_ops.store import Store
    store = Store(sys.argv[1])
    with store.write("subsets", sys.argv[2], {}) as group:
        group.attrs["partial"] = True
        print("writing", flush=True)
        time.sleep(600)
""")


def test_staging_of_a_killed_writer_is_cleaned_and_a_live_writers_is_kept(tmp_path):
    """``dq gc`` (and every ``dq run`` / ``dq ingest``) removes what a killed writer left."""
    env = cli_env(tmp_path)
    store = tmp_path / "store"
    writers = {
        name: subprocess.Popen([sys.executable, "-c", WRITER, str(store), name], env=env, stdout=subprocess.PIPE, text=True)
        for name in ("killed", "alive")
    }
    try:
        for proc in writers.values():
            assert proc.stdout.readline().strip() == "writing"
        writers["killed"].kill()
        writers["killed"].wait(timeout=60)
        gc = dq("gc", "--keep", "1", "--store", str(store), env=env, cwd=tmp_path)
        assert gc.returncode == 0 and "1 staging folder(s) of killed runs removed" in gc.stdout, gc.stderr
        left = [p.name for p in (store / "subsets" / STAGING).iterdir()]
        assert len(left) == 1 and left[0].startswith("alive-")
    finally:
        writers["alive"].kill()
        writers["alive"].wait(timeout=60)


def test_kill_9_during_ingest_then_a_rerun_stores_the_same_snapshot(tmp_path):
    """A killed ingest leaves no dataset (and no pointer) behind; the rerun stores exactly what an
    uninterrupted ingest stores, and the killed writer's staging is gone."""
    env = cli_env(tmp_path)
    reference = dq("ingest", "--store", str(tmp_path / "reference"), env=env, cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]

    store = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ingest", "--store", str(store)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    wait_while_running(proc, lambda: _staged_images(store), every=0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert Store(str(store)).list("datasets") == [] and Store(str(store)).read_ref("datasets", "fashion-mnist") is None

    rerun = dq("ingest", "--store", str(store), env=env, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    ours, theirs = Store(str(store)).open("datasets", "fashion-mnist"), Store(str(tmp_path / "reference")).open("datasets", "fashion-mnist")
    assert ours.name == theirs.name and ours.record["content_digest"] == theirs.record["content_digest"]
    assert list(store.glob(f"*/{STAGING}/*")) == []
