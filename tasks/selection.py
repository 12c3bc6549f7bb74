"""Recording a run's selection in the store's history (``dq_ops.selection``).

Not a cached task: every run, an unchanged one too, adds its entry to the history. What the
diff shows people (a Prefect table, the id lists in MLflow) is :mod:`tasks.publish`'s.
"""

from __future__ import annotations

from dq_ops.selection import last_change, publish_selection, selection_history, selection_key
from dq_ops.store import Store
from tasks.common import StageResult
from tasks.summary import SelectionRecord


def record_selection(
    store_url: str, dataset: StageResult, embeddings: StageResult, bins: StageResult, subset: StageResult, run: str,
) -> SelectionRecord:
    """Diff ``subset`` against the subset published before with the same settings and append
    the run to the store's history of those settings (see :class:`~tasks.summary.SelectionRecord`)."""
    store = Store(store_url)
    key = selection_key(dataset.summary["dataset"], *(r.open().params for r in (subset, bins, embeddings)))
    diff = publish_selection(store, key, subset.open(), run, dataset.summary.get("class_names"), snapshot=dataset.name)
    history = selection_history(store, key)
    change = last_change(history)
    return SelectionRecord(
        key=key,
        diff=diff,
        diff_url=diff.filename and f"{subset.url}/{diff.filename}",
        previous_run=history[-2] if len(history) > 1 else None,
        last_change=change and change | {"diff_url": f"{store.artifact_url('subsets', change['subset'])}/{change['diff']}"},
        position=len(history) - 1,
    )
