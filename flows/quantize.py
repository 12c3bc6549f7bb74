"""The quantization flow: ingest → embeddings → bins → sampling (→ pixel stages → evaluation).

Every stage is a cached task that takes and returns store URLs + fingerprints. A second run with
nothing changed is served from the cache; a new keep ratio re-runs only sampling and what follows.
Entrypoint for ``prefect.yaml``: ``flows/quantize.py:quantize``.
"""

# No ``from __future__ import annotations`` here: ``Flow.serve`` ships the flow to its run process
# with cloudpickle, which keeps only the globals the function body names, so a string annotation
# ``"DQConfig"`` could not be resolved there and every served run failed parameter validation.
import json
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fsspec
import zarr
from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from dq_ops.cluster import cluster_precision
from dq_ops.config import DQConfig
from dq_ops.paired import paired_gap, summarize_accuracies
from dq_ops.preflight import preflight
from dq_ops.runs import RunRecord, record_run, remove_run_record
from dq_ops.selection import CATEGORIES
from dq_ops.store import QUANTIZED_SPLIT, Store
from tasks.bins import generate_bins_task
from tasks.cluster import close_dask_clients
from tasks.common import StageResult, set_offline_env
from tasks.crashes import close_crashed_runs
from tasks.embeddings import compute_embeddings
from tasks.evaluation import evaluate_arm, evaluate_text_arm
from tasks.ingest import ingest_dataset
from tasks.patches import drop_patches, prepare_mae, reconstruct_patches
from tasks.report import bin_gallery, bin_size_plot, bin_size_rows, render_report
from tasks.sampling import baseline_subset, sample_subset
from tasks.selection import publish_selection_diff
from tasks.tracking import Tracker


def _run_name() -> str:
    return f"dq-{flow_run.parameters['config'].dataset.name}-{time.strftime('%Y%m%d-%H%M%S')}"


@flow(name="dataset-quantization", flow_run_name=_run_name, log_prints=True)
def quantize(config: DQConfig = DQConfig()) -> dict[str, Any]:
    """Quantize ``config.dataset`` into bins and draw a subset at every keep ratio.

    Returns a summary (artifact URLs, fingerprints, sizes, timings) that the CLI prints.
    """
    set_offline_env()
    logger = get_run_logger()
    store_url, store = config.store_url, Store(config.store_url)
    tracker = Tracker(
        config, run_name=flow_run.get_name() or "dq",
        tags={"prefect.flow_run_id": str(flow_run.get_id()), "dq_role": "flow"},
    )
    timings: dict[str, float] = defaultdict(float)
    recorded: RunRecord | None = None

    @contextmanager
    def timed(stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        timings[stage] += time.perf_counter() - start

    try:
        precision = cluster_precision(config.cluster)
        with timed("ingest"):
            dataset = ingest_dataset(config.dataset, store_url)
        preflight(config, dataset.open())  # what the data must allow, before the expensive stages
        tracker.wait()  # and a reachable MLflow (it connected while ingest ran)
        # From here on the run is recorded in the store (how a later run tells it crashed), not
        # before: a run stopped by its input or its settings leaves the store as it was.
        recorded = record_run(store, str(flow_run.get_id()), flow_run.get_name() or "dq")
        crashed = close_crashed_runs(store, tracker)
        if crashed:
            logger.warning(crashed)
        with timed("embeddings"):
            embeddings = compute_embeddings(
                store_url, dataset, QUANTIZED_SPLIT, config.embedding, config.seed, precision, config.cluster
            )
        with timed("bins"):
            bins = generate_bins_task(store_url, dataset, embeddings, config.bins, config.cluster)
        evaluate = config.evaluation.enabled
        pixels = config.patches.enabled and dataset.summary["modality"] == "images"
        test_embeddings = mae = None
        if evaluate and dataset.summary["modality"] == "texts":
            with timed("embeddings"):
                test_embeddings = compute_embeddings(
                    store_url, dataset, "test", config.embedding, config.seed, precision, config.cluster
                )
        if pixels:
            with timed("mae"):
                mae = prepare_mae(store_url, dataset, config.patches, config.seed, config.cluster)

        subsets: list[dict[str, Any]] = []
        for ratio in config.sampling.ratios:
            with timed("sampling"):
                subset = sample_subset(store_url, dataset, embeddings, bins, ratio, config.seed, config.sampling)
                # coverage of a random draw of the same per-class sizes: what the DQ subset's is compared with
                random = baseline_subset(store_url, dataset, embeddings, bins, "random", ratio, config.seed)
            entry: dict[str, Any] = {
                "ratio": ratio, "dq": subset, "evaluation": [], "gaps": [], "patches": None,
                "coverage": {"dq": subset.summary["coverage"], "random": random.summary["coverage"]},
            }
            entry["diff"], entry["since"] = publish_selection_diff(store_url, dataset, embeddings, bins, subset, tracker,
                                                                   flow_run.get_name() or tracker.run_id)
            if pixels:
                with timed("patches"):
                    patches = drop_patches(store_url, dataset, subset, config.patches, config.embedding, config.cluster)
                with timed("reconstruction"):
                    reconstruction = reconstruct_patches(store_url, dataset, patches, mae, config.cluster)
                entry["patches"] = patches.summary | {
                    "url": patches.url, "reconstruction_url": reconstruction.url, "mae_final_loss": mae.summary["final_loss"],
                } | {k: v for k, v in reconstruction.summary.items() if k.startswith("psnr_")}
            if evaluate:
                with timed("evaluation"):
                    draws = _draw_arms(config, dataset, embeddings, bins, ratio, subset, mae if pixels else None)
                    entry["evaluation"] = _evaluate(config, tracker, dataset, ratio, draws, (embeddings, test_embeddings))
                    entry["gaps"] = _log_gaps(tracker, ratio, entry["evaluation"])
            subsets.append(entry)
        full = []
        if evaluate and "full" in config.evaluation.arms:
            with timed("evaluation"):
                draws = {"full": [Draw(seed, None) for seed in config.evaluation.seeds]}
                full = _evaluate(config, tracker, dataset, 1.0, draws, (embeddings, test_embeddings))
        summary = _summarise(config, dataset, embeddings, bins, subsets, dict(timings))
        summary["embedded_samples"] = sum(
            e.summary["embedded_samples"] for e in (embeddings, test_embeddings) if e is not None and e.computed_now()
        )
        summary["classes_rebinned"] = bins.summary["classes_rebinned"] if bins.computed_now() else []
        summary["full"] = full
        summary |= {"tracking_uri": tracker.uri, "mlflow_run_id": tracker.run_id}
        summary["report_path"] = _publish(config, tracker, summary)
        logger.info("Quantized %s: %s", config.dataset.name, ", ".join(
            f"{s['ratio']:.0%} → {s['size']} samples" for s in summary["subsets"]
        ))
        tracker.finish()
        return summary
    except BaseException:
        if tracker.connected():  # else the run's own error is the one to report
            tracker.finish(status="FAILED")
        raise
    finally:
        close_dask_clients()
        tracker.close()
        if recorded is not None:
            remove_run_record(store, recorded.flow_run_id)


@dataclass(frozen=True)
class Draw:
    """What one (arm, seed) training reads: the subset drawn for it (None: the whole split) and,
    for ``dq_pixels``, the reconstruction of that subset's dropped patches."""

    seed: int
    subset: StageResult | None
    images: StageResult | None = None


def _draw_arms(
    config: DQConfig, dataset: StageResult, embeddings: StageResult, bins: StageResult, ratio: float,
    published: StageResult, mae: StageResult | None,
) -> dict[str, list[Draw]]:
    """Per arm, one draw per evaluation seed s (paired draws).

    ``dq`` and ``dq_pixels`` share the DQ draw of seed s (the published subset when s is the config
    seed), ``random`` draws with seed s; k-center and herding are deterministic selections drawn once
    (config seed) and reused. ``dq_pixels`` trains on the MAE reconstruction of *its own* draw, so
    patch dropping + reconstruction run once per seed: its gap to ``dq`` at the same seed is the
    pixel stage's cost alone, on identical samples. Without an MAE (text data, patches disabled)
    ``dq_pixels`` is skipped. Every draw is a ``subsets/<key>`` artifact (method, ratio, seed).
    """
    store_url, arms = config.store_url, config.evaluation.arms
    draws: dict[str, list[Draw]] = {arm: [] for arm in arms if arm != "full" and (arm != "dq_pixels" or mae is not None)}
    if "dq_pixels" in arms and mae is None:
        get_run_logger().warning("evaluation arm 'dq_pixels' skipped: it needs an image dataset with patches enabled")
    for seed in config.evaluation.seeds:
        dq = published if seed == config.seed else sample_subset(
            store_url, dataset, embeddings, bins, ratio, seed, config.sampling)
        for arm in draws:
            if arm == "dq":
                draws[arm].append(Draw(seed, dq))
            elif arm == "dq_pixels":
                patches = drop_patches(store_url, dataset, dq, config.patches, config.embedding, config.cluster)
                draws[arm].append(Draw(seed, dq, reconstruct_patches(store_url, dataset, patches, mae, config.cluster)))
            else:
                draw_seed = seed if arm == "random" else config.seed
                draws[arm].append(Draw(seed, baseline_subset(store_url, dataset, embeddings, bins, arm, ratio, draw_seed)))
    return draws


def _evaluate(
    config: DQConfig, tracker: Tracker, dataset: StageResult, ratio: float, draws: dict[str, list[Draw]],
    embeddings: tuple[StageResult, StageResult | None],
) -> list[dict[str, Any]]:
    """Train every (arm, seed) at once (each one task on the dask cluster; text: one fit per draw),
    then log each arm as a nested MLflow run from the flow's process. One row per arm."""
    texts = dataset.summary["modality"] == "texts"
    text_fits: dict[str | None, Any] = {}  # a text fit is deterministic: one per distinct subset

    def submit(arm: str, draw: Draw) -> Any:
        if not texts:
            return evaluate_arm.submit(config.store_url, dataset, _label(arm, ratio), draw.subset, config.evaluation,
                                       draw.seed, draw.images, config.cluster)
        key = draw.subset.url if draw.subset else None
        if key not in text_fits:
            text_fits[key] = evaluate_text_arm.submit(config.store_url, dataset, _label(arm, ratio), draw.subset, *embeddings)
        return text_fits[key]

    futures = {arm: [submit(arm, d) for d in arm_draws] for arm, arm_draws in draws.items()}
    rows = []
    for arm, arm_futures in futures.items():
        runs = [future.result() for future in arm_futures]
        accuracies = [run.summary["test_accuracy"] for run in runs]
        stats = summarize_accuracies({arm: accuracies})[arm]
        seeds = [d.seed for d in draws[arm]]
        row = {
            "arm": arm, "ratio": ratio, "size": runs[0].summary["n_train"] + runs[0].summary["n_val"],
            "seeds": seeds, "accuracies": accuracies, "mean": stats.mean, "std": stats.std,
            "draws": [d.subset.url if d.subset else None for d in draws[arm]],
            "evaluations": [run.url for run in runs],
            "train_seconds": sum(run.summary["train_seconds"] for run in runs) / len(runs),
        }
        run_id = tracker.nested_run(_label(arm, ratio), {
            "arm": arm, "ratio": ratio, "architecture": config.evaluation.architecture, "seeds": seeds,
            "subsets": sorted({url or "full split" for url in row["draws"]}), "reconstructed_images": arm == "dq_pixels",
        })
        for step, run in enumerate(runs):
            tracker.log_metrics({"test_accuracy": run.summary["test_accuracy"],
                                 "val_accuracy": run.summary["val_accuracy"]}, run_id=run_id, step=step)
        tracker.log_metrics({"test_accuracy_mean": stats.mean, "test_accuracy_std": stats.std,
                             "train_seconds_mean": row["train_seconds"], "samples": row["size"]}, run_id=run_id)
        tracker.finish(run_id)
        tracker.log_metrics({f"accuracy_{arm}_r{ratio}_mean": stats.mean, f"accuracy_{arm}_r{ratio}_std": stats.std})
        rows.append(row)
    return rows


def _label(arm: str, ratio: float) -> str:
    return arm if arm == "full" else f"{arm}@{ratio:.0%}"


# Paired comparisons the report states: (arm, reference arm).
GAPS = (("dq", "random"), ("dq_pixels", "dq"))


def _log_gaps(tracker: Tracker, ratio: float, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Paired gaps (same seeds) with their 95% t-intervals, as parent-run metrics
    ``gap_{arm}_vs_{reference}_r{ratio}_mean/_ci_low/_ci_high`` (fractions; no interval for one seed)."""
    by_arm = {row["arm"]: row for row in rows}
    gaps = []
    for arm, reference in GAPS:
        if arm in by_arm and reference in by_arm:
            gap = paired_gap(by_arm[arm]["accuracies"], by_arm[reference]["accuracies"])
            prefix = f"gap_{arm}_vs_{reference}_r{ratio}"
            metrics = {f"{prefix}_mean": gap.mean}
            if gap.ci_low is not None:
                metrics |= {f"{prefix}_ci_low": gap.ci_low, f"{prefix}_ci_high": gap.ci_high}
            tracker.log_metrics(metrics)
            gaps.append({"arm": arm, "reference": reference, "ratio": ratio, "mean": gap.mean, "ci_low": gap.ci_low,
                         "ci_high": gap.ci_high, "n": gap.n, "verdict": gap.verdict, "sentence": gap.sentence(arm, reference)})
    return gaps


def _summarise(
    config: DQConfig, dataset: StageResult, embeddings: StageResult, bins: StageResult,
    subsets: list[dict[str, Any]], timings: dict[str, float],
) -> dict[str, Any]:
    train_size = dataset.summary["counts"][QUANTIZED_SPLIT]
    return {
        "store_url": config.store_url,
        "dataset": {"url": dataset.url, "fingerprint": dataset.fingerprint, "counts": dataset.summary["counts"],
                    "modality": dataset.summary["modality"]},
        "embeddings": {"url": embeddings.url, "fingerprint": embeddings.fingerprint, **embeddings.summary},
        "bins": {"url": bins.url, "fingerprint": bins.fingerprint, **bins.summary},
        "subsets": [
            {
                "ratio": s["ratio"],
                "name": s["dq"].name,
                "url": s["dq"].url,
                "fingerprint": s["dq"].fingerprint,
                "size": s["dq"].summary["size"],
                "sample_keep_ratio": s["dq"].summary["size"] / train_size,
                "evaluation": s["evaluation"],
                "gaps": s["gaps"],
                "patches": s["patches"],
                "coverage": s["coverage"],
                "selection": {"previous": s["diff"].previous, "previous_size": s["diff"].previous_size,
                              "status": s["diff"].status, **s["diff"].counts(), "churn": s["diff"].churn,
                              "diff_url": s["diff"].filename and f"{s['dq'].url}/{s['diff'].filename}"},
                **s["since"],
            }
            for s in subsets
        ],
        "timings_s": timings,
        "class_names": dataset.summary.get("class_names"),
    }


def _publish(config: DQConfig, tracker: Tracker, summary: dict[str, Any]) -> str:
    """Prefect UI artifacts, MLflow metrics/artifacts and ``<store>/reports/<run>.md``; returns its URL."""
    store = Store(config.store_url)
    gallery = bin_gallery(store.open("datasets", summary["dataset"]["url"].rsplit("/", 1)[-1]),
                          store.open("bins", summary["bins"]["url"].rsplit("/", 1)[-1]), summary.get("class_names"))
    if isinstance(gallery, bytes):
        tracker.log_bytes(gallery, "pictures/bin_gallery.png")
        gallery_url = f"{tracker.run_url}/artifacts/pictures/bin_gallery.png"
        create_link_artifact(gallery_url, link_text="Bin gallery (MLflow)", key="dq-bin-gallery")
        summary["gallery"] = f"[bin gallery]({gallery_url}) (MLflow artifact `pictures/bin_gallery.png`)"
    else:
        create_table_artifact(gallery, key="dq-bin-examples", description="Example records per bin")
        tracker.log_text(json.dumps(gallery, indent=1, ensure_ascii=False), "tables/bin_examples.json")
        summary["gallery"] = "Prefect table artifact `dq-bin-examples` (MLflow: `tables/bin_examples.json`)"
    report = render_report(config, summary, tracker.run_url)
    report_url = f"{config.store_url.rstrip('/')}/reports/{flow_run.get_name() or tracker.run_id}.md"
    with fsspec.open(report_url, "w", auto_mkdir=True) as fh:
        fh.write(report)
    # One report artifact per dataset (Prefect keys: lowercase letters, digits, dashes).
    report_key = "dq-report-" + config.dataset.name.lower().replace("_", "-").replace(".", "-")
    create_markdown_artifact(report, key=report_key, description=f"Dataset Quantization report: {config.dataset.name}")
    create_table_artifact(bin_size_rows(summary), key="dq-bin-sizes", description="Samples per class and bin")
    create_link_artifact(tracker.run_url, link_text="MLflow run", key="dq-mlflow-run")
    metrics = {f"time_{stage}_s": seconds for stage, seconds in summary["timings_s"].items()}
    metrics["train_samples"] = summary["dataset"]["counts"][QUANTIZED_SPLIT]
    metrics["embedded_samples"] = summary["embedded_samples"]
    metrics["classes_rebinned"] = len(summary["classes_rebinned"])
    for s in summary["subsets"]:
        metrics[f"subset_size_r{s['ratio']}"] = s["size"]
        metrics[f"sample_keep_ratio_r{s['ratio']}"] = s["sample_keep_ratio"]
        metrics |= {f"selection_{k}_r{s['ratio']}": s["selection"][k] for k in (*CATEGORIES, "churn")}
        metrics |= {f"coverage_{stat}_{arm}_r{s['ratio']}": s["coverage"][arm][f"coverage_{stat}"]
                    for arm in ("dq", "random") for stat in ("mean", "p95")}
        if s["patches"]:
            p = s["patches"]
            metrics |= {
                f"stored_bytes_r{s['ratio']}": p["stored_bytes"],
                f"whole_image_bytes_r{s['ratio']}": p["whole_image_bytes"],
                f"byte_ratio_r{s['ratio']}": p["byte_ratio"],
                f"storage_keep_ratio_r{s['ratio']}": p["keep_ratio"],
                f"psnr_mae_db_r{s['ratio']}": p["psnr_mae_db"],
                f"psnr_zero_fill_db_r{s['ratio']}": p["psnr_zero_fill_db"],
            }
    tracker.log_metrics(metrics)
    tracker.log_text(report, "report.md")
    tracker.log_bytes(bin_size_plot(summary), "plots/bin_sizes.png")
    for s in summary["subsets"]:
        _log_id_manifest(tracker, store.open("subsets", s["name"])["ids"], f"manifests/subset_r{s['ratio']}_ids.txt")
        if s["patches"]:
            reconstruction = store.open("reconstructions", s["patches"]["reconstruction_url"].rsplit("/", 1)[-1])
            tracker.log_bytes(reconstruction["preview_png"][:].tobytes(), f"pictures/reconstruction_r{s['ratio']}.png")
    return report_url


def _log_id_manifest(tracker: Tracker, ids: zarr.Array, artifact_file: str) -> None:
    """Log a subset's sample ids, one per line, streamed chunk by chunk into a temporary file
    (a subset of an ImageNet-sized dataset has hundreds of thousands of ids)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, artifact_file.rsplit("/", 1)[-1])
        with open(path, "w") as fh:
            step = ids.chunks[0]
            for start in range(0, ids.shape[0], step):
                fh.writelines(f"{i}\n" for i in ids[start:start + step])
        tracker.log_file(path, artifact_file.rsplit("/", 1)[0])
