"""Checks that a run can succeed, made before its expensive stages.

:func:`check_config` needs only the configuration (the CLI calls it before it starts Prefect);
:func:`check_dataset` also the ingested dataset (the flow calls :func:`preflight`, both, right
after ingest). Each raises :class:`DQInputError` naming the option as the user writes it
(``patches.patch_size``) and the dataset or file at fault, so a run that cannot produce what it
was asked for stops in seconds instead of after the embeddings.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from dq_ops.bins import bin_budgets
from dq_ops.cluster import check_scheduler
from dq_ops.config import MODEL_NAMES, DQConfig
from dq_ops.errors import DQInputError
from dq_ops.features import class_groups
from dq_ops.sampling import keep_count
from dq_ops.store import QUANTIZED_SPLIT, Artifact
from dq_ops.urls import filesystem, protocol_of


def preflight(config: DQConfig, dataset: Artifact) -> None:
    """Every check: :func:`check_config`, then :func:`check_dataset`."""
    check_config(config)
    check_dataset(config, dataset)


def check_config(config: DQConfig) -> None:
    """What can be checked without the data: URLs, the store, names, files, the cluster."""
    filesystem(config.dataset.url)
    check_store_writable(config.store_url)
    if config.dataset.is_text:
        from dq_ops.backbone_spec import text_dim

        text_dim(config.embedding.text_model)
    else:
        _check_backbone(config)
        if config.evaluation.enabled:
            if config.evaluation.architecture not in MODEL_NAMES:
                raise DQInputError(
                    f"evaluation.architecture: unknown model {config.evaluation.architecture!r}; known: {', '.join(MODEL_NAMES)}"
                )
        if config.patches.enabled and config.patches.mae_checkpoint:
            from dq_ops.mae_store import load_mae

            load_mae(config.patches.mae_checkpoint)
    if config.cluster.kind == "address":
        check_scheduler(config.cluster.address)


def check_dataset(config: DQConfig, dataset: Artifact) -> None:
    """What the ingested dataset must allow: labels, splits, image geometry, non-empty subsets."""
    split = dataset[QUANTIZED_SPLIT]
    labels = np.asarray(split["labels"][:])
    bad = labels[labels < -1]
    if bad.size:
        raise DQInputError(f"{dataset.url}: label {int(bad[0])} is negative (only -1, 'no label', is allowed)")
    labelled = not (labels < 0).all()
    class_names = dataset.group.attrs.get("class_names")
    is_images = "images" in split
    if config.evaluation.enabled:
        if "test" not in dataset.group:
            hint = "set dataset.test_fraction" if config.dataset.is_text else "ingest one"
            raise DQInputError(f"evaluation.enabled: {dataset.url} has no 'test' split to evaluate on ({hint}, or disable evaluation)")
        if not labelled:
            raise DQInputError(f"evaluation.enabled: {dataset.url} has no labels to train and test on (disable evaluation)")
    if is_images and config.patches.enabled:
        height, width = split["images"].shape[1:3]
        size = config.patches.patch_size
        if height % size or width % size:
            raise DQInputError(
                f"patches.patch_size={size} does not divide the {height}×{width} images of {dataset.url} "
                f"(divisors: {', '.join(str(d) for d in range(1, min(height, width) + 1) if height % d == 0 and width % d == 0)})"
            )
        if config.patches.mae_checkpoint:
            _check_mae_fits(config, (height, width, split["images"].shape[3]))

    classes, groups = class_groups(labels if labelled else None, len(labels))
    # What each rounding unit holds (dq_ops.sampling): every (class, bin) cell under the
    # reference's budgets, every class otherwise.
    per_bin = config.bins.budget_rule == "reference"
    units = (bin_budgets([len(g) for g in groups], config.bins.num_bins, config.bins.budget_rule).ravel() if per_bin
             else np.array([len(g) for g in groups]))
    for ratio in config.sampling.ratios:
        if sum(keep_count(int(count), ratio) for count in units) == 0:
            largest = int(units.max())
            unit = f"the largest of the {config.bins.num_bins} bins per class" if per_bin else "the largest class"
            raise DQInputError(
                f"sampling.ratios: keep ratio {ratio} gives an empty subset: {unit} of {dataset.url} holds {largest} "
                f"samples, and round({ratio} × {largest}) = 0 (use a larger ratio{' or fewer bins' if per_bin else ''})"
            )
    if classes is not None and class_names and int(classes.max()) >= len(class_names):
        raise DQInputError(f"{dataset.url}: label {int(classes.max())} has no class name (classes 0..{len(class_names) - 1})")


def check_store_writable(url: str) -> None:
    """A local store (or the folder it will be made in) must accept new files; remote stores are
    checked by their first write. The probe file is created beside the store's artifacts and
    removed, so the store's content is unchanged."""
    if protocol_of(url) not in ("file", "local"):
        filesystem(url)
        return
    path = Path(url.removeprefix("file://")).expanduser()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise DQInputError(f"store_url {url}: {existing} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".dq-write-probe-"):
            pass
    except OSError as exc:
        raise DQInputError(f"store_url {url}: cannot write in {existing} ({exc.strerror or exc})") from None


def _check_backbone(config: DQConfig) -> None:
    """The backbone name is known and its weights file exists. A prefixed architecture is also
    built (on the meta device) to check that it has a linear classifier to take features from,
    and a weights file the user names is parsed. The packaged default needs neither, so a re-run
    of the default configuration never imports torch."""
    from dq_ops.backbone_spec import DEFAULT_BACKBONE, RANDOM_WEIGHTS, parse_backbone_name, weights_digest

    embedding = config.embedding
    try:
        parse_backbone_name(embedding.backbone)
        if embedding.backbone != DEFAULT_BACKBONE:
            from dq_ops.backbones import backbone_dim

            backbone_dim(embedding.backbone)
    except DQInputError as exc:
        raise DQInputError(f"embedding.backbone: {exc}") from None
    try:
        weights_digest(embedding.backbone, embedding.weights)
        if embedding.weights not in (None, RANDOM_WEIGHTS):
            from dq_ops.backbones import read_state_dict

            read_state_dict(embedding.weights)
    except DQInputError as exc:
        raise DQInputError(f"embedding.weights: {exc}") from None


def _check_mae_fits(config: DQConfig, image_shape: tuple[int, int, int]) -> None:
    from dq_ops.mae_store import load_mae

    model_config = load_mae(config.patches.mae_checkpoint).config
    made_for = (*model_config.image_size, model_config.in_chans, model_config.patch_size)
    if made_for != (*image_shape, config.patches.patch_size):
        raise DQInputError(
            f"patches.mae_checkpoint {config.patches.mae_checkpoint}: made for {made_for[0]}×{made_for[1]} px, "
            f"{made_for[2]} channel(s), patch {made_for[3]}; the data needs {image_shape[0]}×{image_shape[1]} px, "
            f"{image_shape[2]} channel(s), patch {config.patches.patch_size}"
        )
