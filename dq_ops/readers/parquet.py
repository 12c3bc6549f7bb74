"""Parquet shards of encoded images, in the Hugging Face datasets layout by default::

    root/[data/]train-00000-of-00004.parquet, ..., test-00000-of-00001.parquet   (or train/*.parquet)

Columns: ``image_field`` (default ``image``) is a struct with ``bytes`` (PNG/JPEG/WebP) and
``path``, as ``datasets.Image`` stores it, or a plain binary column; ``label_field`` (default
``label``, none with ``null``) holds integer labels; an optional ``id`` column names the samples.
Class names come from the ``ClassLabel`` feature in the schema's ``huggingface`` metadata when
the first shard has one.

Only the footers are read up front (row counts, columns). Rows stream in batches within a row
group, so memory holds one batch of encoded images, never a whole shard. Samples are named
``<shard>:<row>`` (``dq_ops.readers.shards``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from dq_ops.errors import DQInputError
from dq_ops.readers.base import DEFAULT_MAX_IMAGE_PIXELS, NO_LABEL, ItemErrors, OnError
from dq_ops.readers.shards import Record, Shard, ShardReader

ID_COLUMN = "id"
# Rows per read: a few encoded images at a time, whatever the writer's row-group size.
_ROWS_PER_READ = 64


class ParquetReader(ShardReader):
    """``*.parquet`` shards (a folder, one file or a glob; path or fsspec URL)."""

    suffixes = (".parquet",)
    kind = "Parquet"

    def __init__(self, url: str, *, image_field: str = "image", label_field: str | None = "label",
                 resize: int | None = None, on_error: OnError = "raise", limit: int | None = None,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self._image, self._label = image_field, label_field
        super().__init__(url, resize=resize, on_error=on_error, limit=limit, max_image_pixels=max_image_pixels)
        first = next(iter(self._shards.values()))[0]
        with self._fs.open(first.path, "rb") as fh:
            self._classes = _class_names(pq.ParquetFile(fh).schema_arrow, label_field)

    def _open_shard(self, path: str, name: str) -> Shard:
        """Check the shard's columns from its footer and count its rows."""
        where = self._where(name)
        try:
            with self._fs.open(path, "rb") as fh:
                metadata = pq.ParquetFile(fh).metadata
        except (pa.ArrowException, OSError) as exc:
            raise DQInputError(f"{where}: not a readable Parquet file ({exc})") from None
        schema = metadata.schema.to_arrow_schema()
        columns = ", ".join(schema.names)
        if self._image not in schema.names:
            raise DQInputError(f"{where}: no image column {self._image!r} (columns: {columns}); set dataset.image_field")
        image = schema.field(self._image).type
        if not (_is_binary(image) or (pa.types.is_struct(image) and image.get_field_index("bytes") >= 0
                                      and _is_binary(image.field("bytes").type))):
            raise DQInputError(f"{where}: column {self._image!r} is {image}; expected encoded images (binary, or a struct with 'bytes')")
        if self._label is not None:
            if self._label not in schema.names:
                raise DQInputError(
                    f"{where}: no label column {self._label!r} (columns: {columns}); set dataset.label_field, or null for no labels"
                )
            if not pa.types.is_integer(schema.field(self._label).type):
                raise DQInputError(f"{where}: column {self._label!r} is {schema.field(self._label).type}; expected integer labels")
        return Shard(path, name, metadata.num_rows)

    def class_names(self) -> list[str] | None:
        return self._classes

    def _records(self, shard: Shard, errors: ItemErrors) -> Iterator[Record]:
        with self._fs.open(shard.path, "rb") as fh:
            file = pq.ParquetFile(fh)
            wanted = [self._image, *([self._label] if self._label else []), *([ID_COLUMN] if ID_COLUMN in file.schema_arrow.names else [])]
            row = 0
            for batch in file.iter_batches(batch_size=_ROWS_PER_READ, columns=wanted):
                images = batch.column(self._image)
                data = (images.field("bytes") if pa.types.is_struct(images.type) else images).to_pylist()
                present = images.is_valid().to_pylist()
                labels = batch.column(self._label).to_pylist() if self._label else [NO_LABEL] * len(batch)
                ids = batch.column(ID_COLUMN).to_pylist() if ID_COLUMN in wanted else [None] * len(batch)
                for encoded, has_image, label, sample_id in zip(data, present, labels, ids):
                    name = f"{shard.name}:{row}"
                    row += 1
                    if not has_image or encoded is None:
                        errors.bad(self._where(name), f"no image bytes in column {self._image!r}")
                    elif label is None:
                        errors.bad(self._where(name), f"missing label (null in column {self._label!r})")
                    else:
                        yield Record(name, encoded, label, None if sample_id is None else str(sample_id))


def _is_binary(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _class_names(schema: pa.Schema, label: str | None) -> list[str] | None:
    """The label's ``ClassLabel`` names from Hugging Face's schema metadata, if it has them."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if raw is None or label is None:
        return None
    try:
        feature = json.loads(raw)["info"]["features"][label]
    except (ValueError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return [str(n) for n in names] if isinstance(names, list) and names else None
