"""Peak memory of a DQ run at two dataset sizes: the flow process and every dask worker.

For each size (``--sizes``, default 10 000 and 60 000 Fashion-MNIST training images) the bench
starts a fresh ``dask scheduler`` and ``--workers`` single-threaded ``dask worker`` processes on
loopback, then runs the whole flow (ingest → embeddings → bins → sampling → Grad-CAM++ patch
dropping → MAE → reconstruction; evaluation off) in a child process with ``cluster.kind:
address``, into a fresh store. Peaks are each process's own ``ru_maxrss`` (the kernel's
high-water mark of its resident set): the flow child reports its own at exit (and its MLflow
tracking process's, the largest child it waited for), each worker
reports its own through ``client.run`` before the cluster is stopped. The Prefect server the
flow starts runs in a separate process and is not counted.

Settings keep the run within minutes on 2 CPU cores while every stage still scales with the
dataset: a small backbone with random weights (``timm:mobilenetv3_small_050``; memory does not
depend on the weights) for embeddings at 32 px and Grad-CAM++ at 64 px, keep ratio 10%, an MAE
of one epoch on 2 000 images. Prints a table and the 60k/10k ratio of the flow process's peak.

``--evaluate`` measures evaluation training instead: keep ratio 50%, no pixel stages, arms
``dq`` and ``full`` trained with ``small_cnn`` for 50 steps (``--window-mb``: the evaluation's
shuffle window; default: the configured one). The flow runs twice on the same cluster and
store: first with evaluation off (ingest, embeddings, bins, subsets), then, after
``client.restart()`` has given every worker a fresh process, with evaluation on; only the
trainings compute in the second run, so the workers' peaks are those of training.

Usage: ``PYTHONPATH=$PWD .venv/bin/python bench/memory.py [--sizes 10000 60000] [--workers 2]
[--evaluate [--window-mb 2]]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DASK = str(Path(sys.executable).parent / "dask")


def _config(store_url: str, address: str, limit: int) -> dict:
    return {
        "store_url": store_url,
        "dataset": {"limit": limit},
        "sampling": {"ratios": [0.1]},
        "embedding": {"backbone": "timm:mobilenetv3_small_050", "weights": "random", "batch_size": 256},
        "patches": {"cam_image_size": 64, "mae_epochs": 1, "mae_train_samples": 2000},
        "evaluation": {"enabled": False},
        "cluster": {"kind": "address", "address": address},
    }


def _evaluation_configs(store_url: str, address: str, limit: int, window_mb: float | None) -> tuple[dict, dict]:
    """(the preparing run's config, the training run's config) of ``--evaluate``."""
    prepare = _config(store_url, address, limit) | {"sampling": {"ratios": [0.5]}, "patches": {"enabled": False}}
    evaluation = {"enabled": True, "arms": ["dq", "full"], "architecture": "small_cnn",
                  "epochs": 0.1, "min_steps": 50, "max_steps": 50}
    if window_mb is not None:
        evaluation["shuffle_window_mb"] = window_mb
    return prepare, prepare | {"evaluation": evaluation}


def run_flow_child(config_path: str, peak_path: str) -> None:
    """The measured flow process: run the flow in this process, then record its own peak RSS."""
    from tasks.common import set_offline_env

    set_offline_env()  # before Prefect starts its server: no telemetry
    from dq_ops.config import DQConfig
    from flows.quantize import quantize

    started = time.perf_counter()
    summary = quantize(DQConfig.model_validate(json.loads(Path(config_path).read_text())))
    Path(peak_path).write_text(json.dumps({
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        # The largest child the flow waited for: its MLflow tracking process (tasks.tracking).
        "tracking_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "seconds": time.perf_counter() - started,
        "timings_s": summary["timings_s"],
        "subset": summary["subsets"][0]["size"],
    }))


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([DASK, *args], stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=REPO)


def _worker_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_flow(config: dict, folder: Path, log: str) -> dict:
    """One flow run in a child process; its own peak RSS and timings."""
    config_path, peak_path = folder / "config.json", folder / "peak.json"
    config_path.write_text(json.dumps(config))
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, __file__, "--flow-child", str(config_path), str(peak_path)],
                   check=True, env=env, cwd=REPO, stdout=(folder / log).open("wb"), stderr=subprocess.STDOUT)
    return json.loads(peak_path.read_text())


def measure(limit: int, workers: int, folder: Path, evaluate: bool, window_mb: float | None) -> dict:
    """One size: a fresh cluster, one flow run (``evaluate``: a preparing run, fresh worker
    processes, then the training run), the peaks."""
    from distributed import Client

    scheduler_file = folder / "scheduler.json"
    common = ["--no-dashboard", "--host", "127.0.0.1"]
    processes = [_start(["scheduler", "--port", "0", "--scheduler-file", str(scheduler_file), *common], folder / "scheduler.log")]
    try:
        while not scheduler_file.exists():
            time.sleep(0.2)
        for w in range(workers):
            processes.append(_start(["worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
                                     "--name", f"worker-{w}", "--local-directory", str(folder / f"w{w}"), *common],
                                    folder / f"worker-{w}.log"))
        address = json.loads(scheduler_file.read_text())["address"]
        with Client(address) as client:
            client.wait_for_workers(workers, timeout=300)
        store_url = str(folder / "store")
        if evaluate:
            prepare, train = _evaluation_configs(store_url, address, limit, window_mb)
            _run_flow(prepare, folder, "prepare.log")
            with Client(address) as client:
                client.restart(wait_for_workers=True)
            flow = _run_flow(train, folder, "flow.log")
        else:
            flow = _run_flow(_config(store_url, address, limit), folder, "flow.log")
        with Client(address) as client:
            worker_peaks = client.run(_worker_peak_mb)
        return flow | {"workers_mb": sorted(worker_peaks.values())}
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 60_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--evaluate", action="store_true", help="measure evaluation training (see the docstring)")
    parser.add_argument("--window-mb", type=float, help="--evaluate: evaluation.shuffle_window_mb")
    parser.add_argument("--flow-child", nargs=2, metavar=("CONFIG", "PEAK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flow_child:
        run_flow_child(*args.flow_child)
        return
    print(f"load before: {os.getloadavg()}")
    results = {}
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            results[size] = measure(size, args.workers, Path(tmp), args.evaluate, args.window_mb)
        r = results[size]
        print(f"{size} images done in {r['seconds']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in r['timings_s'].items())})",
              flush=True)
    print(f"load after: {os.getloadavg()}")
    workers = "training worker" if args.evaluate else "worker"
    print(f"\n| images | subset | flow process peak RSS | its MLflow process | {workers} peak RSS ({args.workers} workers) "
          "| wall |")
    print("|---|---|---|---|---|---|")
    for size, r in results.items():
        print(f"| {size:,} | {r['subset']:,} | {r['peak_rss_mb']:.0f} MB | {r['tracking_rss_mb']:.0f} MB | "
              f"{' / '.join(f'{w:.0f}' for w in r['workers_mb'])} MB | {r['seconds']:.0f} s |")
    if len(results) >= 2:
        small, large = args.sizes[0], args.sizes[-1]
        print(f"\nflow process peak, {large:,}/{small:,}: "
              f"{results[large]['peak_rss_mb'] / results[small]['peak_rss_mb']:.2f}×; "
              f"largest worker peak: {max(results[large]['workers_mb']) / max(results[small]['workers_mb']):.2f}×")


if __name__ == "__main__":
    main()
