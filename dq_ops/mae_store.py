"""MAE checkpoints on disk and in the store: the file and Zarr I/O beside :mod:`dq_ops.mae`,
which holds only the model and its algorithms."""

from __future__ import annotations

import fsspec
import numpy as np

from dq_ops.errors import DQInputError
from dq_ops.mae import MaskedAutoencoder, mae_checkpoint_bytes, mae_from_checkpoint_bytes
from dq_ops.store import Artifact


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
