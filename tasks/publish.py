"""Publishing a run: its :class:`~tasks.summary.RunSummary` turned into the markdown report (in
the store), the Prefect artifacts and the MLflow records. The one place a run shows itself.

The parent MLflow run's metrics sit at ``step`` = the run's index among the runs of its dataset
and settings (:attr:`~tasks.summary.RunSummary.schedule_step`); the same metrics go at the same
step to the schedule's one trend run (:func:`trend_key`), where each reads as a line over the
schedule's runs. Each arm's nested run has one step per evaluation seed.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from typing import Any

import fsspec
import zarr
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from dq_ops.config import DQConfig
from dq_ops.selection import CATEGORIES
from dq_ops.store import derive_key
from tasks.common import store_identity
from tasks.report import bin_gallery, bin_size_plot, bin_size_rows, render_report
from tasks.summary import RunSummary, SubsetRun
from tasks.tracking import Tracker

TREND_RUNS = 10  # runs of a dataset in its Prefect trend table


def dataset_key(prefix: str, dataset: str) -> str:
    """A per-dataset Prefect artifact key (keys allow lowercase letters, digits and dashes)."""
    return f"{prefix}-" + dataset.lower().replace("_", "-").replace(".", "-")


def publish_run(config: DQConfig, tracker: Tracker, summary: RunSummary, run_name: str) -> str:
    """Report, Prefect artifacts and MLflow records of ``summary``; returns the report's URL
    (``<store>/reports/<run name>.md``)."""
    step = summary.schedule_step
    for s in summary.subsets:
        _publish_selection(tracker, s)
    _log_evaluations(config, tracker, summary, step)
    metrics = run_metrics(summary)
    tracker.log_metrics(metrics, step=step)
    trend_run = tracker.log_trend(trend_key(summary), f"trend · {config.dataset.name}", {
        "dq_dataset": config.dataset.name, "dq_store": store_identity(summary.store_url),
        "dq_selection": summary.schedule.key,
    }, metrics, step)
    tracker.set_tags({"dq_snapshot": summary.dataset.name})
    gallery = _publish_gallery(tracker, summary)
    report = render_report(config, summary, tracker.run_url, gallery)
    report_url = f"{config.store_url.rstrip('/')}/reports/{run_name}.md"
    with fsspec.open(report_url, "w", auto_mkdir=True) as fh:
        fh.write(report)
    create_markdown_artifact(report, key=dataset_key("dq-report", config.dataset.name),
                             description=f"Dataset Quantization report: {config.dataset.name}")
    bin_sizes = bin_size_rows(summary.bins.summary["classes"], summary.bins.summary["bin_sizes"], summary.class_names)
    create_table_artifact(bin_sizes, key="dq-bin-sizes", description="Samples per class and bin")
    create_link_artifact(tracker.run_url, link_text="MLflow run", key="dq-mlflow-run")
    create_link_artifact(tracker.url_of(trend_run), link_text="MLflow trend of this schedule", key="dq-mlflow-trend")
    create_table_artifact(trend_rows(tracker.recent_runs(config.dataset.name, TREND_RUNS), config.sampling.ratios),
                          key=dataset_key("dq-trend", config.dataset.name),
                          description=f"The last {TREND_RUNS} runs of {config.dataset.name}, oldest first")
    tracker.log_text(report, "report.md")
    tracker.log_bytes(bin_size_plot(bin_sizes), "plots/bin_sizes.png")
    for s in summary.subsets:
        _log_id_manifest(tracker, s.subset.open()["ids"], f"manifests/subset_r{s.ratio}_ids.txt")
        if s.reconstruction:
            tracker.log_bytes(s.reconstruction.open()["preview_png"][:].tobytes(), f"pictures/reconstruction_r{s.ratio}.png")
    return report_url


def trend_key(summary: RunSummary) -> str:
    """The schedule a run belongs to, as its trend run's ``dq_trend`` tag: its store and the
    selection history that numbers its steps (:attr:`~tasks.summary.RunSummary.schedule`), so
    the trend's steps are that history's; ``<dataset>-<16 hex digits>``."""
    selection = summary.schedule.key
    dataset = summary.dataset.summary["dataset"]
    return f"{dataset}-{derive_key('trend', {'store': store_identity(summary.store_url), 'selection': selection})}"


def run_metrics(summary: RunSummary) -> dict[str, float]:
    """The parent run's metrics: timings, sizes, what this run computed, and per keep ratio the
    selection diff, coverage, paired gaps, arm accuracies and (patches on) bytes and PSNR."""
    metrics = {f"time_{stage}_s": seconds for stage, seconds in summary.timings_s.items()}
    metrics["train_samples"] = summary.train_size
    metrics["embedded_samples"] = summary.embedded_samples
    metrics["classes_rebinned"] = len(summary.classes_rebinned)
    for s in summary.subsets:
        r, diff = s.ratio, s.selection.diff
        metrics[f"subset_size_r{r}"] = s.size
        metrics[f"sample_keep_ratio_r{r}"] = summary.sample_keep_ratio(s)
        metrics |= {f"selection_{k}_r{r}": n for k, n in diff.counts().items()} | {f"selection_churn_r{r}": diff.churn}
        metrics |= {f"coverage_{stat}_{arm}_r{r}": s.coverage[arm][f"coverage_{stat}"]
                    for arm in ("dq", "random") for stat in ("mean", "p95")}
        for gap in s.gaps:
            prefix = f"gap_{gap.arm}_vs_{gap.reference}_r{r}"
            metrics[f"{prefix}_mean"] = gap.mean
            if gap.ci_low is not None:  # no interval for one seed
                metrics |= {f"{prefix}_ci_low": gap.ci_low, f"{prefix}_ci_high": gap.ci_high}
        if s.patches:
            p = s.patches.summary | s.psnr()
            metrics |= {
                f"stored_bytes_r{r}": p["stored_bytes"],
                f"whole_image_bytes_r{r}": p["whole_image_bytes"],
                f"byte_ratio_r{r}": p["byte_ratio"],
                f"storage_keep_ratio_r{r}": p["keep_ratio"],
                f"psnr_mae_db_r{r}": p["psnr_mae_db"],
                f"psnr_zero_fill_db_r{r}": p["psnr_zero_fill_db"],
            }
    for row in [e for s in summary.subsets for e in s.evaluation] + summary.full:
        metrics |= {f"accuracy_{row.arm}_r{row.ratio}_mean": row.mean, f"accuracy_{row.arm}_r{row.ratio}_std": row.std}
    return metrics


def trend_rows(runs: list[dict[str, Any]], ratios: list[float]) -> list[dict[str, Any]]:
    """One row per run (``Tracker.recent_runs``), oldest first: date, run, snapshot, train samples,
    samples embedded, and per keep ratio the selection churn and DQ − random (points; — without
    evaluation)."""
    rows = []
    for run in reversed(runs):
        metrics = run["metrics"]
        row = {"date": datetime.fromtimestamp(run["start_time"] / 1000, UTC).isoformat(timespec="seconds"),
               "run": run["name"], "snapshot": run["tags"].get("dq_snapshot", "—"),
               "samples": _count(metrics.get("train_samples")), "embedded": _count(metrics.get("embedded_samples"))}
        for r in ratios:
            churn, gap = metrics.get(f"selection_churn_r{r}"), metrics.get(f"gap_dq_vs_random_r{r}_mean")
            row[f"churn @{r:.1%}"] = "—" if churn is None else f"{churn:.2%}"
            row[f"DQ − random @{r:.1%}"] = "—" if gap is None else f"{100 * gap:+.2f}"
        rows.append(row)
    return rows


def _count(value: float | None) -> int | str:
    return "—" if value is None else int(value)


def _publish_selection(tracker: Tracker, s: SubsetRun) -> None:
    """The per-class diff as a Prefect table and, after a first run, the id lists in MLflow
    (``selection/diff_r<ratio>.json``, the same keys as the store's diff file)."""
    diff = s.selection.diff
    if diff.previous is not None:
        tracker.log_text(json.dumps(diff.to_json(), indent=1), f"selection/diff_r{s.ratio}.json")
    create_table_artifact(diff.rows() or [{"class": "(none)"} | dict.fromkeys(CATEGORIES, 0)],
                          key=f"dq-selection-diff-r{int(round(s.ratio * 1000))}", description=_diff_description(s))


def _diff_description(s: SubsetRun) -> str:
    diff, ratio = s.selection.diff, s.ratio
    if diff.status == "first run":
        return f"Selection at {ratio:.1%}: first run of these settings"
    if diff.status == "changed":
        return f"Selection at {ratio:.1%} vs the previous run ({diff.previous}): {_counts(diff.counts())}, churn {diff.churn:.2%}"
    last = s.selection.last_change
    since = f"; last change {last['at']} (run {last['run']}): {_counts(last)}" if last else ""
    return f"Selection at {ratio:.1%}: no change since the previous run{since}"


def _counts(counts: dict) -> str:
    return f"+{counts['added']} −{counts['removed']}, {counts['modified']} modified, {counts['relabeled']} relabelled"


def _log_evaluations(config: DQConfig, tracker: Tracker, summary: RunSummary, step: int) -> None:
    """One nested MLflow run per (arm, keep ratio): its settings, a step per seed, the mean and std."""
    for row in [e for s in summary.subsets for e in s.evaluation] + summary.full:
        run_id = tracker.nested_run(row.label, {
            "arm": row.arm, "ratio": row.ratio, "architecture": config.evaluation.architecture, "seeds": row.seeds,
            "subsets": sorted({url or "full split" for url in row.draws}), "reconstructed_images": row.arm == "dq_pixels",
        })
        for seed_step, (test, val) in enumerate(zip(row.accuracies, row.val_accuracies)):
            tracker.log_metrics({"test_accuracy": test, "val_accuracy": val}, run_id=run_id, step=seed_step)
        tracker.log_metrics({"test_accuracy_mean": row.mean, "test_accuracy_std": row.std,
                             "train_seconds_mean": row.train_seconds, "samples": row.size}, run_id=run_id)
        tracker.finish(run_id)


def _publish_gallery(tracker: Tracker, summary: RunSummary) -> str:
    """What the bins hold, in MLflow and Prefect; returns where the report points to."""
    gallery = bin_gallery(summary.dataset.open(), summary.bins.open(), summary.class_names)
    if isinstance(gallery, bytes):
        tracker.log_bytes(gallery, "pictures/bin_gallery.png")
        gallery_url = f"{tracker.run_url}/artifacts/pictures/bin_gallery.png"
        create_link_artifact(gallery_url, link_text="Bin gallery (MLflow)", key="dq-bin-gallery")
        return f"[bin gallery]({gallery_url}) (MLflow artifact `pictures/bin_gallery.png`)"
    create_table_artifact(gallery, key="dq-bin-examples", description="Example records per bin")
    tracker.log_text(json.dumps(gallery, indent=1, ensure_ascii=False), "tables/bin_examples.json")
    return "Prefect table artifact `dq-bin-examples` (MLflow: `tables/bin_examples.json`)"


def _log_id_manifest(tracker: Tracker, ids: zarr.Array, artifact_file: str) -> None:
    """Log a subset's sample ids, one per line, streamed chunk by chunk into a temporary file
    (a subset of an ImageNet-sized dataset has hundreds of thousands of ids)."""
    directory, _, filename = artifact_file.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, filename)
        with open(path, "w") as fh:
            step = ids.chunks[0]
            for start in range(0, ids.shape[0], step):
                fh.writelines(f"{i}\n" for i in ids[start:start + step])
        tracker.log_file(path, directory)
