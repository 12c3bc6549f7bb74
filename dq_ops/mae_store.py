"""The MAE outside memory: safetensors checkpoints (bytes, files or fsspec URLs, ``models/<key>``
artifacts) and a patch store read back as a torch ``Dataset`` with its dropped patches restored.
The model and its algorithms are in :mod:`dq_ops.mae`."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import fsspec
import numpy as np
import torch
import zarr
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch.utils.data import Dataset

from dq_ops.errors import DQInputError
from dq_ops.mae import MAEConfig, MaskedAutoencoder, reconstruct
from dq_ops.patch_store import PatchStore, unpack_patches
from dq_ops.store import Artifact

CONFIG_KEY = "dq_mae_config"


def mae_checkpoint_bytes(model: MaskedAutoencoder) -> bytes:
    """A safetensors checkpoint of ``model`` with its config JSON in the metadata."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return save_safetensors(state, metadata={CONFIG_KEY: model.config.to_json()})


def mae_from_checkpoint_bytes(payload: bytes, source: str) -> MaskedAutoencoder:
    """The model (eval mode) in a :func:`mae_checkpoint_bytes` payload; ``source`` names it in errors."""
    try:
        header_size = int.from_bytes(payload[:8], "little")
        metadata = json.loads(payload[8:8 + header_size]).get("__metadata__") or {}
        model = MaskedAutoencoder(MAEConfig.from_json(metadata[CONFIG_KEY]))
        model.load_state_dict(load_safetensors(payload), strict=True)
    except (SafetensorError, KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise DQInputError(f"{source}: not a valid dq MAE checkpoint ({type(exc).__name__}: {exc})") from None
    return model.eval()


def save_mae(model: MaskedAutoencoder, path: str) -> None:
    """Write a safetensors checkpoint (path or fsspec URL) with the config JSON in its metadata."""
    with fsspec.open(str(path), "wb", auto_mkdir=True) as fh:
        fh.write(mae_checkpoint_bytes(model))


def load_mae(path: str) -> MaskedAutoencoder:
    """Load a :func:`save_mae` checkpoint (eval mode); a missing or corrupt file raises
    :class:`DQInputError` naming it."""
    try:
        with fsspec.open(str(path), "rb") as fh:
            payload = fh.read()
    except FileNotFoundError:
        raise DQInputError(f"{path}: MAE checkpoint not found") from None
    except OSError as exc:
        raise DQInputError(f"{path}: unreadable MAE checkpoint ({exc})") from None
    return mae_from_checkpoint_bytes(payload, str(path))


def load_mae_artifact(artifact: Artifact) -> MaskedAutoencoder:
    """The MAE held by a ``models/<key>`` artifact."""
    return mae_from_checkpoint_bytes(np.asarray(artifact["checkpoint"][:]).tobytes(), artifact.url)


class ReconstructedPatchDataset(Dataset):
    """A torch ``Dataset`` over a patch store that restores the dropped patches on read.

    Item ``i`` is ``(image, label)``: a float32 tensor ``(C, H, W)`` in [0, 1] (after
    ``transform`` if given) and the stored int label (-1 = none). ``__getitems__`` reads and
    reconstructs a whole batch at once (a ``DataLoader`` with automatic batching uses it).
    """

    def __init__(
        self,
        group: zarr.Group,
        model: MaskedAutoencoder,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.store = PatchStore(group)
        self.model = model.eval()
        self.transform = transform
        self.labels = np.asarray(self.store.labels[:], dtype=np.int64)
        self.ids = self.store.ids

    def __len__(self) -> int:
        return len(self.store)

    def _items(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        images, keep_mask = unpack_patches(self.store.read(np.asarray(indices, dtype=np.int64)))
        restored = reconstruct(self.model, images, keep_mask)
        pixels = torch.from_numpy(restored if restored.ndim == 4 else restored[..., None])
        pixels = pixels.permute(0, 3, 1, 2).float() / 255.0
        return [
            (self.transform(x) if self.transform else x, int(self.labels[i])) for x, i in zip(pixels, indices)
        ]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._items([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        return self._items(indices)
