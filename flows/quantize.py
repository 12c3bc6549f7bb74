"""The quantization flow: ingest → embeddings → bins → sampling (→ pixel stages → evaluation).

Every stage is a cached task that takes and returns store URLs + fingerprints. A second run with
nothing changed is served from the cache; a new keep ratio re-runs only sampling and what follows.
What the stages return becomes a :class:`~tasks.summary.RunSummary`, which
:func:`~tasks.publish.publish_run` shows (report, Prefect artifacts, MLflow).
Entrypoint for ``prefect.yaml``: ``flows/quantize.py:quantize``.
"""

# No ``from __future__ import annotations`` here: ``Flow.serve`` ships the flow to its run process
# with cloudpickle, which keeps only the globals the function body names, so a string annotation
# ``"DQConfig"`` could not be resolved there and every served run failed parameter validation.
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from dq_ops.cluster import cluster_precision
from dq_ops.config import DQConfig
from dq_ops.preflight import preflight
from dq_ops.runs import RunRecord, record_run, remove_run_record
from dq_ops.store import QUANTIZED_SPLIT, Store
from flows.evaluation import Draw, draw_arms, evaluate_arms
from tasks.bins import generate_bins_task
from tasks.cluster import close_dask_clients
from tasks.common import StageResult, set_offline_env
from tasks.crashes import close_crashed_runs
from tasks.embeddings import compute_embeddings
from tasks.ingest import ingest_dataset
from tasks.patches import drop_patches, prepare_mae, reconstruct_patches
from tasks.publish import publish_run
from tasks.sampling import baseline_subset, sample_subset, subset_coverage
from tasks.selection import record_selection
from tasks.summary import RunSummary, SubsetRun, paired_gaps
from tasks.tracking import Tracker


def _run_name() -> str:
    return f"dq-{flow_run.parameters['config'].dataset.name}-{time.strftime('%Y%m%d-%H%M%S')}"


@flow(name="dataset-quantization", flow_run_name=_run_name, log_prints=True)
def quantize(config: DQConfig = DQConfig()) -> dict[str, Any]:
    """Quantize ``config.dataset`` into bins and draw a subset at every keep ratio.

    Returns the run's summary as JSON (:meth:`~tasks.summary.RunSummary.to_json`), which the CLI prints.
    """
    set_offline_env()
    logger = get_run_logger()
    store_url, store = config.store_url, Store(config.store_url)
    store.clean_staging()  # what killed runs left behind
    run_name = flow_run.get_name() or "dq"
    tracker = Tracker(config, run_name=run_name, tags={"prefect.flow_run_id": str(flow_run.get_id()), "dq_role": "flow"})
    timings: dict[str, float] = defaultdict(float)
    recorded: RunRecord | None = None

    @contextmanager
    def timed(stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        timings[stage] += time.perf_counter() - start

    try:
        # Recorded in the store before reading the source (a run killed during ingest is found by
        # the next one) and forgotten however it ends in Python: a stopped run leaves no record.
        recorded = record_run(store, str(flow_run.get_id()), run_name)
        precision = cluster_precision(config.cluster)
        with timed("ingest"):
            dataset = ingest_dataset(config.dataset, store_url, config.cluster)
        preflight(config, dataset.open())  # what the data must allow, before the expensive stages
        tracker.wait()  # and a reachable MLflow (it connected while ingest ran)
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
        features = (embeddings, test_embeddings)

        drawn: list[StageResult] = []
        with timed("sampling"):
            for ratio in config.sampling.ratios:
                drawn.append(sample_subset(store_url, dataset, embeddings, bins, ratio, config.seed, config.sampling))
                # a random draw of the same per-class sizes: the coverage the DQ subset's is compared with
                drawn.append(baseline_subset(store_url, dataset, embeddings, bins, "random", ratio, config.seed))
            drawn = subset_coverage(store_url, dataset, embeddings, bins, drawn, config.cluster)  # one pass for all
        subsets: list[SubsetRun] = []
        for ratio, subset, random in zip(config.sampling.ratios, drawn[::2], drawn[1::2]):
            selection = record_selection(store_url, dataset, embeddings, bins, subset, run_name)
            patches = reconstruction = None
            if pixels:
                with timed("patches"):
                    patches = drop_patches(store_url, dataset, subset, config.patches, config.embedding, config.cluster)
                with timed("reconstruction"):
                    reconstruction = reconstruct_patches(store_url, dataset, patches, mae, config.cluster)
            evaluation = []
            if evaluate:
                with timed("evaluation"):
                    draws = draw_arms(config, dataset, embeddings, bins, ratio, subset, mae if pixels else None)
                    evaluation = evaluate_arms(config, dataset, ratio, draws, features)
            subsets.append(SubsetRun(ratio, subset, random, selection, patches, reconstruction, evaluation,
                                     paired_gaps(ratio, evaluation)))
        full = []
        if evaluate and "full" in config.evaluation.arms:
            with timed("evaluation"):
                whole_split = {"full": [Draw(seed, None) for seed in config.evaluation.seeds]}
                full = evaluate_arms(config, dataset, 1.0, whole_split, features)
        summary = RunSummary(
            store_url, dataset, embeddings, bins, subsets, full, dict(timings),
            embedded_samples=sum(e.summary["embedded_samples"] for e in features if e is not None and e.computed_now()),
            classes_rebinned=bins.summary["classes_rebinned"] if bins.computed_now() else [], mae=mae,
        )
        report_url = publish_run(config, tracker, summary, run_name)
        logger.info("Quantized %s: %s", config.dataset.name, ", ".join(f"{s.ratio:.0%} → {s.size} samples" for s in subsets))
        tracker.finish()
        return summary.to_json(report_url, tracker.uri, tracker.run_id)
    except BaseException:
        if tracker.connected():  # else the run's own error is the one to report
            tracker.finish(status="FAILED")
        raise
    finally:
        close_dask_clients()
        tracker.close()
        if recorded is not None:
            remove_run_record(store, recorded.flow_run_id)
