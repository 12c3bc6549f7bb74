"""Store-aware stages: read an artifact, run the pure algorithm, write the next artifact.

These are what the Prefect tasks wrap and what a library user calls to run DQ without Prefect.
Each stage names its output by :func:`dq_ops.store.derive_key` over its parameters and input
fingerprints, returns at once when that artifact already exists, and hands dask workers URLs and
row indices, never arrays.

Artifacts written here (see :mod:`dq_ops.store` for the layout):

* ``bins/<key>``: ``bin_of_sample`` (n,) int32 over the quantized split, ``ids``; attributes
  ``num_bins`` and ``bin_sizes`` (classes × bins table).
* ``subsets/<key>``: ``indices`` (k,) int64 into the split (sorted), ``ids``; attributes
  ``method``, ``ratio``, ``seed``, ``size``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dq_ops.baselines import select_herding, select_kcenter, select_random
from dq_ops.bins import bin_budgets, generate_bins, generate_class_bins
from dq_ops.config import BinsConfig, EvaluationConfig
from dq_ops.errors import DQInputError
from dq_ops.features import DenseRows, FeatureRows, GradientEmbedding, class_groups
from dq_ops.sampling import sample_bins, sample_sizes
from dq_ops.store import Artifact, Store, derive_key, write_array
from dq_ops.text_eval import evaluate_text_subset
from dq_ops.train import TrainConfig, train_and_evaluate

QUANTIZED_SPLIT = "train"
BASELINES: dict[str, Callable[..., np.ndarray]] = {
    "random": select_random,
    "kcenter": select_kcenter,
    "herding": select_herding,
}
Progress = Callable[[int, int], None]


def split_labels(dataset: Artifact, split: str = QUANTIZED_SPLIT) -> np.ndarray | None:
    """The split's labels, or None when the dataset is unlabelled (all -1)."""
    labels = np.asarray(dataset[f"{split}/labels"][:])
    return None if (labels < 0).all() else labels


def embedding_rows(embeddings: Artifact, rows: np.ndarray | None = None) -> FeatureRows:
    """Rows of an embeddings artifact (all, or ``rows``) as bins take them: dense features, or
    the factorised gradient embedding when the artifact holds ``gradients`` (mode="gradient")."""
    def read(name: str) -> np.ndarray:
        array = embeddings[name]
        return np.asarray(array[:] if rows is None else array.get_orthogonal_selection((rows, slice(None))))

    if "gradients" in embeddings.group:
        return GradientEmbedding(read("gradients"), read("features"))
    return DenseRows(read("features"))


def _class_bins_worker(
    store_url: str, embeddings_name: str, rows: np.ndarray, budgets: np.ndarray, params: dict[str, Any]
) -> list[np.ndarray]:
    """One class's bins, run on a dask worker: read the class's rows from the store, run the greedy."""
    embeddings = Store(store_url).open("embeddings", embeddings_name)
    return generate_class_bins(
        embedding_rows(embeddings, rows), budgets, kernel=params["kernel"], memory_budget_mb=params["memory_budget_mb"]
    )


def generate_bins_stage(
    store: Store,
    dataset: Artifact,
    embeddings: Artifact,
    params: BinsConfig,
    *,
    client: Any = None,
    progress: Progress | None = None,
) -> Artifact:
    """GraphCut bins of the quantized split; classes fan out over ``client`` (a dask Client) if given.

    The (classes × bins) budget table is computed up front from the class sizes, which makes
    every class an independent greedy (see :mod:`dq_ops.bins`).
    """
    settings = params.model_dump(mode="json")
    name = derive_key("bins", settings, [dataset.fingerprint, embeddings.fingerprint])
    if store.exists("bins", name):
        return store.open("bins", name)
    labels = split_labels(dataset)
    n = embeddings["features"].shape[0]
    if labels is not None and len(labels) != n:
        raise DQInputError(f"{embeddings.url}: {n} embeddings for {len(labels)} labelled samples in {dataset.url}")
    classes, groups = class_groups(labels, n)
    classes = np.array([-1]) if classes is None else classes
    for c, members in zip(classes, groups):
        if len(members) < params.num_bins:
            raise DQInputError(f"bins.num_bins={params.num_bins} is larger than class {c} ({len(members)} samples)")
    budgets = bin_budgets([len(g) for g in groups], params.num_bins)

    bin_of_sample = np.empty(n, dtype=np.int32)
    if client is None:
        bins = generate_bins(embedding_rows(embeddings), labels, params.num_bins, kernel=params.kernel, memory_budget_mb=params.memory_budget_mb)
        for b, members in enumerate(bins):
            bin_of_sample[members] = b
        if progress:
            progress(len(groups), len(groups))
    else:
        from distributed import as_completed

        futures = {
            client.submit(_class_bins_worker, store.url, embeddings.name, members, budgets[c], settings, pure=False): c
            for c, members in enumerate(groups)
        }
        for done, future in enumerate(as_completed(futures), 1):
            members = groups[futures[future]]
            for b, local in enumerate(future.result()):
                bin_of_sample[members[local]] = b
            if progress:
                progress(done, len(groups))
    with store.write("bins", name, settings, [dataset.fingerprint, embeddings.fingerprint]) as group:
        write_array(group, "bin_of_sample", bin_of_sample)
        write_array(group, "ids", np.asarray(dataset[f"{QUANTIZED_SPLIT}/ids"][:]))
        group.attrs.update({
            "num_bins": params.num_bins,
            "classes": [int(c) for c in classes],
            "bin_sizes": budgets.tolist(),
        })
    return store.open("bins", name)


def bins_as_lists(bins: Artifact) -> list[np.ndarray]:
    """The bins artifact as ``generate_bins`` returns them: sorted indices per bin."""
    bin_of_sample = np.asarray(bins["bin_of_sample"][:])
    return [np.flatnonzero(bin_of_sample == b) for b in range(int(bins.group.attrs["num_bins"]))]


def _write_subset(store: Store, name: str, settings: dict[str, Any], inputs: list[str], dataset: Artifact, indices: np.ndarray) -> Artifact:
    indices = np.sort(np.asarray(indices, dtype=np.int64))
    with store.write("subsets", name, settings, inputs) as group:
        write_array(group, "indices", indices)
        write_array(group, "ids", np.asarray(dataset[f"{QUANTIZED_SPLIT}/ids"].get_orthogonal_selection((indices,))))
        group.attrs.update(settings | {"size": int(len(indices)), "dataset": dataset.name})
    return store.open("subsets", name)


def sample_subset_stage(store: Store, dataset: Artifact, bins: Artifact, ratio: float, seed: int) -> Artifact:
    """The DQ subset at ``ratio``: uniform per bin and class (``dq_ops.sampling.sample_bins``)."""
    settings = {"method": "dq", "ratio": ratio, "seed": seed}
    name = derive_key("subsets", settings, [dataset.fingerprint, bins.fingerprint])
    if not store.exists("subsets", name):
        indices = sample_bins(bins_as_lists(bins), split_labels(dataset), ratio, seed)
        return _write_subset(store, name, settings, [dataset.fingerprint, bins.fingerprint], dataset, indices)
    return store.open("subsets", name)


def baseline_subset_stage(
    store: Store, dataset: Artifact, embeddings: Artifact, bins: Artifact, method: str, ratio: float, seed: int
) -> Artifact:
    """A comparison subset (random, k-center, herding) with exactly the DQ subset's per-class sizes."""
    if method not in BASELINES:
        raise DQInputError(f"unknown baseline {method!r}; expected one of {', '.join(BASELINES)}")
    settings = {"method": method, "ratio": ratio, "seed": seed}
    inputs = [dataset.fingerprint, embeddings.fingerprint, bins.fingerprint]
    name = derive_key("subsets", settings, inputs)
    if not store.exists("subsets", name):
        labels = split_labels(dataset)
        sizes = sample_sizes(bins_as_lists(bins), labels, ratio)
        indices = BASELINES[method](embedding_rows(embeddings), labels, ratio, seed, sizes=sizes)
        return _write_subset(store, name, settings, inputs, dataset, indices)
    return store.open("subsets", name)


def evaluate_stage(
    store: Store,
    dataset: Artifact,
    subset: Artifact | None,
    params: EvaluationConfig,
    seed: int,
    *,
    images: Artifact | None = None,
    progress: Progress | None = None,
) -> Artifact:
    """Train ``params.architecture`` from scratch on a subset (None: the whole split) and test it.

    ``images``: a reconstructions artifact whose ``images`` (one row per subset sample) replace
    the ingested pixels, i.e. the DQ arm trained on what patch dropping + MAE actually restore.
    The result (``dq_ops.train.TrainResult`` fields) is stored in ``evaluations/<key>``' attributes.
    """
    if "test" not in dataset.group:
        raise DQInputError(f"{dataset.url} has no 'test' split to evaluate on; ingest one or disable evaluation")
    settings = {
        "architecture": params.architecture, "epochs": params.epochs, "min_steps": params.min_steps,
        "max_steps": params.max_steps, "seed": seed,
    }
    inputs = [dataset.fingerprint] + [a.fingerprint for a in (subset, images) if a is not None]
    name = derive_key("evaluations", settings, inputs)
    if store.exists("evaluations", name):
        return store.open("evaluations", name)
    split = dataset[QUANTIZED_SPLIT]
    if subset is None:
        rows = np.arange(split["labels"].shape[0])
        pixels = np.asarray(split["images"][:])
    else:
        rows = np.asarray(subset["indices"][:])
        pixels = np.asarray(images["images"][:] if images is not None else split["images"].get_orthogonal_selection((rows,)))
    labels = np.asarray(split["labels"].get_orthogonal_selection((rows,)))
    test = dataset["test"]
    class_names = dataset.group.attrs.get("class_names")
    result = train_and_evaluate(
        pixels, labels, np.asarray(test["images"][:]), np.asarray(test["labels"][:]),
        model=params.architecture, num_classes=len(class_names) if class_names else None,
        config=TrainConfig(epochs=params.epochs, min_steps=params.min_steps, max_steps=params.max_steps),
        seed=seed, progress=progress,
    )
    with store.write("evaluations", name, settings, inputs) as group:
        group.attrs.update(dataclasses.asdict(result))
    return store.open("evaluations", name)


def evaluate_text_stage(
    store: Store, dataset: Artifact, subset: Artifact | None, embeddings: Artifact, test_embeddings: Artifact
) -> Artifact:
    """Text evaluation: classifiers fitted on the subset's sentence embeddings, scored on the
    held-out 'test' split (``dq_ops.text_eval``). ``test_accuracy`` is the logistic regression's."""
    if "test" not in dataset.group or split_labels(dataset) is None:
        raise DQInputError(f"{dataset.url}: text evaluation needs labels and a 'test' split (set dataset.test_fraction)")
    inputs = [dataset.fingerprint, embeddings.fingerprint, test_embeddings.fingerprint]
    inputs += [subset.fingerprint] if subset is not None else []
    name = derive_key("evaluations", {"evaluation": "text"}, inputs)
    if store.exists("evaluations", name):
        return store.open("evaluations", name)
    labels = np.asarray(dataset[f"{QUANTIZED_SPLIT}/labels"][:])
    rows = np.arange(len(labels)) if subset is None else np.asarray(subset["indices"][:])
    started = time.perf_counter()
    result = evaluate_text_subset(
        np.asarray(embeddings["features"].get_orthogonal_selection((rows, slice(None)))), labels[rows],
        np.asarray(test_embeddings["features"][:]), np.asarray(dataset["test/labels"][:]),
    )
    with store.write("evaluations", name, {"evaluation": "text"}, inputs) as group:
        group.attrs.update(dataclasses.asdict(result) | {
            "test_accuracy": result.logistic_regression_accuracy, "val_accuracy": None, "n_val": 0,
            "train_seconds": time.perf_counter() - started,
        })
    return store.open("evaluations", name)
