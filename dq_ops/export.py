"""Take a subset out of the store: export it as an image folder, ``.npz`` or JSONL plus a
manifest, or load it as a torch ``Dataset`` (reconstructing dropped patches on read).

The manifest (``manifest.jsonl``, one line per exported sample) carries the stable sample ids
from ingest, the row in the quantized split, the label and, for image folders, the file written,
so an exported subset can always be traced back to its source.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from dq_ops.errors import DQInputError
from dq_ops.mae import ReconstructedPatchDataset
from dq_ops.mae_store import load_mae_artifact
from dq_ops.store import QUANTIZED_SPLIT, Artifact, DQStoreError, Store
from dq_ops.urls import filesystem

ExportFormat = Literal["image-folder", "npz", "jsonl"]
EXPORT_FORMATS: tuple[str, ...] = ("image-folder", "npz", "jsonl")
_ROWS_PER_READ = 4096


@dataclass(frozen=True)
class ExportResult:
    out_url: str
    format: str
    samples: int
    manifest_url: str


def subset_dataset(store: Store, subset: Artifact) -> Artifact:
    """The dataset snapshot a subset was drawn from (never a newer snapshot of the same name)."""
    snapshot = subset.group.attrs["dataset"]
    try:
        return store.open("datasets", snapshot)
    except DQStoreError:
        raise DQStoreError(
            f"{subset.url} was drawn from dataset snapshot {snapshot!r}, which is no longer in the store "
            "(removed by `dq gc`?); re-run `dq run` to draw it from the current snapshot"
        ) from None


def export_subset(
    store: Store,
    subset_name: str,
    out_url: str,
    fmt: ExportFormat,
    *,
    images: Callable[[np.ndarray], np.ndarray] | None = None,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write ``subsets/<subset_name>`` to ``out_url`` in ``fmt``, with ``manifest.jsonl`` beside it.

    ``out_url`` must be empty or absent; with ``overwrite`` a previous export there (a folder
    with a ``manifest.jsonl``) is removed first, so formats and stale files never mix. Other
    content is never deleted.

    ``images(rows)`` supplies the pixels of the given split rows when they should not come from
    the dataset as ingested (e.g. MAE reconstructions after patch dropping).
    """
    if fmt not in EXPORT_FORMATS:
        raise DQInputError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    fs, root = filesystem(out_url)
    previous = _check_target(fs, root, out_url, overwrite)
    subset = store.open("subsets", subset_name)
    dataset = subset_dataset(store, subset)
    split = dataset[QUANTIZED_SPLIT]
    is_text = "texts" in split
    if is_text != (fmt == "jsonl"):
        kind = "text" if is_text else "image"
        raise DQInputError(f"{dataset.url} holds {kind} samples: export it as {'jsonl' if is_text else 'image-folder or npz'}, not {fmt}")
    rows = np.asarray(subset["indices"][:])
    ids = np.asarray(subset["ids"][:])
    labels = np.asarray(split["labels"].get_orthogonal_selection((rows,)))
    class_names = dataset.group.attrs.get("class_names")
    if previous:
        fs.rm(root, recursive=True)
    fs.makedirs(root, exist_ok=True)

    manifest = [{"id": str(i), "row": int(r), "label": int(y)} for i, r, y in zip(ids, rows, labels)]
    if fmt == "npz":
        buffer = io.BytesIO()  # one array in memory: npz is the format for subsets that fit
        np.savez_compressed(buffer, images=_pixels(split, rows, images), labels=labels, ids=np.array([str(i) for i in ids]))
        with fs.open(f"{root}/subset.npz", "wb") as fh:
            fh.write(buffer.getvalue())
    for start in range(0, len(rows), _ROWS_PER_READ):
        chunk = slice(start, start + _ROWS_PER_READ)
        if fmt == "image-folder":
            _write_images(fs, root, _pixels(split, rows[chunk], images), labels[chunk], ids[chunk], class_names, manifest[chunk])
        elif fmt == "jsonl":
            texts = split["texts"].get_orthogonal_selection((rows[chunk],))
            with fs.open(f"{root}/subset.jsonl", "a" if start else "w") as fh:
                for entry, text in zip(manifest[chunk], texts):
                    fh.write(json.dumps({"id": entry["id"], "text": str(text), "label": entry["label"]}) + "\n")
        if progress:
            progress(min(start + _ROWS_PER_READ, len(rows)), len(rows))
    manifest_url = f"{root}/manifest.jsonl"
    with fs.open(manifest_url, "w") as fh:
        fh.writelines(json.dumps(entry) + "\n" for entry in manifest)
    return ExportResult(out_url, fmt, len(rows), manifest_url)


def _check_target(fs, root: str, out_url: str, overwrite: bool) -> bool:
    """Whether ``root`` holds a previous export to replace (``overwrite``); raises when it holds
    anything else. Nothing is deleted here: the subset is checked first."""
    if fs.exists(root) and not fs.isdir(root):
        raise DQInputError(f"{out_url}: exists and is a file; export into a folder")
    entries = sorted(fs.ls(root, detail=False)) if fs.exists(root) else []
    if entries:
        shown = ", ".join(repr(str(e).rstrip("/").rsplit("/", 1)[-1]) for e in entries[:3])
        if not overwrite:
            raise DQInputError(
                f"{out_url}: the export folder is not empty ({len(entries)} entries: {shown}{', ...' if len(entries) > 3 else ''}); "
                "choose an empty folder, or pass --overwrite to replace a previous export"
            )
        if not fs.exists(f"{root}/manifest.jsonl"):
            raise DQInputError(f"{out_url}: holds files that are not a dq export (no manifest.jsonl: {shown}); not deleting them")
    return bool(entries)


def _pixels(split, rows: np.ndarray, images: Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
    return images(rows) if images is not None else np.asarray(split["images"].get_orthogonal_selection((rows,)))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "unnamed"


def _write_images(fs, root, pixels, labels, ids, class_names, manifest) -> None:
    from PIL import Image

    for image, label, sample_id, entry in zip(pixels, labels, ids, manifest):
        folder = _safe(class_names[label]) if class_names and label >= 0 else ("unlabelled" if label < 0 else str(label))
        path = f"{folder}/{_safe(str(sample_id))}.png"
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
        fs.makedirs(f"{root}/{folder}", exist_ok=True)
        with fs.open(f"{root}/{path}", "wb") as fh:
            fh.write(buffer.getvalue())
        entry["file"] = path


class SubsetImages(Dataset):
    """A subset's images as a torch ``Dataset``: item ``i`` is ``(float32 (C, H, W) in [0, 1], label)``
    for the subset's ``i``-th sample (rows in the order of its ``indices``)."""

    def __init__(self, store: Store, subset_name: str):
        subset = store.open("subsets", subset_name)
        split = subset_dataset(store, subset)[QUANTIZED_SPLIT]
        if "images" not in split:
            raise DQInputError(f"{subset.url}: a text subset; export it as JSONL instead")
        self.rows = np.asarray(subset["indices"][:])
        self.ids = np.asarray(subset["ids"][:])
        self.labels = np.asarray(split["labels"].get_orthogonal_selection((self.rows,)))
        self._images = split["images"]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = np.asarray(self._images[int(self.rows[index])])
        return torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0), int(self.labels[index])


def subset_torch_dataset(store: Store, subset_name: str, mae_name: str | None = None) -> Dataset:
    """A subset as a torch ``Dataset``: with ``mae_name`` (a ``models/`` artifact) and a patch
    store for the subset, images are reconstructed on read from the kept patches
    (``dq_ops.mae.ReconstructedPatchDataset``); otherwise the ingested images."""
    if mae_name is None:
        return SubsetImages(store, subset_name)

    stored = [name for name in store.list("patches") if store.open("patches", name).group.attrs.get("subset") == subset_name]
    if not stored:
        raise DQInputError(f"{store.artifact_url('subsets', subset_name)}: no patch store was made for this subset")
    model = load_mae_artifact(store.open("models", mae_name))
    return ReconstructedPatchDataset(store.open("patches", stored[-1]).group, model)
