"""What changed in a selection: the sample ids a refreshed run added to and removed from the
subset published before it with the same settings.

The previous subset is found through a ref (``refs/subsets/<dataset>-<selection key>``) that
every published subset moves; the diff is written beside the subset as
``subsets/<name>/selection_diff.json``. Churn is the share of the previous subset no longer
selected: ``|removed| / |previous|``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from dq_ops.store import Artifact, Store, derive_key


@dataclass(frozen=True)
class SelectionDiff:
    """Ids added and removed against the previous subset; per-class counts keyed by class name."""

    previous: str | None  # the previous subset's name, None on a first run
    added: list[str]
    removed: list[str]
    previous_size: int
    added_per_class: dict[str, int] = field(default_factory=dict)
    removed_per_class: dict[str, int] = field(default_factory=dict)

    @property
    def churn(self) -> float:
        return len(self.removed) / self.previous_size if self.previous_size else 0.0

    def rows(self) -> list[dict[str, Any]]:
        """One row per class touched (a table for the Prefect UI)."""
        classes = sorted(set(self.added_per_class) | set(self.removed_per_class))
        return [{"class": c, "added": self.added_per_class.get(c, 0), "removed": self.removed_per_class.get(c, 0)}
                for c in classes]


def selection_key(dataset: str, *params: dict[str, Any]) -> str:
    """The ref that links successive subsets of one dataset drawn with the same settings
    (``params``: the subset's, the bins', the embeddings' parameters; snapshots left out)."""
    return f"{dataset}-{derive_key('selection', {'params': list(params)})}"


def _class_counts(ids: list[str], labels: np.ndarray, chosen: set[str], class_names: list[str] | None) -> dict[str, int]:
    counts = Counter(int(y) for i, y in zip(ids, labels) if i in chosen)
    return {(class_names[y] if class_names and 0 <= y < len(class_names) else str(y)): n for y, n in sorted(counts.items())}


def diff_subsets(previous: Artifact | None, current: Artifact, class_names: list[str] | None = None) -> SelectionDiff:
    """Ids of ``current`` not in ``previous`` and the reverse (both subsets carry ``ids`` and ``labels``)."""
    ids, labels = [str(i) for i in current["ids"][:]], np.asarray(current["labels"][:])
    if previous is None:
        return SelectionDiff(None, [], [], 0)
    old_ids, old_labels = [str(i) for i in previous["ids"][:]], np.asarray(previous["labels"][:])
    added, removed = set(ids) - set(old_ids), set(old_ids) - set(ids)
    return SelectionDiff(
        previous.name, sorted(added), sorted(removed), len(old_ids),
        _class_counts(ids, labels, added, class_names), _class_counts(old_ids, old_labels, removed, class_names),
    )


def publish_selection(store: Store, key: str, subset: Artifact, class_names: list[str] | None = None) -> SelectionDiff:
    """Diff ``subset`` against the previous subset under ``key``, write the diff beside it and
    make it the latest of ``key``. Publishing the same subset again gives an empty diff; a
    previous subset removed since (``dq gc``) counts as none."""
    ref = store.read_ref("subsets", key)
    previous = None
    if ref is not None and store.exists("subsets", ref["latest"]):
        previous = store.open("subsets", ref["latest"])
    diff = diff_subsets(previous, subset, class_names)
    store.write_sidecar("subsets", subset.name, "selection_diff.json",
                        json.dumps(asdict(diff) | {"churn": diff.churn}, indent=1).encode())
    store.write_ref("subsets", key, {"latest": subset.name})
    return diff
