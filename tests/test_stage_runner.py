"""``dq_ops.stage.run_jobs``, the one way stages run their work: in order here, on threads, or on a
dask cluster, with the same results, progress and error rule everywhere."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from distributed import Client, get_worker

from dq_ops import stages
from dq_ops.bins import JoinBoundaries, join_boundaries, join_rows
from dq_ops.config import BinsConfig
from dq_ops.coverage import subset_coverage
from dq_ops.errors import DQInputError
from dq_ops.stage import run_jobs
from dq_ops.stages import BaselineStage, BinsStage, class_batches, class_job_rows
from dq_ops.store import QUANTIZED_SPLIT, Store, write_array

STARTED: set[int] = set()
STARTED_LOCK = threading.Lock()


def square_plus(job: int, offset: int) -> int:
    return job * job + offset


def earlier_fails_later(job: int) -> int:
    """Job 0 fails after a while, job 1 at once, the others take a moment each."""
    with STARTED_LOCK:
        STARTED.add(job)
    if job == 0:
        time.sleep(0.5)
        raise ValueError("job 0 failed")
    if job == 1:
        raise ValueError("job 1 failed")
    time.sleep(0.2)
    return job


def reports(job: int, progress) -> int:
    for step in range(1, 4):
        time.sleep(0.6)
        progress(step, 3)
    return job


@pytest.fixture(scope="module")
def client():
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as client:
        yield client


@pytest.fixture(autouse=True)
def fresh_started():
    STARTED.clear()


@pytest.mark.parametrize("where", ["inline", "threads", "cluster"])
def test_results_come_in_job_order_and_each_finished_job_is_reported(where, client):
    finished = []
    results = run_jobs(client if where == "cluster" else None, square_plus, list(range(6)), shared=(1,),
                       on_done=finished.append, threads=3 if where == "threads" else 1)
    assert results == [k * k + 1 for k in range(6)]
    assert sorted(finished) == results


def test_a_function_named_by_import_path_is_imported_where_it_runs(client):
    assert run_jobs(None, "operator:neg", [1, 2]) == [-1, -2]
    assert run_jobs(client, "operator:neg", [1, 2]) == [-1, -2]


def test_a_client_source_is_called_only_when_there_are_jobs():
    def never() -> Client:
        raise AssertionError("started a cluster for no jobs")

    assert run_jobs(never, square_plus, [], shared=(0,)) == []


@pytest.mark.parametrize("where", ["threads", "cluster"])
def test_the_error_raised_is_the_earliest_in_job_order_and_later_jobs_are_cancelled(where, client):
    with pytest.raises(ValueError, match="job 0 failed"):
        run_jobs(client if where == "cluster" else None, earlier_fails_later, list(range(8)), threads=2)
    # job 1's failure cancels everything after it: at most the job a free slot took meanwhile started
    assert len(STARTED - {0, 1}) <= 2


def test_in_order_the_first_error_stops_the_rest():
    with pytest.raises(ValueError, match="job 0 failed"):
        run_jobs(None, earlier_fails_later, list(range(4)))
    assert STARTED == {0}


def own_key(job: int) -> str:
    return get_worker().get_current_task()


def test_task_keys_carry_the_stem_and_a_fresh_token(client):
    keys = [run_jobs(client, own_key, [3, 4], key=lambda job: f"dq-test-{job}") for _ in range(2)]
    assert all(key.startswith(f"dq-test-{job}-") for run in keys for job, key in zip([3, 4], run))
    assert len({key for run in keys for key in run}) == 4  # a rerun never meets its predecessors' keys


@pytest.mark.parametrize("where", ["inline", "cluster"])
def test_a_lone_job_reports_its_own_progress(where, client):
    seen = []
    assert run_jobs(client if where == "cluster" else None, reports, [7], progress=lambda done, total: seen.append((done, total))) == [7]
    assert seen and set(seen) <= {(1, 3), (2, 3), (3, 3)}
    with pytest.raises(ValueError, match="alone"):
        run_jobs(None, reports, [1, 2], progress=lambda done, total: None)


def test_classes_are_batched_in_order_up_to_a_row_budget():
    assert class_batches([40, 40, 30, 100, 5, 5], 100) == [[0, 1], [2], [3], [4, 5]]
    assert class_batches([250, 10], 100) == [[0], [1]]  # a class over the budget goes alone
    assert class_batches([], 100) == []


def _toy_snapshot(store: Store, features: np.ndarray, classes: int):
    """A dataset snapshot of ``len(features)`` labelled rows (``s<k>``, class k mod ``classes``) and its embeddings."""
    n = len(features)
    with store.write_snapshot("datasets", "toy", {"toy": 1}) as write:
        split = write.group.create_group(QUANTIZED_SPLIT)
        write_array(split, "labels", np.arange(n, dtype=np.int64) % classes)
        write_array(split, "ids", np.array([f"s{k}" for k in range(n)]))
    dataset = write.artifact
    with store.write("embeddings", f"toy-{n}", {"toy": 1}, [dataset.fingerprint]) as group:
        write_array(group, "features", features, chunk_rows=64)
        write_array(group, "ids", np.array([f"s{k}" for k in range(n)]), chunk_rows=64)
    return dataset, store.open("embeddings", f"toy-{n}")


@pytest.mark.parametrize("refresh", ["exact", "incremental"])
def test_bins_on_a_cluster_and_in_this_process_are_the_same_bytes(tmp_path, client, monkeypatch, refresh):
    """BinsStage's classes through the runner, a first run and a refresh whose new rows touch
    every class (exact: every class re-binned; incremental: the new rows join the first run's
    bins): on the workers (a running client, classes in jobs of several), here on threads (no
    client, few rows) and here in class jobs one after the other (no client, rows over the
    inline limit) they write the same bins; the class counter reaches every class."""
    monkeypatch.setattr(stages, "JOBS_PER_THREAD", 1)  # 7 classes of ~43 rows on 2 threads: jobs of three classes
    rng = np.random.default_rng(0)
    classes, features = 7, rng.standard_normal((360, 8)).astype(np.float32)
    config = BinsConfig(num_bins=4, refresh=refresh)
    artifacts: dict[str, list] = {}
    for where in ("cluster", "threads", "jobs"):
        monkeypatch.setattr(stages, "BINS_INLINE_ROWS", 100 if where == "jobs" else 32_768)
        store = Store(str(tmp_path / where))
        for n in (300, 330, 360):
            dataset, embeddings = _toy_snapshot(store, features[:n], classes)
            counted = []
            stage = BinsStage(store, dataset, embeddings, config)
            artifacts.setdefault(where, []).append(stage.run(
                client=client if where == "cluster" else None, progress=lambda done, total, seen=counted: seen.append((done, total))))
            assert counted[-1] == (classes, classes) and sorted(stage.classes_rebinned) == list(range(classes))
    if refresh == "incremental":  # the refreshes joined: the first run's rows kept their bins
        first, joined, again = artifacts["cluster"]
        assert len(joined.record["inputs"]) == 3 and joined.group.attrs["joined_since_rebuild"] == 30
        assert again.group.attrs["joined_since_rebuild"] == 60
        assert (np.asarray(again["bin_of_sample"][:330]) == np.asarray(joined["bin_of_sample"][:])).all()
        assert (np.asarray(joined["bin_of_sample"][:300]) == np.asarray(first["bin_of_sample"][:])).all()
        # The first run kept each class's boundaries; both joins scored their new rows against
        # them alone (the rows joined before do not move them).
        directions, thresholds = np.asarray(first["join_directions"][:]), np.asarray(first["join_thresholds"][:])
        assert np.array_equal(np.asarray(again["join_directions"][:]), directions)
        assert np.array_equal(np.asarray(again["join_thresholds"][:]), thresholds, equal_nan=True)
        labels, bins = np.arange(360) % classes, np.asarray(again["bin_of_sample"][:])
        for i, c in enumerate(first.group.attrs["classes"]):
            old, new = np.flatnonzero(labels[:300] == c), 300 + np.flatnonzero(labels[300:] == c)
            made = join_boundaries(features[old], bins[old], 4)
            assert np.allclose(made.directions, directions[i]) and np.allclose(made.thresholds, thresholds[i], equal_nan=True)
            assert (bins[new] == join_rows(features[new], JoinBoundaries(directions[i], thresholds[i]))).all()
    for where in ("threads", "jobs"):
        for cluster, here in zip(artifacts["cluster"], artifacts[where]):
            assert (np.asarray(cluster["bin_of_sample"][:]) == np.asarray(here["bin_of_sample"][:])).all()
            assert cluster.record["content_digest"] == here.record["content_digest"]  # the record's other fields date the write
            assert ({k: v for k, v in cluster.group.attrs.items() if k != "dq"}
                    == {k: v for k, v in here.group.attrs.items() if k != "dq"})


def test_class_jobs_hold_a_share_of_the_smallest_workers_memory():
    """Class jobs are two per worker thread unless their features would exceed JOB_MEMORY_SHARE of
    the smallest worker's memory limit; without limits (or workers) CLASS_JOB_BYTES bounds them."""
    row_bytes = 1280 * 4
    with Client(processes=False, n_workers=2, threads_per_worker=1, memory_limit="1GiB", dashboard_address=":0") as limited:
        assert class_job_rows(limited, row_bytes, 1_000) == 250  # 4 jobs on 2 threads
        assert class_job_rows(limited, row_bytes, 10**6) == int(stages.JOB_MEMORY_SHARE * 2**30 // row_bytes)
    with Client(processes=False, n_workers=1, threads_per_worker=2, memory_limit=0, dashboard_address=":0") as unlimited:
        assert class_job_rows(unlimited, row_bytes, 10**6) == stages.CLASS_JOB_BYTES // row_bytes
    assert class_job_rows(None, row_bytes, 1_000) == 500  # no cluster yet: as one thread



def test_coverage_of_several_subsets_in_one_pass_on_the_cluster_is_each_ones_measured_alone(tmp_path, client):
    """Three subsets' coverage measured in one pass, here or in row ranges on the workers (their
    nearest distances combined by their minimum), is each subset's coverage measured alone in
    memory (dq_ops.coverage), and the pass counts every row once."""
    rng = np.random.default_rng(1)
    features = np.abs(rng.standard_normal((1_000, 8))).astype(np.float32)
    features[::97] = 0  # all-zero rows stay at distance sqrt(2) or 0
    store = Store(str(tmp_path))
    dataset, embeddings = _toy_snapshot(store, features, 7)
    labels = np.arange(1_000) % 7
    subsets = [np.sort(rng.choice(1_000, size, replace=False)) for size in (150, 40, 600)]
    bins = [np.arange(b, 1_000, 4) for b in range(4)]
    alone = [subset_coverage(features, labels, subset, bins).metrics() for subset in subsets]
    for where in ("here", "cluster"):
        seen = []
        measured = stages.subsets_coverage(store, embeddings, labels, subsets, bins,
                                           lambda done, total, seen=seen: seen.append((done, total)),
                                           client if where == "cluster" else None)
        assert seen[0] == (0, 1_000) and seen[-1] == (1_000, 1_000) and seen == sorted(seen)
        for one, reference in zip(measured, alone):
            assert one == pytest.approx(reference, rel=1e-5)
    assert len({one["coverage_mean"] for one in alone}) == 3 and min(one["bins_touched_min"] for one in alone) >= 1


def test_a_subsets_coverage_is_the_same_bytes_whichever_subsets_share_its_pass(tmp_path):
    """What a pass multiplies depends on the rows alone, so a subset measured with others or
    alone gets the same figures to the last bit: a subset recomputed alone (say after damage)
    writes the same coverage.json."""
    rng = np.random.default_rng(3)
    # Many classes of many columns: small products, whose rounding BLAS varies with their shape.
    features = np.maximum(rng.standard_normal((2_000, 1_280)), 0).astype(np.float32)
    store = Store(str(tmp_path))
    _, embeddings = _toy_snapshot(store, features, 50)
    labels = np.arange(2_000) % 50
    subsets = [np.sort(rng.choice(2_000, size, replace=False)) for size in (200, 1_200)]
    bins = [np.arange(b, 2_000, 2) for b in range(2)]
    together = stages.subsets_coverage(store, embeddings, labels, subsets, bins)
    for subset, measured in zip(subsets, together):
        assert stages.subsets_coverage(store, embeddings, labels, [subset], bins) == [measured]


def test_coverage_is_kept_beside_each_subset_and_measured_once(tmp_path):
    """measure_coverage measures the subsets without a coverage.json in one pass and keeps it
    there, outside the subset's fingerprint; asked again (another subset added), it measures only
    the new one. A subset drawn from other bins is refused by name."""
    rng = np.random.default_rng(2)
    features = rng.standard_normal((400, 8)).astype(np.float32)
    store = Store(str(tmp_path))
    dataset, embeddings = _toy_snapshot(store, features, 5)
    bins = BinsStage(store, dataset, embeddings, BinsConfig(num_bins=3)).run()
    drawn = [BaselineStage(store, dataset, embeddings, bins, "random", ratio, 0).run() for ratio in (0.1, 0.3)]
    passes = []

    def measure(subsets):
        return stages.measure_coverage(store, dataset, embeddings, bins, subsets, lambda done, total: passes.append(done))

    first = measure(drawn[:1])
    both = measure(drawn)
    assert passes.count(0) == 2 and both[0] == first[0]  # the second pass measured only the 30% subset
    assert store.open("subsets", drawn[0].name).fingerprint == drawn[0].fingerprint
    assert json.loads(store.read_sidecar("subsets", drawn[1].name, stages.COVERAGE_SIDECAR)) == both[1]
    assert measure(drawn) == both and passes.count(0) == 2  # nothing left to measure: no pass
    alone = subset_coverage(features, np.arange(400) % 5, np.asarray(drawn[1]["indices"][:]), stages.bins_as_lists(bins))
    assert both[1] == pytest.approx(alone.metrics(), rel=1e-5)
    other = BinsStage(store, dataset, embeddings, BinsConfig(num_bins=2)).run()
    with pytest.raises(DQInputError, match=f"{drawn[0].url} was not drawn from {other.url}"):
        stages.measure_coverage(store, dataset, embeddings, other, drawn[:1])
