"""Publishing a run's selection diff: the store's history (``dq_ops.selection``), a Prefect table
artifact and the id lists in MLflow.

Not a cached task: every run, an unchanged one too, adds its entry to the history.
"""

from __future__ import annotations

import json
from typing import Any

from prefect.artifacts import create_table_artifact

from dq_ops.selection import CATEGORIES, SelectionDiff, last_change, publish_selection, selection_history, selection_key
from dq_ops.store import Store
from tasks.common import StageResult
from tasks.tracking import Tracker


def publish_selection_diff(
    store_url: str, dataset: StageResult, embeddings: StageResult, bins: StageResult, subset: StageResult,
    tracker: Tracker, run: str,
) -> tuple[SelectionDiff, dict[str, Any]]:
    """Diff ``subset`` against the subset published before with the same settings; record the run
    in the store's history, show the per-class table in Prefect and log the id lists to MLflow
    (``selection/diff_r<ratio>.json``, the same keys as the store's diff file).

    Returns the diff and what the report says since the previous run: ``previous_run`` (that run's
    history entry, None on the first) and ``last_change`` (the latest entry that changed the
    selection, this run's included, with the ``diff_url`` of its id lists; None if none did)."""
    store, ratio = Store(store_url), subset.summary["ratio"]
    key = selection_key(dataset.summary["dataset"], *(r.open().params for r in (subset, bins, embeddings)))
    diff = publish_selection(store, key, subset.open(), run, dataset.summary.get("class_names"),
                             snapshot=dataset.url.rsplit("/", 1)[-1])
    if diff.previous is not None:
        tracker.log_text(json.dumps(diff.to_json(), indent=1), f"selection/diff_r{ratio}.json")
    history = selection_history(store, key)
    create_table_artifact(diff.rows() or [{"class": "(none)"} | dict.fromkeys(CATEGORIES, 0)],
                          key=f"dq-selection-diff-r{int(round(ratio * 1000))}",
                          description=_description(diff, ratio, history))
    change = last_change(history)
    return diff, {
        "previous_run": history[-2] if len(history) > 1 else None,
        "last_change": change and change | {"diff_url": f"{store.artifact_url('subsets', change['subset'])}/{change['diff']}"},
    }


def _description(diff: SelectionDiff, ratio: float, history: list[dict]) -> str:
    if diff.status == "first run":
        return f"Selection at {ratio:.1%}: first run of these settings"
    if diff.status == "changed":
        return f"Selection at {ratio:.1%} vs the previous run ({diff.previous}): {_counts(diff.counts())}, churn {diff.churn:.2%}"
    last = last_change(history)
    since = f"; last change {last['at']} (run {last['run']}): {_counts(last)}" if last else ""
    return f"Selection at {ratio:.1%}: no change since the previous run{since}"


def _counts(counts: dict) -> str:
    return f"+{counts['added']} −{counts['removed']}, {counts['modified']} modified, {counts['relabeled']} relabelled"
