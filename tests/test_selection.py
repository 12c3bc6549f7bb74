"""The selection diff (dq_ops.selection): categories per sample id, and its history in a real store."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dq_ops.selection import diff_selections, publish_selection, selection_history
from dq_ops.store import Store, write_array

CLASSES = ["cat", "dog", "owl"]


def _ids(positions: list[str], version: str = "v1") -> np.ndarray:
    return np.array([f"{p}:{version}" for p in positions])


def test_each_change_lands_in_exactly_one_category():
    previous_ids = np.array(["a.png:h1", "b.png:h1", "c.png:h1", "d.png:h1", "e.png:h1", "shelf:7:h1"])
    previous_labels = np.array([0, 0, 1, 1, 2, 2])
    # a kept; b relabelled 0 → 2; c modified in place (new content hash); d removed; e modified and
    # relabelled (content wins: modified); f new; a position with ':' in it (fortunes) modified.
    ids = np.array(["a.png:h1", "b.png:h1", "c.png:h2", "e.png:h2", "f.png:h1", "shelf:7:h2"])
    labels = np.array([0, 2, 1, 0, 1, 2])
    diff = diff_selections("new", "old", previous_ids, previous_labels, ids, labels, CLASSES)
    assert (diff.added, diff.removed) == (["f.png:h1"], ["d.png:h1"])
    assert diff.relabeled == ["b.png:h1"]
    assert diff.modified == ["c.png:h2", "e.png:h2", "shelf:7:h2"]
    assert diff.churn == pytest.approx(1 / 6) and diff.status == "changed"
    # added / relabeled / modified by the current label, removed by the previous one
    assert diff.per_class == {"cat": {"modified": 1}, "dog": {"added": 1, "removed": 1, "modified": 1},
                              "owl": {"relabeled": 1, "modified": 1}}
    assert diff.rows()[0] == {"class": "cat", "added": 0, "removed": 0, "relabeled": 0, "modified": 1}


def test_a_first_run_and_an_identical_selection_change_nothing():
    ids, labels = _ids(["a", "b"]), np.array([0, 1])
    first = diff_selections("s1", None, ids[:0], labels[:0], ids, labels)
    assert first.status == "first run" and first.filename is None and first.counts() == dict.fromkeys(first.counts(), 0)
    same = diff_selections("s1", "s1", ids, labels, ids, labels)
    assert same.status == "no change" and same.filename is None and same.previous_size == 2


def _subset(store: Store, name: str, ids: np.ndarray, labels: np.ndarray):
    with store.write("subsets", name, {"ratio": 0.5}) as group:
        write_array(group, "indices", np.arange(len(ids)))
        write_array(group, "ids", ids)
        write_array(group, "labels", labels)
    return store.open("subsets", name)


def test_the_store_keeps_every_run_and_an_unchanged_run_keeps_the_last_change(tmp_path):
    store = Store(str(tmp_path / "store"))
    v1 = _subset(store, "v1", _ids(["a", "b", "c"]), np.array([0, 1, 2]))
    v2 = _subset(store, "v2", np.array(["a:v1", "b:v2", "d:v1"]), np.array([1, 1, 2]))
    assert publish_selection(store, "ds-key", v1, "run-1", CLASSES).status == "first run"
    changed = publish_selection(store, "ds-key", v2, "run-2", CLASSES)
    assert (changed.added, changed.removed, changed.relabeled, changed.modified) == (["d:v1"], ["c:v1"], ["a:v1"], ["b:v2"])
    diff_file = tmp_path / "store" / "subsets" / "v2" / "selection_diff-from-v1.json"
    written = diff_file.read_bytes()
    stored = json.loads(written)
    assert {k: stored[k] for k in ("added", "removed", "relabeled", "modified")} == {
        "added": ["d:v1"], "removed": ["c:v1"], "relabeled": ["a:v1"], "modified": ["b:v2"]}
    assert stored["previous"] == "v1" and stored["churn"] == pytest.approx(1 / 3)

    assert publish_selection(store, "ds-key", v2, "run-3", CLASSES).status == "no change"
    assert diff_file.read_bytes() == written  # the last change is still there, untouched
    assert sorted(p.name for p in diff_file.parent.glob("selection_diff*")) == [diff_file.name]

    back = publish_selection(store, "ds-key", v1, "run-4", CLASSES)  # the source rolled back
    assert back.filename == "selection_diff-from-v2.json" and back.added == ["c:v1"] and back.relabeled == ["a:v1"]
    assert (tmp_path / "store" / "subsets" / "v1" / back.filename).exists()

    history = selection_history(store, "ds-key")
    assert [(e["run"], e["subset"], e["previous"], e["status"]) for e in history] == [
        ("run-1", "v1", None, "first run"), ("run-2", "v2", "v1", "changed"),
        ("run-3", "v2", "v2", "no change"), ("run-4", "v1", "v2", "changed"),
    ]
    assert [e["diff"] for e in history] == [None, "selection_diff-from-v1.json", None, "selection_diff-from-v2.json"]
    assert {k: history[1][k] for k in ("added", "removed", "relabeled", "modified")} == dict.fromkeys(
        ("added", "removed", "relabeled", "modified"), 1)
    assert store.read_ref("subsets", "ds-key")["latest"] == "v1"
