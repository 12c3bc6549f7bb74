"""Dataset readers: turn a source (IDX files, an image folder, npz/Zarr, Parquet or WebDataset shards,
JSON/JSONL, fortune files) into batches
of samples with stable ids. Readers only read; ``dq_ops.ingest`` writes them into a store.

Every reader follows :class:`~dq_ops.readers.base.Reader`; :func:`open_reader` picks one for a
:class:`~dq_ops.config.DatasetConfig`.
"""

from __future__ import annotations

from dq_ops.config import DatasetConfig
from dq_ops.errors import DQInputError
from dq_ops.readers.base import Batch, Reader, SkippedItem
from dq_ops.readers.fortunes import FortunesReader
from dq_ops.readers.idx import FASHION_MNIST_CLASSES, IdxReader
from dq_ops.readers.image_folder import ImageFolderReader
from dq_ops.readers.json_records import JsonRecordsReader
from dq_ops.readers.npz import NpzReader
from dq_ops.readers.parquet import ParquetReader
from dq_ops.readers.webdataset import WebDatasetReader
from dq_ops.readers.zarr_group import ZarrGroupReader

__all__ = [
    "Batch", "FortunesReader", "IdxReader", "ImageFolderReader", "JsonRecordsReader", "NpzReader", "ParquetReader",
    "Reader", "SkippedItem", "WebDatasetReader", "ZarrGroupReader", "open_reader",
]


def open_reader(config: DatasetConfig) -> Reader:
    """The reader for ``config.format``, set up with the config's limit, resize and error policy."""
    match config.format:
        case "fashion-mnist" | "idx":
            classes = FASHION_MNIST_CLASSES if config.format == "fashion-mnist" else None
            return IdxReader(config.url, class_names=classes, resize=config.resize, limit=config.limit)
        case "image-folder":
            return ImageFolderReader(config.url, resize=config.resize, on_error=config.on_error, limit=config.limit,
                                     max_image_pixels=config.max_image_pixels)
        case "npz":
            return NpzReader(config.url, resize=config.resize, limit=config.limit)
        case "zarr":
            return ZarrGroupReader(config.url, resize=config.resize, limit=config.limit)
        case "parquet":
            return ParquetReader(config.url, image_field=config.image_field, label_field=config.label_field,
                                 resize=config.resize, on_error=config.on_error, limit=config.limit,
                                 max_image_pixels=config.max_image_pixels)
        case "webdataset":
            return WebDatasetReader(config.url, label_field=config.label_field, resize=config.resize,
                                    on_error=config.on_error, limit=config.limit, max_image_pixels=config.max_image_pixels)
        case "fortunes":
            return FortunesReader(config.url, limit=config.limit)
        case "json" | "jsonl":
            return JsonRecordsReader(
                config.url,
                layout=config.format,
                text_fields=config.text_fields,
                label_field=config.label_field,
                on_error=config.on_error,
                limit=config.limit,
            )
    raise DQInputError(f"unknown dataset format {config.format!r}")
