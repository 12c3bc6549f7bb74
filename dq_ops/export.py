"""Take a subset out of the store: export it as an image folder, ``.npz``, Parquet or WebDataset
shards, or JSONL plus a manifest (``dq_ops.torch_dataset`` loads one as a torch ``Dataset``).

The manifest (``manifest.jsonl``, one line per exported sample) carries the stable sample ids
from ingest, the row in the quantized split, the label and, for image folders and shards, the
file written, so an exported subset can always be traced back to its source.

Shards hold PNG bytes, the label and the sample id, ``shard_size`` samples each, named as the
shard readers split them (``train-00000-of-00002.parquet``, ``train-000000.tar``): ``dq ingest``
reads an export folder back as it is, with the same pixels, labels and ids. Parquet shards
follow the Hugging Face datasets layout (an ``image`` struct of ``bytes`` and ``path``, ``label``
as a ``ClassLabel`` when the dataset has class names, ``id``); a WebDataset sample is
``<key>.png``, ``<key>.cls`` and ``<key>.json`` (``{"id", "label"}``).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from dq_ops.errors import DQInputError
from dq_ops.progress import Progress
from dq_ops.stage import run_jobs
from dq_ops.store import QUANTIZED_SPLIT, Artifact, DQDamagedError, DQStoreError, Store
from dq_ops.urls import filesystem

ExportFormat = Literal["image-folder", "npz", "parquet", "webdataset", "jsonl"]
EXPORT_FORMATS: tuple[str, ...] = ("image-folder", "npz", "parquet", "webdataset", "jsonl")
SHARD_SIZE = 10_000
_ROWS_PER_READ = 4096
_READ_BYTES = 64 * 2**20  # at most this many pixel bytes read at once per thread
# Parquet rows per row group, as Hugging Face datasets writes image data: readers hold a row group.
_ROW_GROUP_ROWS = 100


@dataclass(frozen=True)
class ExportResult:
    out_url: str
    format: str
    samples: int
    manifest_url: str


def subset_dataset(store: Store, subset: Artifact) -> Artifact:
    """The dataset snapshot a subset was drawn from (never a newer snapshot of the same name)."""
    snapshot = subset.group.attrs["dataset"]
    try:
        return store.open("datasets", snapshot)
    except DQDamagedError:
        raise
    except DQStoreError:
        raise DQStoreError(
            f"{subset.url} was drawn from dataset snapshot {snapshot!r}, which is no longer in the store "
            "(removed by `dq gc`?); re-run `dq run` to draw it from the current snapshot"
        ) from None


def export_subset(
    store: Store,
    subset_name: str,
    out_url: str,
    fmt: ExportFormat,
    *,
    images: Callable[[np.ndarray], np.ndarray] | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
    shard_size: int = SHARD_SIZE,
) -> ExportResult:
    """Write ``subsets/<subset_name>`` to ``out_url`` in ``fmt``, with ``manifest.jsonl`` beside it.

    ``out_url`` must be empty or absent; with ``overwrite`` a previous export there (a folder
    with a ``manifest.jsonl``) is replaced whole, so formats and stale files never mix. Other
    content is never deleted. The export is written beside ``out_url`` first and moved there
    once complete: an export that fails (damage met in the subset or its snapshot, a full disk)
    leaves ``out_url`` as it was, a previous export included.

    ``images(rows)`` supplies the pixels of the given split rows when they should not come from
    the dataset as ingested (e.g. MAE reconstructions after patch dropping). ``shard_size``:
    samples per Parquet or WebDataset shard.
    """
    if fmt not in EXPORT_FORMATS:
        raise DQInputError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    if shard_size < 1:
        raise DQInputError(f"shard size must be at least 1 sample, got {shard_size}")
    fs, root = filesystem(out_url)
    previous = _check_target(fs, root, out_url, overwrite)
    subset = store.open("subsets", subset_name)
    dataset = subset_dataset(store, subset)
    split = dataset[QUANTIZED_SPLIT]
    is_text = "texts" in split
    if is_text != (fmt == "jsonl"):
        kind = "text" if is_text else "image"
        raise DQInputError(f"{dataset.url} holds {kind} samples: export it as {'jsonl' if is_text else 'image-folder, npz, parquet or webdataset'}, not {fmt}")
    final_root, root = root, _partial_root(fs, root)
    try:
        with store.reading(lambda: [subset, dataset]):  # a chunk that fails to decode names its artifact
            samples = _write_export(fs, root, subset, split, fmt, images, progress, shard_size, dataset.group.attrs.get("class_names"))
        _replace(fs, root, final_root, previous)
    finally:
        if fs.exists(root):
            fs.rm(root, recursive=True)
    return ExportResult(out_url, fmt, samples, f"{out_url.rstrip('/')}/manifest.jsonl")  # the URL, protocol kept


def _write_export(fs, root: str, subset: Artifact, split, fmt: ExportFormat,
                  images: Callable[[np.ndarray], np.ndarray] | None, progress: Progress | None,
                  shard_size: int, class_names: list[str] | None) -> int:
    """Every file of the export into the new folder ``root``, the manifest last; returns the
    number of samples exported.

    Image folders and shards are written piece by piece (a shard, or a run of files), the pieces
    on threads over this machine's cores: PNG encoding and file writes release the GIL. The
    files are the same whatever the number of threads."""
    rows = np.asarray(subset["indices"][:])
    ids = np.asarray(subset["ids"][:])
    labels = np.asarray(split["labels"].get_orthogonal_selection((rows,)))
    fs.makedirs(root, exist_ok=True)
    manifest = [{"id": str(i), "row": int(r), "label": int(y)} for i, r, y in zip(ids, rows, labels)]
    n = len(rows)
    if fmt == "npz":
        buffer = io.BytesIO()  # one array in memory: npz is the format for subsets that fit
        np.savez_compressed(buffer, images=_pixels(split, rows, images), labels=labels, ids=np.array([str(i) for i in ids]))
        with fs.open(f"{root}/subset.npz", "wb") as fh:
            fh.write(buffer.getvalue())
    elif fmt == "jsonl":
        with fs.open(f"{root}/subset.jsonl", "w") as fh:
            for start in range(0, n, _ROWS_PER_READ):
                chunk = slice(start, start + _ROWS_PER_READ)
                for entry, text in zip(manifest[chunk], split["texts"].get_orthogonal_selection((rows[chunk],))):
                    fh.write(json.dumps({"id": entry["id"], "text": str(text), "label": entry["label"]}) + "\n")
                if progress:
                    progress(min(start + _ROWS_PER_READ, n), n)
    else:
        sample_bytes = int(np.prod(split["images"].shape[1:])) * split["images"].dtype.itemsize
        read_rows = max(1, min(_ROWS_PER_READ, _READ_BYTES // sample_bytes))
        shard = _SHARDS.get(fmt)
        step = shard_size if shard is not None else _ROWS_PER_READ
        pieces = [(start, min(start + step, n)) for start in range(0, n, step)]

        def write_piece(piece: tuple[int, int]) -> int:
            start, stop = piece
            out = None if shard is None else shard(fs, root, start // step, len(pieces), class_names)
            for a in range(start, stop, read_rows):
                b = min(a + read_rows, stop)
                pixels = _pixels(split, rows[a:b], images)
                if out is None:
                    _write_images(fs, root, pixels, labels[a:b], ids[a:b], class_names, manifest[a:b])
                else:
                    for k, image in enumerate(pixels, start=a):
                        out.add(f"{k:06d}", _png(image), int(labels[k]), str(ids[k]))
                        manifest[k]["file"] = out.name
            if out is not None:
                out.close()
            return stop - start

        done = 0

        def written(count: int) -> None:
            nonlocal done
            done += count
            if progress:
                progress(done, n)

        # a caller's images (MAE reconstructions) come from one model: one piece at a time
        threads = 1 if images is not None else len(os.sched_getaffinity(0))
        run_jobs(None, write_piece, pieces, on_done=written, threads=threads)
    with fs.open(f"{root}/manifest.jsonl", "w") as fh:
        fh.writelines(json.dumps(entry) + "\n" for entry in manifest)
    return n


def _partial_root(fs, root: str) -> str:
    """Where the export is written before it is complete: beside ``root``, or inside it when
    ``root`` is a bucket (nothing is beside a bucket)."""
    tag = uuid.uuid4().hex[:8]
    if not isinstance(fs, LocalFileSystem) and "/" not in root.strip("/"):
        return f"{root.rstrip('/')}/.dq-export-{tag}.partial"
    return f"{root.rstrip('/')}.{tag}.partial"


def _replace(fs, new: str, root: str, previous: bool) -> None:
    """Move the finished export folder ``new`` to ``root``. Locally ``root`` (a previous export,
    or an empty folder) is renamed aside first and removed once the new one is in place; on
    object stores, which have no folders to rename, a previous export is removed (all of
    ``root`` but ``new``, which may lie inside a bucket root) and the new one copied over."""
    if isinstance(fs, LocalFileSystem):
        aside = f"{new}.replaced"
        if fs.exists(root):
            os.rename(root, aside)
        os.rename(new, root)
        if os.path.exists(aside):
            shutil.rmtree(aside)
        return
    if previous:
        for entry in fs.ls(root, detail=False):
            if entry.rstrip("/") != new.rstrip("/"):
                fs.rm(entry, recursive=True)
    # File by file: a recursive move also copies the folder's own key, which object stores do not have.
    fs.invalidate_cache(new)
    for path in fs.find(new):
        fs.copy(path, f"{root}{path[len(new):]}")
    fs.rm(new, recursive=True)


def _check_target(fs, root: str, out_url: str, overwrite: bool) -> bool:
    """Whether ``root`` holds a previous export to replace (``overwrite``); raises when it holds
    anything else. Nothing is deleted here: it is replaced once the new export is complete."""
    if fs.exists(root) and not fs.isdir(root):
        raise DQInputError(f"{out_url}: exists and is a file; export into a folder")
    entries = sorted(fs.ls(root, detail=False)) if fs.exists(root) else []
    if entries:
        shown = ", ".join(repr(str(e).rstrip("/").rsplit("/", 1)[-1]) for e in entries[:3])
        if not overwrite:
            raise DQInputError(
                f"{out_url}: the export folder is not empty ({len(entries)} entries: {shown}{', ...' if len(entries) > 3 else ''}); "
                "choose an empty folder, or pass --overwrite to replace a previous export"
            )
        if not fs.exists(f"{root}/manifest.jsonl"):
            raise DQInputError(f"{out_url}: holds files that are not a dq export (no manifest.jsonl: {shown}); not deleting them")
    return bool(entries)


def _pixels(split, rows: np.ndarray, images: Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
    return images(rows) if images is not None else np.asarray(split["images"].get_orthogonal_selection((rows,)))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "unnamed"


def _png(image: np.ndarray) -> bytes:
    """One stored ``(H, W, C)`` image as PNG (lossless: read back, the pixels are the same)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_images(fs, root, pixels, labels, ids, class_names, manifest) -> None:
    for image, label, sample_id, entry in zip(pixels, labels, ids, manifest):
        folder = _safe(class_names[label]) if class_names and label >= 0 else ("unlabelled" if label < 0 else str(label))
        path = f"{folder}/{_safe(str(sample_id))}.png"
        fs.makedirs(f"{root}/{folder}", exist_ok=True)
        with fs.open(f"{root}/{path}", "wb") as fh:
            fh.write(_png(image))
        entry["file"] = path


class _Shard:
    """One shard file, written sample by sample in order and finished by :meth:`close`."""

    name: str

    def add(self, key: str, png: bytes, label: int, sample_id: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _ParquetShard(_Shard):
    """``train-00000-of-0000N.parquet`` in the Hugging Face datasets layout."""

    def __init__(self, fs, root: str, index: int, shards: int, class_names: list[str] | None):
        self.name = f"{QUANTIZED_SPLIT}-{index:05d}-of-{shards:05d}.parquet"
        label = {"names": class_names, "_type": "ClassLabel"} if class_names else {"dtype": "int64", "_type": "Value"}
        features = {"image": {"_type": "Image"}, "label": label, "id": {"dtype": "string", "_type": "Value"}}
        schema = pa.schema(
            [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64()), ("id", pa.string())],
            metadata={"huggingface": json.dumps({"info": {"features": features}})},
        )
        self._fh = fs.open(f"{root}/{self.name}", "wb")
        self._writer = pq.ParquetWriter(self._fh, schema)
        self._rows: list[tuple[bytes, int, str]] = []

    def add(self, key: str, png: bytes, label: int, sample_id: str) -> None:
        self._rows.append((png, label, sample_id))
        if len(self._rows) == _ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            images, labels, ids = zip(*self._rows)
            columns = {"image": [{"bytes": png, "path": None} for png in images], "label": labels, "id": ids}
            self._writer.write_table(pa.table(columns, schema=self._writer.schema))
            self._rows = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._fh.close()


class _WebDatasetShard(_Shard):
    """``train-000000.tar`` with ``<key>.png``, ``<key>.cls`` and ``<key>.json`` per sample."""

    def __init__(self, fs, root: str, index: int, shards: int, class_names: list[str] | None):
        self.name = f"{QUANTIZED_SPLIT}-{index:06d}.tar"
        self._fh = fs.open(f"{root}/{self.name}", "wb")
        self._tar = tarfile.open(fileobj=self._fh, mode="w|")  # streamed: object stores cannot seek

    def add(self, key: str, png: bytes, label: int, sample_id: str) -> None:
        meta = json.dumps({"id": sample_id, "label": label}).encode()
        for extension, data in (("png", png), ("cls", str(label).encode()), ("json", meta)):
            member = tarfile.TarInfo(f"{key}.{extension}")
            member.size, member.mode = len(data), 0o644
            self._tar.addfile(member, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()
        self._fh.close()


_SHARDS: dict[str, type[_Shard]] = {"parquet": _ParquetShard, "webdataset": _WebDatasetShard}
