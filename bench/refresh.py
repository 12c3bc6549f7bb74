"""Re-quantizing a refreshed Fashion-MNIST: what a nightly refresh costs against the first run.

A first ``dq run`` on Fashion-MNIST with 1% of the training images held back (all from classes
0–2: new images of a few categories); then the source (an ``.npz`` with sample names, rewritten
in place) gains those 1% and loses 0.5% (from classes 3–4); then an unchanged re-run. Classes
5–9 are untouched, and their selection must not move. Pixel stages and evaluation are off: the benchmark is about the selection.
Both bin refresh modes run, each on its own dataset name in one store (the incremental mode's
first run reuses the exact mode's embeddings by content, which is the point of the store).

Prints per stage the refresh time against the first run, samples embedded, classes re-binned,
the selection's churn (overall and in classes the change did not touch) and the wall time of
the unchanged re-run. Every ``dq run`` is a real CLI subprocess against a local Prefect server
that this script starts (or finds) before the first timed run and stops at the end (unless
``--keep-server``); ``PREFECT_SERVER_API_PORT`` picks its port.

    python bench/refresh.py [--limit N] [--store DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dq_ops.readers.idx import FASHION_MNIST_CLASSES, load_fashion_mnist  # noqa: E402

STAGES = ("ingest", "embeddings", "bins", "sampling")


def write_source(path: Path, rows: np.ndarray) -> None:
    images, labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    np.savez(path, x_train=images[rows], y_train=labels[rows], ids_train=np.array([f"fm-{r}" for r in rows]),
             x_test=test_images, y_test=test_labels, class_names=np.array(FASHION_MNIST_CLASSES))


def dq_run(config: dict, folder: Path, label: str) -> tuple[float, dict]:
    """One `dq run` subprocess; its wall time and the MLflow metrics of the run it made."""
    path = folder / f"{label}.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.cli", "run", str(path)], check=True, stdout=subprocess.DEVNULL,
                   cwd=Path(__file__).resolve().parents[1])
    wall = time.perf_counter() - started
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{config['store_url']}/mlflow.db")
    experiment = client.get_experiment_by_name("dq")
    run = client.search_runs([experiment.experiment_id], filter_string="tags.dq_role = 'flow'",
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    return wall, run.data.metrics


def latest_diff(store: str, name: str) -> dict:
    """The selection diff written beside the newest subset of dataset ``name``."""
    diffs = sorted(Path(store, "subsets").glob("*/selection_diff-from-*.json"), key=lambda p: p.stat().st_mtime)
    for path in reversed(diffs):
        attrs = json.loads((path.parent / "zarr.json").read_text())["attributes"]
        if attrs["dataset"].startswith(f"{name}-"):
            return json.loads(path.read_text())
    raise SystemExit(f"no selection diff for {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=60_000, help="training images in the full source (default: all)")
    parser.add_argument("--store", help="store folder (default: a temporary one)")
    parser.add_argument("--keep-server", action="store_true", help="leave the local Prefect server running")
    args = parser.parse_args()
    os.environ.pop("DQ_PREFECT_SERVER", None)
    from flows.server import use_local_server

    use_local_server()  # started untimed; the runs inherit its PREFECT_API_URL

    folder = Path(tempfile.mkdtemp(prefix="dq-refresh-"))
    store = args.store or str(folder / "store")
    rng = np.random.default_rng(0)
    everything = np.arange(args.limit)
    _, labels = load_fashion_mnist("train")
    labels = labels[: args.limit]
    held_back = np.sort(rng.choice(everything[labels <= 2], size=args.limit // 100, replace=False))
    first_rows = np.setdiff1d(everything, held_back)
    removable = first_rows[(labels[first_rows] == 3) | (labels[first_rows] == 4)]
    removed = np.sort(rng.choice(removable, size=args.limit // 200, replace=False))
    refreshed_rows = np.sort(np.concatenate([np.setdiff1d(first_rows, removed), held_back]))
    touched = {FASHION_MNIST_CLASSES[c] for c in set(labels[held_back].tolist()) | set(labels[removed].tolist())}
    changed_share = (len(held_back) + len(removed)) / len(first_rows)

    results = {}
    try:
        for mode in ("exact", "incremental"):
            source = folder / f"{mode}.npz"
            write_source(source, first_rows)
            config = {
                "store_url": store,
                "dataset": {"format": "npz", "url": str(source), "name": f"fm-{mode}"},
                "bins": {"refresh": mode},
                "patches": {"enabled": False},
                "evaluation": {"enabled": False},
                "cluster": {"kind": "local", "n_workers": 1, "threads_per_worker": 2},
            }
            first = dq_run(config, folder, f"{mode}-first")
            write_source(source, refreshed_rows)
            refresh = dq_run(config, folder, f"{mode}-refresh")
            diff = latest_diff(store, f"fm-{mode}")
            unchanged = dq_run(config, folder, f"{mode}-unchanged")
            results[mode] = (first, refresh, diff, unchanged)
    finally:
        if not args.keep_server:
            subprocess.run([sys.executable, "-m", "prefect", "server", "stop"], stdout=subprocess.DEVNULL, check=False)

    load = os.getloadavg()
    print(f"refresh bench: Fashion-MNIST, {len(first_rows):,} training images first, then +{len(held_back):,} "
          f"(1%) −{len(removed):,} (0.5%); {len(touched)} of 10 classes touched; load average {load[0]:.1f}")
    (first_wall, first_m), (refresh_wall, refresh_m), diff, (unchanged_wall, unchanged_m) = results["exact"]
    print(f"\n{'stage':<12}{'first run':>12}{'refresh':>12}{'ratio':>8}")
    for stage in STAGES:
        a, b = first_m.get(f"time_{stage}_s", 0.0), refresh_m.get(f"time_{stage}_s", 0.0)
        print(f"{stage:<12}{a:>11.1f}s{b:>11.1f}s{b / a if a else 0:>8.2f}")
    print(f"{'dq run wall':<12}{first_wall:>11.1f}s{refresh_wall:>11.1f}s{refresh_wall / first_wall:>8.2f}")
    print(f"\nsamples embedded: first {first_m['embedded_samples']:,.0f}, refresh {refresh_m['embedded_samples']:,.0f} "
          f"(new: {len(held_back):,}), unchanged {unchanged_m['embedded_samples']:,.0f}")
    print(f"classes re-binned on refresh: {refresh_m['classes_rebinned']:.0f}")
    print(f"unchanged re-run: {unchanged_wall:.1f}s wall (Prefect start included)")
    print(f"\n{'bins.refresh':<14}{'churn':>8}{'churn / changed share':>24}{'churn in untouched classes':>28}")
    for mode, (_, _, diff, _) in results.items():
        untouched = sum(n.get("removed", 0) for c, n in diff["per_class"].items() if c not in touched)
        print(f"{mode:<14}{diff['churn']:>8.2%}{diff['churn'] / changed_share:>24.2f}"
              f"{untouched:>28}")


if __name__ == "__main__":
    main()
