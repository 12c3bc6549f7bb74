"""One configuration model for a quantization run.

The same object is loaded from YAML by the CLI, validated here, and passed unchanged as the
Prefect flow's parameter (the Prefect UI renders it as a form). Defaults run the bundled real
Fashion-MNIST on a CPU laptop in minutes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dq_ops.errors import DQInputError
from dq_ops.sampling import BinWeights

DatasetFormat = Literal[
    "fashion-mnist", "idx", "image-folder", "npz", "zarr", "parquet", "webdataset", "jsonl", "json", "fortunes",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetConfig(_Section):
    """Where the data comes from and how to read it."""

    format: DatasetFormat = Field("fashion-mnist", description="Source format.")
    url: str = Field(
        "/usr/share/datasets/fashion-mnist",
        description="Path or fsspec URL of the source (a folder for idx/fashion-mnist/image-folder, a file for npz/jsonl/json, a group for zarr, a folder of topic files or one file for fortunes, a folder, file or glob of shards for parquet/webdataset).",
    )
    name: str = Field("fashion-mnist", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Dataset name in the store.")
    limit: int | None = Field(None, ge=1, description="Ingest at most this many samples per split (quick runs).")
    resize: int | None = Field(None, ge=1, description="Resize images to this square size; required when image sizes differ.")
    on_error: Literal["raise", "skip"] = Field("raise", description="Bad items: fail naming the item, or skip and report it.")
    max_image_pixels: int = Field(
        89_478_485, ge=1,  # Pillow's Image.MAX_IMAGE_PIXELS (dq_ops.readers.base.DEFAULT_MAX_IMAGE_PIXELS)
        description="Images (image folders, Parquet and WebDataset shards): an image with more pixels (width × height) is a bad item, as a decompression bomb could be; raise it to ingest larger images. The default is Pillow's own limit.",
    )
    test_fraction: float | None = Field(
        None, gt=0, lt=1,
        description="For a source with only a 'train' split: hold out this fraction as 'test', chosen by a hash of each sample id (stable when the source is refreshed).",
    )
    text_fields: list[str] = Field(
        default_factory=lambda: ["instruction", "input", "output"],
        description="JSON fields joined into one text per record (Alpaca layout by default).",
    )
    label_field: str | None = Field(
        "label",
        description="Where labels are: the JSON field (json/jsonl, optional per record; webdataset <key>.json when there is no <key>.cls) or the Parquet column; null for none.",
    )
    image_field: str = Field("image", description="Parquet column of encoded images: a struct with 'bytes' (Hugging Face layout) or binary.")

    @property
    def is_text(self) -> bool:
        return self.format in ("jsonl", "json", "fortunes")


class EmbeddingConfig(_Section):
    """Stage 1: features."""

    backbone: str = Field("efficientnet-lite0", description="Registered backbone, or 'timm:<arch>' / 'torchvision:<arch>'.")
    weights: str | None = Field(None, description="Local path or fsspec URL of backbone weights (safetensors or a state dict).")
    image_size: int = Field(32, ge=8, description="Images are resized to this square size before the backbone.")
    batch_size: int = Field(256, ge=1, description="Images per forward pass on a worker.")
    chunk_rows: int | None = Field(
        None, ge=1, description="Rows per dask task, the unit a killed run resumes from (default: up to 4096, ~64 MB of input)."
    )
    mode: Literal["embedding", "gradient"] = Field(
        "embedding", description="'embedding': penultimate features; 'gradient': the reference's last-layer gradient embedding."
    )
    text_model: str = Field("all-MiniLM-L6-v2", description="Sentence-embedding model for text datasets.")


class BinsConfig(_Section):
    """Stage 2: GraphCut bins."""

    num_bins: int = Field(10, ge=1, description="K: bins per class (the last is the remainder).")
    kernel: Literal["cosine", "dot"] = Field("cosine", description="'cosine': 0.5 + 0.5·cos (images); 'dot': raw dot product (reference text path).")
    budget_rule: Literal["per-class", "reference"] = Field(
        "per-class",
        description="Samples per bin: 'per-class' round(n_c_left/(K−b)) depends on the class alone (a refresh re-bins only "
        "the classes it touched); 'reference' is the reference code's rule, coupled to the dataset size.",
    )
    memory_budget_mb: int = Field(256, ge=1, description="Largest per-class Gram matrix kept in memory (speed only).")
    refresh: Literal["exact", "incremental"] = Field(
        "exact",
        description="On a refreshed dataset: 'exact' re-bins the classes whose samples changed, as a full run would; "
        "'incremental' keeps existing samples in their bins and joins new and relabelled samples (in their new class) by their "
        "GraphCut gain (a more stable selection).",
    )
    rebuild_fraction: float = Field(
        0.2, gt=0, le=1,
        description="incremental: rebuild exactly once the samples joined or removed since the last rebuild exceed this share of the data.",
    )


class SamplingConfig(_Section):
    """Stage 3: draw the subset from the bins."""

    ratios: list[float] = Field(default_factory=lambda: [0.1], min_length=1, description="Keep ratios in (0, 1]; bins are reused for each.")
    bin_weights: Literal["auto"] | BinWeights = Field(
        "auto",
        description="How a class's samples are spread over its bins: 'uniform' the same ratio in every bin (the paper); "
        "'later-bins' bin b drawn b+1 times as intensely as bin 0 (more rare and boundary samples); 'budget-aware' "
        "a class keeping fewer samples than it has bins takes one from each of its first bins (its most typical "
        "samples), other classes later-bins; 'adaptive' ADQ's "
        "per-bin ratios (dq_ops.adaptive); 'auto' budget-aware for images, uniform for texts (what bench/quality.py "
        "measured best). Class sizes are the same for every rule.",
    )
    adaptive_alpha: float = Field(0.5, ge=0, le=1, description="'adaptive': ADQ's α, the weight of bin importance against bin size.")

    def rule_for(self, modality: str) -> BinWeights:
        """The bin-weight rule a dataset of ``modality`` ('images' or 'texts') is drawn with."""
        if self.bin_weights != "auto":
            return self.bin_weights
        return "budget-aware" if modality == "images" else "uniform"

    @field_validator("ratios")
    @classmethod
    def _ratios_in_range(cls, ratios: list[float]) -> list[float]:
        bad = [r for r in ratios if not 0 < r <= 1]
        if bad:
            raise ValueError(f"keep ratios must lie in (0, 1]; got {bad}")
        return sorted(set(ratios))


class PatchConfig(_Section):
    """Stages 4-5: patch dropping and MAE reconstruction (image datasets only)."""

    enabled: bool = Field(True, description="Drop patches and reconstruct them (image datasets only).")
    patch_size: int = Field(4, ge=1, description="Square patch side in pixels of the stored image (must divide it).")
    drop_ratio: float = Field(0.2, ge=0, lt=1, description="θ: fraction of patches dropped per image.")
    cam_image_size: int = Field(112, ge=32, description="Images are resized to this size for the backbone's Grad-CAM++.")
    mae_checkpoint: str | None = Field(None, description="Path/URL of an MAE checkpoint (dq safetensors) to use instead of training one.")
    mae_epochs: int = Field(3, ge=1, description="Epochs when the pipeline trains its own MAE.")
    mae_mask_ratio: float = Field(
        0.4, gt=0, lt=1,
        description="Random masking ratio in MAE training; 0.4 restored Grad-CAM++ drop patterns better than MAE's usual 0.75 (bench/patches.py).",
    )
    mae_train_samples: int = Field(6000, ge=1, description="Images of the split (seeded sample) the MAE trains on.")
    chunk_rows: int | None = Field(
        None, ge=1, description="Images per dask task and per Zarr chunk of the patch store (default: about 1 MiB of kept patches).",
    )


# The evaluation networks dq_ops.models builds, named here so that checking a configuration
# (in the flow process, which never loads torch) does not import them.
MODEL_NAMES: tuple[str, ...] = ("medium_cnn", "small_cnn", "resnet18", "vit_tiny")


class EvaluationConfig(_Section):
    """Stage 6: train from scratch on each arm's subset and compare."""

    enabled: bool = Field(True, description="Train/evaluate the arms below (text datasets: held-out topic accuracy).")
    arms: list[Literal["dq", "dq_pixels", "random", "kcenter", "herding", "full"]] = Field(
        default_factory=lambda: ["dq", "dq_pixels", "random"],
        description="Subsets to compare, all with the DQ subset's per-class sizes ('full': the whole split). 'dq' trains on "
        "the DQ draw's original images, 'dq_pixels' on the same draw's MAE-reconstructed images (image datasets with "
        "patches enabled; skipped otherwise).",
    )
    architecture: str = Field("medium_cnn", description="Registered evaluation network (dq_ops.models).")
    seeds: list[int] = Field(
        default_factory=lambda: [0], min_length=1,
        description="Paired draws: seed s draws every sampled arm's subset (dq, dq_pixels, random) and seeds its training; "
        "k-center and herding draw once (config seed). Mean ± std per arm; with 2+ seeds a 95% t-interval on DQ − random.",
    )
    epochs: float = Field(60.0, gt=0, description="Passes over the training part (see dq_ops.train).")
    min_steps: int = Field(1000, ge=1, description="At least this many SGD steps, so tiny subsets still converge.")
    max_steps: int | None = Field(None, ge=1, description="Cap on SGD steps (keeps the full-data arm affordable).")
    shuffle_window_mb: float = Field(
        1024.0, gt=0,
        description="Most training images (uint8 MiB) a training run holds at once. A larger training part streams from the "
        "store in block-shuffled windows of this size (the order then depends on it, and so does the evaluation's key).",
    )

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"evaluation seeds must be distinct (each is one paired draw); got {seeds}")
        return seeds


class TrackingConfig(_Section):
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default: sqlite database inside a local store.")
    experiment: str = Field("dq", description="MLflow experiment name.")


class ClusterConfig(_Section):
    """Where dask work runs: the executor, apart from what it does."""

    kind: Literal["local", "local-cuda", "address", "auto"] = Field(
        "auto", description="'auto': local CUDA cluster when GPUs and dask-cuda exist, else a local CPU cluster."
    )
    address: str | None = Field(None, description="Scheduler address for kind='address'.")
    n_workers: int | None = Field(None, ge=1, description="Local cluster workers (default: dask's choice).")
    threads_per_worker: int | None = Field(None, ge=1, description="Threads per local worker.")

    @model_validator(mode="after")
    def _address_given(self) -> ClusterConfig:
        if self.kind == "address" and not self.address:
            raise ValueError("cluster.kind='address' needs cluster.address (e.g. tcp://scheduler:8786)")
        return self


class DQConfig(_Section):
    """A whole quantization run."""

    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    store_url: str = Field("./dq-store", description="Root of the Zarr store (path or fsspec URL).")
    seed: int = Field(0, description="Seeds every random choice (heads, sampling, training).")
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    bins: BinsConfig = Field(default_factory=BinsConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    patches: PatchConfig = Field(default_factory=PatchConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @classmethod
    def from_yaml(cls, path: str | Path) -> DQConfig:
        """Load and validate a YAML file; errors name the file and each bad field."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise DQInputError(f"{path}: config file not found") from None
        except yaml.YAMLError as exc:
            raise DQInputError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(raw, dict):
            raise DQInputError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in exc.errors()
            )
            raise DQInputError(f"{path}: invalid config: {problems}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def reference_markdown() -> str:
    """``docs/configuration.md``: every field of :class:`DQConfig` with its default and description
    (``python -m dq_ops.config > docs/configuration.md``; a test keeps the page in step)."""
    rows = []
    defaults = DQConfig()
    for name, field in DQConfig.model_fields.items():
        value = getattr(defaults, name)
        if isinstance(value, _Section):
            rows += [(f"{name}.{sub}", getattr(value, sub), inner.description or "")
                     for sub, inner in type(value).model_fields.items()]
        else:
            rows.append((name, value, field.description or ""))
    table = "\n".join(f"| `{key}` | `{default!r}` | {text} |" for key, default, text in rows)
    return f"""# Configuration

One pydantic model, `dq_ops.config.DQConfig`: loaded from YAML by the CLI
(`deployments/configs/fashion-mnist.yaml` lists every field), validated with messages that name
the file and field, and used unchanged as the flow's parameter (the Prefect UI renders it as a
form). This page is generated from the model: `python -m dq_ops.config > docs/configuration.md`.

| field | default | meaning |
|---|---|---|
{table}
"""


if __name__ == "__main__":
    print(reference_markdown(), end="")
