"""What changed in a selection between two runs with the same settings, sample id by sample id.

Sample ids are ``"<source position or path>:<content hash>"`` (``dq_ops.readers.base``), so a
subset compared with the one published before it sorts every difference into one category:

- **added**: selected now; nothing at its position was selected before;
- **removed**: selected before; nothing at its position is selected now;
- **modified**: selected in both at the same position, with new content (so a new id); listed by
  the new id, the id it replaces is the previous subset's id at the same position;
- **relabeled**: the same id selected in both, with a new label.

A consumer syncing by id fetches ``added``, drops ``removed``, replaces ``modified`` and updates
the labels of ``relabeled``. Churn is the share of the previous subset no longer selected:
``|removed| / |previous|`` (a modified or relabelled sample is still selected).

The previous subset is the one a ref (``refs/subsets/<dataset>-<selection key>``) names as
``latest``; the same ref keeps the history under ``runs``, one entry per published run, oldest first:
``{"at", "run", "snapshot", "subset", "previous", "status", "added", "removed", "relabeled",
"modified", "churn", "diff"}`` (``snapshot``: the dataset snapshot the run selected from) with ``status`` one of ``first run``, ``no change``, ``changed``. A run that
changed something writes its id lists beside its subset as
``subsets/<name>/selection_diff-from-<previous>.json`` (``diff`` in the entry names that file):
a file that only this pair of subsets can produce, so no later run rewrites it with another
content, and an unchanged re-run adds a ``no change`` entry without touching the last change.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np

from dq_ops.store import Artifact, Store, derive_key

CATEGORIES = ("added", "removed", "relabeled", "modified")
Status = Literal["first run", "no change", "changed"]


@dataclass(frozen=True)
class SelectionDiff:
    """The ids of each category against the previous subset, and their counts per class name
    (added, relabeled, modified by their current label; removed by their previous one)."""

    subset: str
    previous: str | None  # the previous subset's name, None on a first run
    previous_size: int
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    relabeled: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    per_class: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def churn(self) -> float:
        return len(self.removed) / self.previous_size if self.previous_size else 0.0

    @property
    def status(self) -> Status:
        if self.previous is None:
            return "first run"
        return "changed" if any(getattr(self, c) for c in CATEGORIES) else "no change"

    @property
    def filename(self) -> str | None:
        """The sidecar of the current subset holding the id lists; None when nothing changed."""
        return f"selection_diff-from-{self.previous}.json" if self.status == "changed" else None

    def counts(self) -> dict[str, int]:
        return {c: len(getattr(self, c)) for c in CATEGORIES}

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"churn": self.churn, "status": self.status}

    def rows(self) -> list[dict[str, Any]]:
        """One row per class touched (a table for the Prefect UI)."""
        return [{"class": c} | {k: n.get(k, 0) for k in CATEGORIES} for c, n in sorted(self.per_class.items())]


def selection_key(dataset: str, *params: dict[str, Any]) -> str:
    """The ref that links successive subsets of one dataset drawn with the same settings
    (``params``: the subset's, the bins', the embeddings' parameters; snapshots left out)."""
    return f"{dataset}-{derive_key('selection', {'params': list(params)})}"


def position(sample_id: str) -> str:
    """Where a sample sits in its source: its id without the content hash."""
    return sample_id.rsplit(":", 1)[0]


def diff_selections(
    subset: str, previous: str | None, previous_ids: np.ndarray, previous_labels: np.ndarray,
    ids: np.ndarray, labels: np.ndarray, class_names: list[str] | None = None,
) -> SelectionDiff:
    """Sort the difference between two selections (ids with their labels) into the categories;
    ``previous`` None (a first run) gives an empty diff."""
    if previous is None:
        return SelectionDiff(subset, None, 0)
    old = dict(zip((str(i) for i in previous_ids), (int(y) for y in previous_labels), strict=True))
    new = dict(zip((str(i) for i in ids), (int(y) for y in labels), strict=True))
    old_at = {position(i): i for i in old.keys() - new.keys()}
    arrived = sorted(new.keys() - old.keys())
    modified = [i for i in arrived if position(i) in old_at]
    replaced = {old_at[position(i)] for i in modified}
    added = [i for i in arrived if position(i) not in old_at]
    removed = sorted(old.keys() - new.keys() - replaced)
    relabeled = sorted(i for i in new.keys() & old.keys() if new[i] != old[i])

    def name(y: int) -> str:
        return class_names[y] if class_names and 0 <= y < len(class_names) else str(y)

    per_class: dict[str, Counter[str]] = {}
    for category, members, label_of in (("added", added, new), ("removed", removed, old),
                                        ("relabeled", relabeled, new), ("modified", modified, new)):
        for i in members:
            per_class.setdefault(name(label_of[i]), Counter())[category] += 1
    return SelectionDiff(subset, previous, len(old), added, removed, relabeled, modified,
                         {c: dict(n) for c, n in per_class.items()})


def diff_subsets(previous: Artifact | None, current: Artifact, class_names: list[str] | None = None) -> SelectionDiff:
    """:func:`diff_selections` of two stored subsets (both carry ``ids`` and ``labels``)."""
    if previous is None:
        return SelectionDiff(current.name, None, 0)
    return diff_selections(current.name, previous.name, previous["ids"][:], previous["labels"][:],
                           current["ids"][:], current["labels"][:], class_names)


def publish_selection(
    store: Store, key: str, subset: Artifact, run: str, class_names: list[str] | None = None, *,
    snapshot: str | None = None,
) -> SelectionDiff:
    """Diff ``subset`` against the latest subset of ``key``, write the id lists beside it when
    something changed, append the run's entry to the history and make ``subset`` the latest.
    A previous subset removed since (``dq gc``) counts as none: the entry says ``first run``."""
    with store.lock("ref", "subsets", key):  # read-modify-write: concurrent runs must not lose an entry
        ref = store.read_ref("subsets", key) or {}
        previous = ref.get("latest")
        diff = diff_subsets(store.open("subsets", previous) if previous and store.exists("subsets", previous) else None,
                            subset, class_names)
        if diff.filename is not None:
            store.write_sidecar("subsets", subset.name, diff.filename, json.dumps(diff.to_json(), indent=1).encode())
        entry = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "run": run, "snapshot": snapshot, "subset": subset.name,
                 "previous": diff.previous, "status": diff.status, **diff.counts(), "churn": diff.churn,
                 "diff": diff.filename}
        store.write_ref("subsets", key, {"latest": subset.name, "runs": [*ref.get("runs", []), entry]})
    return diff


def selection_history(store: Store, key: str) -> list[dict[str, Any]]:
    """Every published run of the selection ``key``, oldest first (see the module docstring)."""
    return (store.read_ref("subsets", key) or {}).get("runs", [])


def last_change(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The latest entry of ``history`` that changed the selection (what a "no change" run points at)."""
    return next((entry for entry in reversed(history) if entry["status"] == "changed"), None)
