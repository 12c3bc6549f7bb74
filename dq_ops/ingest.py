"""Ingest: read a dataset source and write it into the store as ``datasets/<name>``.

Each split becomes ``<split>/{images|texts, labels, ids}`` (see ``dq_ops.store``), written in
whole chunks as batches stream in, inside one ``Store.write_snapshot``: the result is the
immutable snapshot ``datasets/<name>-<fingerprint[:12]>`` and ``<name>``'s ``latest`` pointer
moves to it. Re-ingesting unchanged content finds the same snapshot; a failed ingest leaves every
snapshot and the pointer as they were. The dataset group's attributes hold ``modality``
("images" or "texts"), ``class_names`` (or null) and ``source_format``.

The artifact's parameters are the dataset settings that shape its content (format, limit, resize,
error policy, text fields, label field). The source URL and the dataset name are left out, so the
same data ingested from another place has the same fingerprint and downstream caches still hit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import zarr

from dq_ops.config import DatasetConfig
from dq_ops.errors import DQInputError
from dq_ops.progress import Progress
from dq_ops.readers import Batch, SkippedItem, open_reader
from dq_ops.store import Store, write_array

# Bumped when what ingest writes for the same source changes (it enters the ingest cache key).
INGEST_VERSION = 2
# Samples per reader batch: small enough for large images (256 × 224² RGB ≈ 38 MB).
BATCH_SIZE = 256


@dataclass(frozen=True)
class IngestResult:
    """What an ingest stored: the snapshot (name, URL, fingerprint), per-split counts, skipped items,
    class names. ``dataset`` is the dataset's name, ``name`` its snapshot's."""

    dataset: str
    name: str
    url: str
    fingerprint: str
    source: str
    modality: str
    counts: dict[str, int]
    class_names: list[str] | None
    skipped: list[SkippedItem]


def ingest(config: DatasetConfig, store: Store, *, progress: Progress | None = None) -> IngestResult:
    """Read ``config``'s source and store it as a snapshot of ``datasets/<config.name>``.

    ``progress(done, total)`` is called after every batch; ``total`` counts the samples the
    source announces (after ``limit``), so with skipped items ``done`` may end below it.
    Raises :class:`DQInputError` naming the file or record at fault.
    """
    reader = open_reader(config)
    # (output split, reader split, keep-test flag or None): a hold-out reads "train" twice.
    if config.test_fraction is not None and reader.splits() == ["train"]:
        plan = [("train", "train", False), ("test", "train", True)]
    else:
        plan = [(split, split, None) for split in reader.splits()]
    capacity = {out: reader.num_samples(source) for out, source, _ in plan}
    total, done = sum(reader.num_samples(source) for source in {source for _, source, _ in plan}), 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    # The image column shapes only Parquet content: left out otherwise, so other datasets keep their fingerprints.
    # The pixel limit only refuses images (what a skipped one changes, the content digest holds).
    params = config.model_dump(mode="json", exclude={"url", "name", "max_image_pixels"} | ({"image_field"} if config.format != "parquet" else set()))
    counts: dict[str, int] = {}
    with store.write_snapshot("datasets", config.name, params, source=config.url) as snapshot:
        group = snapshot.group
        for split, source, test_side in plan:
            batches = reader.iter_batches(source, BATCH_SIZE)
            if test_side is not None:
                batches = _hold_out(batches, config.test_fraction, test_side)
            counts[split] = _write_split(group.create_group(split), reader.modality, batches, capacity[split], tick)
            if counts[split] == 0:
                skipped = f" ({len(reader.skipped)} bad items skipped)" if reader.skipped else ""
                raise DQInputError(f"{reader.source}: split {split!r} has no samples (empty dataset){skipped}")
        group.attrs.update(
            {"modality": reader.modality, "class_names": reader.class_names(), "source_format": config.format}
        )
    artifact = snapshot.artifact
    return IngestResult(
        dataset=config.name,
        name=artifact.name,
        url=artifact.url,
        fingerprint=artifact.fingerprint,
        source=reader.source,
        modality=reader.modality,
        counts=counts,
        class_names=reader.class_names(),
        skipped=list(reader.skipped),
    )


def held_out(ids: np.ndarray, fraction: float) -> np.ndarray:
    """Which samples belong to the hold-out: the first 8 bytes of sha256(id) read as a fraction
    of 2⁶⁴ fall below ``fraction``. Depends on the id alone, so a refreshed source keeps every
    old sample on its side of the split."""
    digests = [hashlib.sha256(str(i).encode()).digest()[:8] for i in ids]
    return np.array([int.from_bytes(d, "big") / 2**64 < fraction for d in digests], dtype=bool)


def _hold_out(batches: Iterator[Batch], fraction: float, test_side: bool) -> Iterator[Batch]:
    for batch in batches:
        rows = held_out(batch.ids, fraction) == test_side
        if rows.any():
            yield Batch(batch.samples[rows], batch.labels[rows], batch.ids[rows])


def _write_split(
    group: zarr.Group, modality: str, batches: Iterator[Batch], capacity: int, tick: Callable[[int], None]
) -> int:
    """Write batches into ``samples/labels/ids`` arrays sized ``capacity``; return the rows written.

    Rows are buffered to whole chunks (one chunk size for all three arrays, so rows line up for
    dask), which avoids rewriting compressed chunks. Arrays shrink to the rows written when
    items were skipped.
    """
    sample_name = "images" if modality == "images" else "texts"
    arrays: dict[str, zarr.Array] = {}
    pending: list[Batch] = []
    written = 0

    def flush(rows: int) -> None:
        nonlocal pending, written
        merged = {key: np.concatenate([getattr(b, key) for b in pending]) for key in ("samples", "labels", "ids")}
        for key, name in (("samples", sample_name), ("labels", "labels"), ("ids", "ids")):
            arrays[name][written:written + rows] = merged[key][:rows]
        rest = len(merged["labels"]) - rows
        pending = [Batch(merged["samples"][rows:], merged["labels"][rows:], merged["ids"][rows:])] if rest else []
        written += rows

    for batch in batches:
        if not arrays:
            samples = write_array(group, sample_name, shape=(capacity, *batch.samples.shape[1:]), dtype=batch.samples.dtype)
            chunk_rows = samples.chunks[0]
            arrays = {
                sample_name: samples,
                "labels": write_array(group, "labels", shape=(capacity,), dtype=np.int64, chunk_rows=chunk_rows),
                "ids": write_array(group, "ids", shape=(capacity,), dtype=str, chunk_rows=chunk_rows),
            }
        pending.append(batch)
        buffered = sum(len(b) for b in pending)
        if buffered >= chunk_rows:
            flush(buffered - buffered % chunk_rows)
        tick(len(batch))
    if pending:
        flush(sum(len(b) for b in pending))
    if arrays and written < capacity:
        for array in arrays.values():
            array.resize((written, *array.shape[1:]))
    return written
