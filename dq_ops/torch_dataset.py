"""A subset as a torch ``Dataset``, its images read from the store, or reconstructed on read from
the kept patches by the MAE. Apart from :mod:`dq_ops.export`, so that exporting never imports torch."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from dq_ops.errors import DQInputError
from dq_ops.export import subset_dataset
from dq_ops.mae_store import ReconstructedPatchDataset, load_mae_artifact
from dq_ops.store import QUANTIZED_SPLIT, Store


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
    (``dq_ops.mae_store.ReconstructedPatchDataset``); otherwise the ingested images."""
    if mae_name is None:
        return SubsetImages(store, subset_name)

    stored = [name for name in store.list("patches") if store.open("patches", name).group.attrs.get("subset") == subset_name]
    if not stored:
        raise DQInputError(f"{store.artifact_url('subsets', subset_name)}: no patch store was made for this subset")
    model = load_mae_artifact(store.open("models", mae_name))
    return ReconstructedPatchDataset(store.open("patches", stored[-1]).group, model)
