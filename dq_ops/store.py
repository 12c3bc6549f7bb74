"""The storage layer: Zarr v3 groups behind fsspec URLs, one documented layout, fingerprints.

Layout under one store root (a plain path, ``file://``, ``memory://``, ``s3://`` with s3fs, ...)::

    <root>/
      datasets/<name>/          one ingested dataset
          <split>/images        (n, H, W, C) uint8       image datasets
          <split>/texts         (n,) str                  text datasets
          <split>/labels        (n,) int64, -1 = no label
          <split>/ids           (n,) str, stable sample ids ("<source position or path>:<content hash>")
      embeddings/<key>/features (n, d) float32            + ids, the row order of the dataset split
      bins/<key>/bin_of_sample  (n,) int32                 + per-bin/per-class sizes in attrs
          join_directions, join_thresholds                   incremental: each class's join boundaries
      subsets/<key>/indices     (k,) int64 into the split  + ids
      patches/<key>/...         kept patches + masks + grid geometry (``dq_ops.patch_store``)
      models/<key>/...          checkpoints (the MAE)
      reconstructions/<key>/... reconstructed images
      evaluations/<key>/        one training run (arm × seed): its results in the attributes
      reports/<run>.md          each flow run's report
      refs/<kind>/<name>.json   named pointers: a dataset's snapshot history (``latest`` last),
                                the last published subset of a selection
      mlflow.db, mlartifacts/   the default MLflow tracking database and its artifacts

Every artifact is a Zarr group ``<kind>/<name>``; its attributes hold a ``dq`` record with the
parameters that made it, the fingerprints of its inputs, a digest of its stored content and its
own ``fingerprint = sha256(kind, content digest, parameters, input fingerprints)``. The content
digest combines one sha256 per chunk (:func:`array_digest`); whoever writes a chunk whole
(:func:`write_rows`, :func:`copy_chunks`) leaves its digest beside it (``<array>/digests/<row
chunk>``), so a commit reads back only the chunks written in part, not the gigabytes a worker
just wrote.

Datasets are immutable snapshots named ``<name>-<fingerprint[:12]>`` (:meth:`Store.write_snapshot`):
an ingest whose content changed adds a snapshot and moves the ``latest`` pointer of ``<name>``;
everything derived records the snapshot's fingerprint, so an old subset keeps reading its own
snapshot after a re-ingest. :meth:`Store.gc` removes what no kept snapshot needs.

Integrity: every array's codec pipeline ends in a CRC32C checksum per chunk, so a corrupted chunk
fails to decode; the ``dq`` record lists how many chunks each array had at commit
(``chunks``), and :meth:`Store.open` compares that with the chunks the store lists, so a lost chunk
is an error rather than a read of the fill value. :meth:`Store.check` decodes every chunk
(``dq verify``); :meth:`Store.reading` turns a decoding error met while reading into a
:class:`DQDamagedError` naming the damaged artifact. Artifacts written before checksums keep
opening (without the chunk count check) and are reported by ``dq verify``.

Writes never leave a half-written artifact visible: an artifact is written under
``<kind>/.staging/`` and only moved to ``<kind>/<name>`` once complete (an atomic directory rename
on local disks; copy-then-delete with the group metadata copied last elsewhere). Readers refuse a
group whose ``dq`` record is not marked complete. A resumable write (chunked work done by dask
workers) keeps a stable staging name so that a restarted run finds the chunks already written.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.errors import ZarrUserWarning
from zarr.storage import FsspecStore, LocalStore

from dq_ops import __version__
from dq_ops.errors import FULL_ERRNOS, REFUSED_ERRNOS, DQInputError
from dq_ops.locks import file_lock, is_held
from dq_ops.urls import filesystem, redact_credentials

# The split that bins, subsets and every derived artifact index into.
QUANTIZED_SPLIT = "train"
ARTIFACT_KINDS = ("datasets", "embeddings", "bins", "subsets", "patches", "models", "reconstructions", "evaluations")
STAGING = ".staging"
LOCKS = ".locks"  # lock files of local stores (dq_ops.locks)
_ARTIFACT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# What Store.write_snapshot appends to a dataset's name: the snapshot's name without its record.
_SNAPSHOT_SUFFIX = re.compile(r"-[0-9a-f]{12}$")
# Rows hashed per read when digesting an array: bounds memory for arrays of any size.
_DIGEST_BLOCK_BYTES = 64 * 2**20
# Content digests over chunk digests (array_digest); records without a version were streamed.
DIGEST_VERSION = 2
# Beside an array's chunks: each whole chunk's digest, recorded by its writer (write_rows).
CHUNK_DIGESTS = "digests"
# Errors a damaged chunk raises while decoding: a checksum mismatch (ValueError), a codec's own
# failure (Blosc, Zstd: RuntimeError), a truncated or unreadable chunk file (OSError).
DECODE_ERRORS = (ValueError, RuntimeError, OSError)
# What their messages say (zarr's CRC32C codec, numcodecs' Blosc and Zstd): only such an error
# sends Store.reading looking through artifacts, which reads every chunk of them.
_DECODE_MESSAGE = re.compile(r"checksum|decompress|blosc|zstd|lz4|codec", re.IGNORECASE)

log = logging.getLogger(__name__)


class DQStoreError(DQInputError):
    """An artifact is missing, incomplete or malformed; the message names its URL."""


class DQDamagedError(DQStoreError):
    """A stored artifact is damaged (a chunk lost or failing to decode, an incomplete group): the
    message names its URL, what is wrong and how it is repaired."""

    def __init__(self, url: str, kind: str, name: str, problem: str, repair: str):
        super().__init__(f"{url} is damaged: {problem}; {repair}")
        self.url, self.kind, self.name, self.problem, self.repair = url, kind, name, problem, repair

    def __reduce__(self) -> tuple[Any, ...]:  # Prefect and dask pickle exceptions
        return type(self), (self.url, self.kind, self.name, self.problem, self.repair)

    @property
    def derived(self) -> bool:
        """Whether a run can recompute the artifact (anything but a dataset snapshot)."""
        return self.kind != "datasets"


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace, the form every fingerprint hashes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def derive_key(stage: str, params: Mapping[str, Any], inputs: Sequence[str] = ()) -> str:
    """Name of a derived artifact: 16 hex digits of sha256(stage, parameters, input fingerprints).

    Stages that consume other artifacts name their output by this key, so the same inputs and
    parameters always address the same artifact (and a Prefect cache key can be the same value).
    """
    payload = canonical_json({"stage": stage, "params": params, "inputs": list(inputs)})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


_FILE_DIGESTS: dict[tuple[str, Any, Any], str] = {}


def file_digest(url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """sha256 of a file's bytes (path or fsspec URL): how files named by path enter artifact keys,
    so a file replaced in place changes the key. Cached per (URL, size, modification stamp)."""
    fs, path = filesystem(url, storage_options)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise DQInputError(f"{url}: file not found") from None
    stamp = (url, info.get("size"), info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("created"))
    if stamp not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with fs.open(path, "rb") as fh:
            while block := fh.read(8 * 2**20):
                digest.update(block)
        _FILE_DIGESTS[stamp] = digest.hexdigest()
    return _FILE_DIGESTS[stamp]


class _WrittenCrc32c(Crc32cCodec):
    """CRC32C that strips a chunk's checksum without verifying it: for the commit's read-back of
    chunks just encoded (their checksums computed from the very bytes being read back). Never
    stored: the metadata names the standard ``crc32c``, and every later read verifies it."""

    def _decode_sync(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        return chunk_spec.prototype.buffer.from_array_like(chunk_bytes.as_numpy_array()[:-4])


def _without_verifying(array: zarr.Array) -> zarr.Array:
    """``array`` read through :class:`_WrittenCrc32c`: the same values, one checksum pass fewer."""
    codecs = tuple(_WrittenCrc32c() if isinstance(c, Crc32cCodec) else c for c in array.metadata.codecs)
    if codecs == tuple(array.metadata.codecs):
        return array
    stored = array._async_array
    return zarr.Array(zarr.AsyncArray(metadata=replace(array.metadata, codecs=codecs), store_path=stored.store_path, config=stored.config))


def chunk_digest(values: np.ndarray) -> bytes:
    """sha256 of one chunk's values (its part inside the array's bounds): numbers as their C-order
    bytes, strings as their UTF-8 joined by U+001F."""
    if values.dtype.kind in "OTU":
        return hashlib.sha256("\x1f".join(map(str, values.ravel())).encode()).digest()
    return hashlib.sha256(memoryview(np.ascontiguousarray(values)).cast("B")).digest()


def _digest_path(array: zarr.Array, row_chunk: int) -> Any:
    return array._async_array.store_path / f"{CHUNK_DIGESTS}/{row_chunk}"


def _by_rows(array: zarr.Array) -> bool:
    """Whether ``array`` is chunked along rows only (a chunk is a run of whole rows)."""
    return all(n == 1 for n in array.cdata_shape[1:])


def write_rows(array: zarr.Array, start: int, values: np.ndarray) -> None:
    """``array[start:start + len(values)] = values``, and beside every whole chunk the rows fill
    its :func:`chunk_digest` (under ``<array>/digests/``), which a commit takes instead of reading
    the chunk back. A chunk written in part loses the digest it had: only the chunk's writer
    knows its values whole."""
    values = np.asarray(values) if array.dtype.kind in "OTU" else np.asarray(values, dtype=array.dtype)
    stop = start + len(values)
    array[start:stop] = values
    if not _by_rows(array) or not len(values):
        return
    rows = array.chunks[0]
    whole, partial = {}, []
    for index in range(start // rows, -(-stop // rows)):
        lo, hi = index * rows, (index + 1) * rows
        if start <= lo and hi <= min(stop, array.shape[0]):
            whole[index] = chunk_digest(values[lo - start:hi - start])
        else:
            partial.append(index)

    async def record() -> None:
        prototype = default_buffer_prototype()
        await asyncio.gather(*(_digest_path(array, k).set(prototype.buffer.from_bytes(d)) for k, d in whole.items()),
                             *(_digest_path(array, k).delete() for k in partial))

    sync(record())


def _blocks(array: zarr.Array, runs: Sequence[tuple[int, int]]) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, values) of each row range in ``runs``, the next one read while the caller
    works on this one (decoding and hashing both release the GIL)."""
    def read(run: tuple[int, int]) -> np.ndarray:
        return np.asarray(array[run[0]:run[1]])

    with ThreadPoolExecutor(1) as reader:
        ahead = reader.submit(read, runs[0]) if runs else None
        for k, run in enumerate(runs):
            block = ahead.result()
            if k + 1 < len(runs):
                ahead = reader.submit(read, runs[k + 1])
            yield run[0], block


def _block_rows(array: zarr.Array) -> int:
    """Rows read at a time when digesting: whole chunks, about :data:`_DIGEST_BLOCK_BYTES`."""
    # Strings count at least 8 bytes a cell: their itemsize does not bound what a row holds.
    itemsize = array.dtype.itemsize if array.dtype.kind in "biufc" else max(array.dtype.itemsize, 8)
    row_bytes = max(1, int(np.prod(array.shape[1:], dtype=np.int64)) * itemsize)
    rows = array.chunks[0]
    return max(rows, _DIGEST_BLOCK_BYTES // row_bytes // rows * rows)


def array_digest(array: zarr.Array, known: Mapping[int, bytes] | None = None) -> tuple[str, list[bytes] | None]:
    """sha256 over an array's dtype, shape and chunk shape, then over each chunk's
    :func:`chunk_digest` in the chunk grid's order; with the row chunks' digests of an array
    chunked along rows only (else None).

    ``known``: digests of whole row chunks by index, as their writers recorded them
    (:func:`write_rows`); only the other chunks are read."""
    digest = hashlib.sha256(f"{array.dtype}|{array.shape}|{array.chunks}".encode())
    if array.size == 0:
        return digest.hexdigest(), [] if _by_rows(array) else None
    rows, n, length = array.chunks[0], array.cdata_shape[0], array.shape[0]
    usable = known if known is not None and _by_rows(array) else {}
    digests: list[list[bytes]] = [[usable[k]] if k in usable and (k + 1) * rows <= length else [] for k in range(n)]
    step = _block_rows(array)
    runs: list[tuple[int, int]] = []
    for k in (k for k in range(n) if not digests[k]):  # consecutive unknown row chunks, a block's rows a read
        if runs and runs[-1][1] == k * rows and runs[-1][1] - runs[-1][0] < step:
            runs[-1] = (runs[-1][0], min(length, (k + 1) * rows))
        else:
            runs.append((k * rows, min(length, (k + 1) * rows)))
    across = [tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, array.chunks[1:])) for index in np.ndindex(*array.cdata_shape[1:])]
    for first, block in _blocks(array, runs):
        for lo in range(0, len(block), rows):
            digests[(first + lo) // rows] = [chunk_digest(block[(slice(lo, lo + rows), *cells)]) for cells in across]
    for chunk in digests:
        for d in chunk:
            digest.update(d)
    return digest.hexdigest(), [chunk[0] for chunk in digests] if _by_rows(array) else None


def _streamed_array_digest(array: zarr.Array) -> str:
    """The digest of records without ``digest_version`` (written before chunk digests): sha256
    over dtype, shape and every value in row order. Only :meth:`Store.check` computes it."""
    digest = hashlib.sha256(f"{array.dtype}|{array.shape}".encode())
    step = _block_rows(array)
    for _, block in _blocks(array, [(a, min(array.shape[0], a + step)) for a in range(0, array.shape[0], step)] if array.size else []):
        if block.dtype.kind in "OTU":  # strings: hash their UTF-8 bytes with separators
            digest.update("\x1f".join(map(str, block.ravel())).encode())
        else:
            digest.update(memoryview(np.ascontiguousarray(block)).cast("B"))
    return digest.hexdigest()


def group_digest(group: zarr.Group, *, verify: bool = True, version: int = DIGEST_VERSION) -> str:
    """sha256 over every array below ``group`` (sorted by path: :func:`array_digest`) and its
    non-``dq`` attributes, every value read. ``version=1``: the digest of records written before
    chunk digests (:func:`_streamed_array_digest`)."""
    return _group_digests(group, verify=verify, version=version)[0]


def _group_digests(group: zarr.Group, *, verify: bool = True, known: Mapping[str, Mapping[int, bytes]] | None = None,
                   version: int = DIGEST_VERSION) -> tuple[str, dict[str, list[bytes]]]:
    """:func:`group_digest`, and the row chunks' digests by array path below ``group``.

    ``verify=False`` skips the chunk checksums: for a commit's read-back of what it just wrote
    (the digest is the same; a chunk damaged since fails its checksum at its first real read).
    ``known``: the chunk digests writers recorded, by array path."""
    known = known or {}
    digest, chunks = hashlib.sha256(), {}
    with sidecars_unlisted():
        arrays, groups = sorted(group.arrays(), key=lambda item: item[0]), sorted(group.groups(), key=lambda item: item[0])
    for path, array in arrays:
        array = array if verify else _without_verifying(array)
        if version == DIGEST_VERSION:
            value, row_chunks = array_digest(array, known.get(path))
            if row_chunks is not None:
                chunks[path] = row_chunks
        else:
            value = _streamed_array_digest(array)
        digest.update(f"{path}={value};".encode())
    for path, sub in groups:
        inner = {key[len(path) + 1:]: values for key, values in known.items() if key.startswith(f"{path}/")}
        value, sub_chunks = _group_digests(sub, verify=verify, known=inner, version=version)
        chunks.update({f"{path}/{key}": values for key, values in sub_chunks.items()})
        digest.update(f"{path}/{value};".encode())
    digest.update(canonical_json({k: v for k, v in group.attrs.asdict().items() if k != "dq"}).encode())
    return digest.hexdigest(), chunks


@contextmanager
def sidecars_unlisted() -> Iterator[None]:
    """Zarr warns about every file in a group that is not a Zarr node: the sidecars
    (:meth:`Store.write_sidecar`) beside an artifact's arrays are meant to be there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Object at .* is not recognized as a component", category=ZarrUserWarning)
        yield


def decode_problem(group: zarr.Group) -> str | None:
    """The first chunk below ``group`` that does not decode (its checksum or codec fails), or None.

    Reads every chunk once; what ``dq verify`` and :meth:`Store.reading` use to find damage."""
    try:
        with sidecars_unlisted():
            members = sorted(group.members(max_depth=None), key=lambda item: item[0])
    except ValueError as exc:  # an array's zarr.json no longer parses
        return f"an array's zarr.json does not parse ({type(exc).__name__}: {exc})"
    for path, array in members:
        if not isinstance(array, zarr.Array):
            continue
        for block in np.ndindex(*array.cdata_shape):
            try:
                array.blocks[block]
            except DECODE_ERRORS as exc:
                detail = str(exc).split(". ")[0]
                return f"{path}: chunk {'/'.join(map(str, block))} does not decode ({type(exc).__name__}: {detail})"
    return None


def default_compressor(clevel: int = 1) -> zarr.codecs.BloscCodec:
    """Blosc-zstd with byte shuffle. Level 1 by default: every refresh rewrites whole artifacts
    (a new snapshot), and level 5 encodes several times slower for a few percent fewer bytes
    (docs/benchmarks.md). Stores whose point is their size (the patch store) ask for more; float
    features use :func:`feature_compressor`."""
    return zarr.codecs.BloscCodec(cname="zstd", clevel=clevel, shuffle="shuffle")


def feature_compressor() -> zarr.codecs.BloscCodec:
    """Blosc-LZ4 without shuffle, for float features: a refresh copies most rows of an
    embeddings artifact, so its codec speed is a refresh's cost. ReLU features are mostly
    exact zeros, which LZ4 finds in the unshuffled bytes, so it compresses them about as well as
    zstd with shuffle at a fraction of the coding time; dense unit-norm features (sentence
    embeddings) stay about whole either way."""
    return zarr.codecs.BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle")


def checksummed(compressor: zarr.abc.codec.BytesBytesCodec | None) -> list[zarr.abc.codec.BytesBytesCodec]:
    """The bytes codecs of every stored array: ``compressor`` (if any), then a CRC32C per chunk,
    so a chunk whose bytes changed fails to decode instead of decoding to wrong values."""
    return [*([compressor] if compressor is not None else []), Crc32cCodec()]


@dataclass(frozen=True)
class ChunkCopy:
    """``count`` rows of ``source`` from ``row``, to go into ``target`` at ``start`` as stored bytes."""

    source: zarr.Array
    row: int
    target: zarr.Array
    start: int
    count: int
    digest: bytes | None = None  # the source chunk's, from its artifact's record; else its writer's file, if any

    def as_stored(self) -> bool:
        """Whether the rows are one whole chunk of each array, of one shape and codec pipeline
        ending in CRC32C (what :func:`write_array` makes), so the stored bytes can be taken as they are."""
        source, target, rows = self.source, self.target, self.target.chunks[0]
        return (self.count == rows and source.chunks == target.chunks and source.dtype == target.dtype
                and source.fill_value == target.fill_value and source.metadata.codecs == target.metadata.codecs
                and isinstance(target.metadata.codecs[-1], Crc32cCodec) and not self.row % rows and not self.start % rows
                and self.row + rows <= source.shape[0] and self.start + rows <= target.shape[0])

    async def carry_digest(self) -> None:
        """The copied chunk's digest goes with it: ``digest``, else the one its writer left beside
        the source chunk (a staging group's); without either, the target's is read back at commit."""
        rows, prototype = self.target.chunks[0], default_buffer_prototype()
        target = _digest_path(self.target, self.start // rows)
        if self.digest is not None:
            await target.set(prototype.buffer.from_bytes(self.digest))
        elif (found := await _digest_path(self.source, self.row // rows).get(prototype=prototype)) is not None:
            await target.set(found)
        else:
            await target.delete()

    def _paths(self) -> tuple[Any, Any]:
        rows, rest = self.target.chunks[0], (0,) * (self.target.ndim - 1)
        return (self.source._async_array.store_path / self.source.metadata.encode_chunk_key((self.row // rows, *rest)),
                self.target._async_array.store_path / self.target.metadata.encode_chunk_key((self.start // rows, *rest)))


# Chunks copied at once by copy_chunks: bounds the bytes held (a few MB a chunk).
_COPIES_AT_ONCE = 16


def copy_chunks(copies: Sequence[ChunkCopy]) -> list[bool]:
    """Copy each of ``copies`` that :meth:`ChunkCopy.as_stored` allows as its stored bytes, without
    decoding or encoding, several at a time (an object store's requests overlap); the others are
    left to the caller (False). Each checksum is verified before its chunk is written: a damaged
    chunk raises ``ValueError`` as its decoding would. Each copy carries its chunk's digest
    (:meth:`ChunkCopy.carry_digest`)."""
    allowed = [copy.as_stored() for copy in copies]
    todo = [copy for copy, ok in zip(copies, allowed) if ok]

    async def copy_batch(batch: Sequence[ChunkCopy]) -> None:
        paths = [copy._paths() for copy in batch]
        stored = await asyncio.gather(*(source.get(prototype=default_buffer_prototype()) for source, _ in paths))
        for copy, data in zip(batch, stored):
            if data is not None:
                raw = data.as_numpy_array()
                if np.uint32(google_crc32c.value(raw[:-4].tobytes())).tobytes() != raw[-4:].tobytes():
                    raise ValueError(f"{copy.source.store_path}: stored and computed checksum do not match in the chunk at row {copy.row}")
        # A chunk never written is all fill value, as the target's chunk is until written.
        await asyncio.gather(*(target.set(data) for (_, target), data in zip(paths, stored) if data is not None))
        await asyncio.gather(*(copy.carry_digest() for copy in batch))

    for first in range(0, len(todo), _COPIES_AT_ONCE):
        sync(copy_batch(todo[first:first + _COPIES_AT_ONCE]))
    return allowed


def write_array(
    group: zarr.Group,
    name: str,
    data: np.ndarray | None = None,
    *,
    shape: tuple[int, ...] | None = None,
    dtype: Any = None,
    chunk_rows: int | None = None,
    compressor: zarr.codecs.BloscCodec | None = None,
) -> zarr.Array:
    """Create ``group/name`` chunked along rows (whole rows per chunk) and optionally fill it.

    ``chunk_rows`` defaults to about 8 MB of rows per chunk: large enough for fast reads, small
    enough that a dask worker holds a few chunks at once. ``compressor`` defaults to
    :func:`default_compressor` (texts are stored uncompressed).
    """
    if data is not None:
        data = np.asarray(data)
        shape, dtype = data.shape, data.dtype
    if shape is None or dtype is None:
        raise ValueError("write_array needs data, or shape and dtype")
    is_text = np.dtype(dtype).kind in "OTU"
    if chunk_rows is None:
        row_bytes = 64 if is_text else max(1, int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize)
        chunk_rows = max(1, min(max(shape[0], 1), (8 * 2**20) // row_bytes))
    array = group.create_array(
        name,
        shape=shape,
        dtype=str if is_text else dtype,
        chunks=(chunk_rows, *shape[1:]),
        compressors=checksummed(None if is_text else compressor or default_compressor()),
        overwrite=True,
    )
    if data is not None and data.size:
        write_rows(array, 0, data)
    return array


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def open_zarr_store(url: str, storage_options: Mapping[str, Any] | None = None, *, read_only: bool = False):
    """A Zarr store for ``url``: a ``LocalStore`` for paths and ``file://``, an ``FsspecStore`` otherwise."""
    if _is_local(url):
        path = _local_path(url)
        if not read_only:
            os.makedirs(path, exist_ok=True)
        return LocalStore(path, read_only=read_only)
    return FsspecStore.from_url(url, storage_options=dict(storage_options or {}), read_only=read_only)


@dataclass(frozen=True)
class Artifact:
    """A complete artifact: its group (read-only), where it lives and how it was made."""

    kind: str
    name: str
    url: str
    group: zarr.Group
    record: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return self.record["fingerprint"]

    @property
    def params(self) -> dict[str, Any]:
        return self.record.get("params", {})

    def chunk_digests(self, path: str) -> list[bytes]:
        """The digest of each row chunk of array ``path`` as recorded at commit (empty for
        artifacts committed before chunk digests): what a copy of a chunk as stored carries."""
        joined = self.record.get("chunk_digests", {}).get(path, "")
        return [bytes.fromhex(joined[k:k + 64]) for k in range(0, len(joined), 64)]

    def __getitem__(self, path: str) -> zarr.Array | zarr.Group:
        try:
            return self.group[path]
        except KeyError:
            raise DQStoreError(f"{self.url}: no array or group {path!r}") from None


@dataclass
class VerifyResult:
    """What :meth:`Store.verify` found: artifacts checked, the damaged ones (their errors name
    the repair), those removed by a repair, and those written before chunk checksums (whose
    corruption only ``--deep`` can find)."""

    checked: int = 0
    damaged: list[DQDamagedError] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    without_checksums: list[str] = field(default_factory=list)


@dataclass
class SnapshotWrite:
    """A snapshot being written: the staging ``group`` to fill (at ``url``, for dask workers);
    ``artifact`` once committed."""

    group: zarr.Group
    url: str
    artifact: Artifact | None = None


class Store:
    """One store root: create, commit, open and list artifacts of the documented layout."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self._root = filesystem(self.url, self.storage_options)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def artifact_url(self, kind: str, name: str) -> str:
        _check_kind(kind)
        check_artifact_name(name)
        return f"{self.url}/{kind}/{name}"

    def _path(self, *parts: str) -> str:
        return "/".join([self._root.rstrip("/"), *parts])

    def _open_group(self, url: str, mode: str) -> zarr.Group:
        store = open_zarr_store(url, self.storage_options, read_only=mode == "r")
        return zarr.open_group(store=store, mode=mode)

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Writes into this store: an ``OSError`` that no retry mends (a read-only store, permission
        denied, a full disk) becomes a :class:`DQStoreError` naming the store, so the command's
        ``error:`` line says where and Prefect does not retry it. An error on a file outside the
        store (a source file read inside the block, a temporary file) stays as it is."""
        try:
            yield
        except OSError as exc:
            if exc.errno in FULL_ERRNOS and not self._elsewhere(exc.filename):
                problem = f"cannot be written: {exc.strerror}"
            elif exc.errno in REFUSED_ERRNOS and not self._elsewhere(exc.filename):
                problem = f"is not writable: {exc.strerror}"
            else:
                raise
            where = f" ({exc.filename})" if exc.filename else ""
            raise DQStoreError(f"store {redact_credentials(self.url)} {problem}{where}") from exc

    def _elsewhere(self, filename: str | bytes | int | None) -> bool:
        """Whether an error's file is an absolute local path outside this store."""
        if not isinstance(filename, str) or not os.path.isabs(filename) or not _is_local(self.url):
            return False
        return not Path(filename).resolve().is_relative_to(Path(_local_path(self.url)).resolve())

    # -- reading -----------------------------------------------------------------------------
    def exists(self, kind: str, name: str) -> bool:
        """Whether ``kind/name`` holds a complete artifact."""
        try:
            self.open(kind, name)
        except DQStoreError:
            return False
        return True

    def open(self, kind: str, name: str) -> Artifact:
        """Open a complete artifact read-only, or raise :class:`DQStoreError` naming its URL.

        A name with a ref (a dataset's name) opens the snapshot the ref calls latest."""
        url = self.artifact_url(kind, name)
        if not self.fs.exists(self._path(kind, name, "zarr.json")):
            ref = self.read_ref(kind, name)
            if ref is not None and ref.get("latest"):
                return self.open(kind, ref["latest"])  # a dataset's name opens its latest snapshot
            if self.fs.exists(self._path(kind, name)):  # published groups are moved whole: it was lost since
                raise self.damaged(kind, name, "zarr.json (the group's metadata and record) is missing", {})
            raise DQStoreError(f"{url}: no such artifact")
        try:
            group = self._open_group(url, "r")
            record = group.attrs.get("dq")
        except ValueError as exc:  # its zarr.json no longer parses
            raise self.damaged(kind, name, f"zarr.json does not parse ({type(exc).__name__}: {exc})", {}) from None
        if not isinstance(record, dict) or not record.get("complete"):
            raise DQStoreError(f"{url}: artifact is incomplete (an interrupted write?)")
        if "chunks" in record:  # absent in artifacts written before chunk counts were recorded
            found = self._chunk_counts((kind, name), record["chunks"])
            for path, count in sorted(record["chunks"].items()):
                if found[path] < 0:
                    raise self.damaged(kind, name, f"{path}/zarr.json (the array's metadata) is missing", record)
                if found[path] < count:
                    raise self.damaged(kind, name, f"{path}: {count - found[path]} of {count} chunks missing", record)
        return Artifact(kind, name, url, group, record)

    def _chunk_counts(self, parts: Sequence[str], arrays: Sequence[str], files: Sequence[str] | None = None) -> dict[str, int]:
        """Chunk files the store lists for each array path below the group at ``parts`` (-1 for
        an array whose ``zarr.json`` is missing): one listing of the group (or ``files``, taken
        already), whatever the number of arrays."""
        root = self._path(*parts)
        files = set(self.fs.find(root) if files is None else files)
        return {
            path: sum(1 for f in files if f.startswith(f"{root}/{path}/c/")) if f"{root}/{path}/zarr.json" in files else -1
            for path in arrays
        }

    def _chunk_digests(self, parts: Sequence[str], arrays: Sequence[str], files: Sequence[str]) -> dict[str, dict[int, bytes]]:
        """The chunk digests their writers recorded beside each array (:func:`write_rows`), by
        array path and row-chunk index, read in one batch."""
        root = self._path(*parts)
        where = {}
        for path in arrays:
            prefix = f"{root}/{path}/{CHUNK_DIGESTS}/"
            where.update({f: (path, int(f[len(prefix):])) for f in files if f.startswith(prefix) and f[len(prefix):].isdigit()})
        digests: dict[str, dict[int, bytes]] = {}
        for f, data in (self.fs.cat(list(where), on_error="omit") if where else {}).items():
            if len(data) == hashlib.sha256().digest_size:
                path, index = where[f]
                digests.setdefault(path, {})[index] = data
        return digests

    def damaged(self, kind: str, name: str, problem: str, record: Mapping[str, Any]) -> DQDamagedError:
        """The error for a damaged ``kind/name`` whose ``dq`` record is ``record``: what is wrong
        and how it is repaired (a derived artifact is recomputed by the next run; a snapshot is
        re-ingested from its source)."""
        if kind != "datasets":
            repair = "the next run recomputes it"
        else:
            repair = f"re-ingest it: {self.ingest_command(name, record)}"
        return DQDamagedError(self.artifact_url(kind, name), kind, name, problem, repair)

    def ingest_command(self, name: str, record: Mapping[str, Any]) -> str:
        """The ``dq ingest`` command that rewrites snapshot ``datasets/<name>`` (``dq`` record
        ``record``) from its source."""
        params = record.get("params", {})
        flags = [("--format", params.get("format")), ("--url", record.get("source", "<source>")),
                 ("--name", record.get("snapshot_of") or _SNAPSHOT_SUFFIX.sub("", name)), ("--store", self.url),
                 ("--limit", params.get("limit")), ("--resize", params.get("resize"))]
        if params.get("on_error") == "skip":
            flags.append(("--on-error", "skip"))
        command = " ".join(f"{flag} {value}" for flag, value in flags if value is not None)
        fraction = params.get("test_fraction")  # no flag: only a config file sets it
        hint = f" and a config with dataset.test_fraction: {fraction}" if fraction is not None else ""
        return redact_credentials(f"dq ingest {command}{hint}")

    def _group_record(self, kind: str, name: str) -> dict[str, Any] | None:
        """The ``dq`` record of ``kind/name`` as stored, without any check (None if unreadable)."""
        try:
            record = self._open_group(self.artifact_url(kind, name), "r").attrs.get("dq")
        except (FileNotFoundError, KeyError, ValueError, zarr.errors.GroupNotFoundError):
            return None
        return record if isinstance(record, dict) else None

    def check(self, kind: str, name: str, *, deep: bool = False) -> str | None:
        """What is wrong with ``kind/name`` (incomplete, chunks missing, a chunk that does not
        decode; with ``deep`` also content that no longer matches the recorded digest), or None.
        Reads every chunk once (twice with ``deep``)."""
        try:
            artifact = self.open(kind, name)
        except DQDamagedError as exc:
            return exc.problem
        except DQStoreError as exc:
            return str(exc).removeprefix(f"{self.artifact_url(kind, name)}: ")
        problem = decode_problem(artifact.group)
        if problem is None and deep and "content_digest" in artifact.record:
            content, chunks = _group_digests(artifact.group, version=artifact.record.get("digest_version", 1))
            if content != artifact.record["content_digest"]:
                changed = [f"{path}: row chunk {k}" for path, digests in sorted(chunks.items())
                           for k, (now, then) in enumerate(zip(digests, artifact.chunk_digests(path))) if now != then]
                problem = "its content no longer matches the digest recorded at commit" + (f" (first: {changed[0]})" if changed else "")
        return problem

    @contextmanager
    def reading(self, artifacts: Callable[[], Sequence[Artifact]]) -> Iterator[None]:
        """Damage met inside the block names its artifact, and damaged derived data is not kept.

        A decoding error (a checksum mismatch, a codec's failure) names no artifact; on one, each
        of ``artifacts()`` is checked chunk by chunk and the first damaged one becomes a
        :class:`DQDamagedError`. A damaged derived artifact (this one, or one whose lost chunks
        :meth:`open` found) is removed, so the next run recomputes it instead of reading it
        again; a snapshot is kept for its re-ingest to replace. Other errors, and decoding errors
        no artifact explains, pass unchanged.
        """
        try:
            try:
                yield
            except DQInputError:
                raise
            except DECODE_ERRORS as exc:
                if not (_DECODE_MESSAGE.search(str(exc)) or isinstance(exc, json.JSONDecodeError)):  # (metadata)
                    raise
                for artifact in artifacts():
                    if (problem := decode_problem(artifact.group)) is not None:
                        raise self.damaged(artifact.kind, artifact.name, problem, artifact.record) from exc
                raise
        except DQDamagedError as exc:
            # (an inner reading(), a stage's, may have removed it already)
            if exc.derived and self.fs.exists(self._path(exc.kind, exc.name)):
                self._remove(exc.kind, exc.name)
                log.warning("%s is damaged (%s): removed; the next run recomputes it", exc.url, exc.problem)
            raise

    def artifacts(self) -> list[Artifact]:
        """Every complete, intact artifact of the store, snapshots first."""
        return [self.open(kind, name) for kind in ARTIFACT_KINDS for name in self.list(kind)]

    def list(self, kind: str) -> list[str]:
        """Names of the complete artifacts of one kind."""
        _check_kind(kind)
        base = self._path(kind)
        if not self.fs.exists(base):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False)]
        return sorted(n for n in names if not n.startswith(".") and self.exists(kind, n))

    # -- writing -----------------------------------------------------------------------------
    @contextmanager
    def write(
        self, kind: str, name: str, params: Mapping[str, Any], inputs: Sequence[str] = ()
    ) -> Iterator[zarr.Group]:
        """Write an artifact into a fresh staging group; commit it only if the block succeeds.

        On an exception the staging group is removed and whatever ``kind/name`` held before
        (if anything) is untouched.
        """
        staging = f"{name}-{uuid.uuid4().hex[:12]}"
        with self.writing(), self._staging_lock(kind, staging):
            try:  # from the staging group's creation on: a full disk can fail it half made
                group = self._open_group(self.artifact_url(kind, f"{STAGING}/{staging}"), "w")
                yield group
                self._commit(kind, name, staging, group, params, inputs)
            except BaseException:
                self._remove(kind, STAGING, staging)
                raise

    def resumable(self, kind: str, name: str) -> tuple[zarr.Group, str]:
        """A staging group with a stable name (created once, reopened on a rerun) and its URL.

        Chunked writers (dask workers) write into it through the URL; :meth:`commit_resumable`
        publishes it once every chunk is written.
        """
        url = self.artifact_url(kind, f"{STAGING}/{name}")
        exists = self.fs.exists(self._path(kind, STAGING, name, "zarr.json"))
        return self._open_group(url, "r+" if exists else "w"), url

    def commit_resumable(
        self, kind: str, name: str, params: Mapping[str, Any], inputs: Sequence[str] = ()
    ) -> Artifact:
        group, _ = self.resumable(kind, name)
        return self._commit(kind, name, name, group, params, inputs)

    def discard_resumable(self, kind: str, name: str) -> None:
        self._remove(kind, STAGING, name)

    def _record(
        self, kind: str, staging: str, group: zarr.Group, params: Mapping[str, Any], inputs: Sequence[str]
    ) -> dict[str, Any]:
        """The ``dq`` record of a finished staging group: parameters, inputs, content digest and
        its row chunks' digests (which then leave the group's files), fingerprint, and the chunks
        each array has (what :meth:`open` checks).

        The fingerprint covers kind, content, parameters and inputs, never names or timings, so a
        rebuilt artifact reproduces it.
        """
        with sidecars_unlisted():
            arrays = [path for path, node in group.members(max_depth=None) if isinstance(node, zarr.Array)]
        parts = (kind, STAGING, staging)
        files = self.fs.find(self._path(*parts))
        # Chunks whose writers recorded their digests are not read back; the others' checksums
        # were computed from these very bytes: verifying them here again would double the
        # checksum's cost, and a chunk damaged since fails at its first read.
        content, chunk_digests = _group_digests(group, verify=False, known=self._chunk_digests(parts, arrays, files))
        record = {
            "kind": kind,
            "params": json.loads(canonical_json(params)),
            "inputs": list(inputs),
            "content_digest": content,
            "digest_version": DIGEST_VERSION,
            "chunk_digests": {path: b"".join(digests).hex() for path, digests in chunk_digests.items()},
            "fingerprint": hashlib.sha256(
                canonical_json({"kind": kind, "content": content, "params": params, "inputs": list(inputs)}).encode()
            ).hexdigest(),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "dq_version": __version__,
            "chunks": self._chunk_counts(parts, arrays, files),
            "complete": True,
        }
        # From here on the record holds them: the published artifact lists its chunks alone.
        root = self._path(*parts)
        recorded = [f"{root}/{path}/{CHUNK_DIGESTS}" for path in arrays if any(f.startswith(f"{root}/{path}/{CHUNK_DIGESTS}/") for f in files)]
        if recorded:
            self.fs.rm(recorded, recursive=True)
        return record

    def _commit(
        self, kind: str, name: str, staging: str, group: zarr.Group,
        params: Mapping[str, Any], inputs: Sequence[str],
    ) -> Artifact:
        group.attrs["dq"] = self._record(kind, staging, group, params, inputs) | {"name": name}
        self._publish(kind, staging, name)
        return self.open(kind, name)

    # -- snapshots and refs ------------------------------------------------------------------
    @contextmanager
    def write_snapshot(
        self, kind: str, base: str, params: Mapping[str, Any], inputs: Sequence[str] = (), *, source: str | None = None,
        source_key: str | None = None,
    ) -> Iterator[SnapshotWrite]:
        """Write an immutable snapshot ``kind/<base>-<fingerprint[:12]>`` and make it ``base``'s latest.

        Yields a :class:`SnapshotWrite` whose ``group`` the block fills; after the block its
        ``artifact`` is the committed snapshot. When an intact snapshot with the same fingerprint
        exists (unchanged content) the new copy is discarded and the existing one becomes latest
        again; a damaged one (:meth:`check`) is replaced by the new copy. ``source`` (where the
        content was read from) goes into the record, outside the fingerprint: it is what
        :meth:`ingest_command` names. ``source_key`` (the key of the ingest that read it,
        ``dq_ops.ingest.IngestStage``) goes into the ref beside ``latest``.
        """
        staging = f"{base}-{uuid.uuid4().hex[:12]}"
        with self.writing(), self._staging_lock(kind, staging):
            try:  # from the staging group's creation on: a full disk can fail it half made
                url = self.artifact_url(kind, f"{STAGING}/{staging}")
                write = SnapshotWrite(self._open_group(url, "w"), url)
                yield write
                record = self._record(kind, staging, write.group, params, inputs)
                name = f"{base}-{record['fingerprint'][:12]}"
                with self.lock("snapshot", kind, name):  # check-then-publish as one step
                    stored = self.fs.exists(self._path(kind, name, "zarr.json"))
                    problem = self.check(kind, name) if stored else None
                    if stored and problem is None:
                        self._remove(kind, STAGING, staging)
                    else:
                        if problem is not None:
                            log.warning("%s is damaged (%s): replaced by the copy just ingested", self.artifact_url(kind, name), problem)
                        extra = {"source": source} if source is not None else {}
                        write.group.attrs["dq"] = record | {"name": name, "snapshot_of": base} | extra
                        self._publish(kind, staging, name)
                self._push_ref(kind, base, name, source_key)
                write.artifact = self.open(kind, name)
            except BaseException:
                self._remove(kind, STAGING, staging)
                raise

    def write_sidecar(self, kind: str, name: str, filename: str, payload: bytes) -> None:
        """A file beside an artifact's arrays (e.g. a subset's ``selection_diff.json``): not part
        of its content or fingerprint, removed with it."""
        self.open(kind, name)  # must exist
        with self.writing():
            self.fs.pipe_file(self._path(kind, name, filename), payload)

    def read_sidecar(self, kind: str, name: str, filename: str) -> bytes | None:
        """The bytes of an artifact's sidecar file (:meth:`write_sidecar`), or None when it has none."""
        path = self._path(kind, name, filename)
        return self.fs.cat_file(path) if self.fs.exists(path) else None

    def _ref_path(self, kind: str, base: str) -> str:
        _check_kind(kind)
        return self._path("refs", kind, f"{base}.json")

    def read_ref(self, kind: str, base: str) -> dict[str, Any] | None:
        """The ref ``refs/<kind>/<base>``, or None. A dataset's: ``{"latest": name, "history":
        [oldest, ..., latest], "source_key": the key of the ingest that made latest}``."""
        path = self._ref_path(kind, base)
        if not self.fs.exists(path):
            return None
        return json.loads(self.fs.cat_file(path))

    def write_ref(self, kind: str, base: str, ref: Mapping[str, Any]) -> None:
        """Replace a ref in one step (temporary file + rename locally; one object put elsewhere)."""
        path, payload = self._ref_path(kind, base), canonical_json(ref).encode()
        with self.writing():
            if not _is_local(self.url):
                self.fs.pipe_file(path, payload)
                return
            os.makedirs(os.path.dirname(path), exist_ok=True)
            temporary = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                with open(temporary, "wb") as fh:
                    fh.write(payload)
                os.replace(temporary, path)
            except OSError:  # a full disk: no half-written temporary file left in the store
                Path(temporary).unlink(missing_ok=True)
                raise

    def _push_ref(self, kind: str, base: str, name: str, source_key: str | None) -> None:
        with self.lock("ref", kind, base):  # read-modify-write: concurrent runs must not lose an entry
            history = [n for n in (self.read_ref(kind, base) or {}).get("history", []) if n != name]
            key = {} if source_key is None else {"source_key": source_key}
            self.write_ref(kind, base, {"latest": name, "history": [*history, name], **key})

    # -- garbage collection ------------------------------------------------------------------
    def gc(self, keep: int, *, dry_run: bool = False) -> list[str]:
        """Remove what no kept dataset snapshot needs; return the removed ``kind/name`` paths.

        Kept: the ``keep`` newest snapshots of every dataset (and datasets outside any ref), all
        artifacts derived from them (transitively, through input fingerprints), and everything
        those were made from. Nothing else is removed: reports, refs and the MLflow database stay.
        """
        if keep < 1:
            raise DQInputError(f"--keep must be at least 1, got {keep}")
        records = {(kind, name): self.open(kind, name).record for kind in ARTIFACT_KINDS for name in self.list(kind)}
        refs = {base: self.read_ref("datasets", base) for base in self._ref_names("datasets")}
        in_history = {name for ref in refs.values() for name in ref["history"]}
        kept_snapshots = {name for ref in refs.values() for name in ref["history"][-keep:]}
        live = {
            record["fingerprint"] for (kind, name), record in records.items()
            if kind == "datasets" and (name in kept_snapshots or name not in in_history)
        }
        grew = True
        while grew:  # descendants of kept snapshots
            before = len(live)
            live |= {r["fingerprint"] for r in records.values() if live.intersection(r.get("inputs", []))}
            grew = len(live) > before
        needed = set(live)
        while needed:  # and everything they were made from
            needed = {i for r in records.values() if r["fingerprint"] in needed for i in r.get("inputs", [])} - live
            live |= needed
        removed = sorted(f"{kind}/{name}" for (kind, name), r in records.items() if r["fingerprint"] not in live)
        if not dry_run:
            with self.writing():
                for path in removed:
                    self._remove(*path.split("/"))
                for base, ref in refs.items():
                    history = [n for n in ref["history"] if f"datasets/{n}" not in removed]
                    if history != ref["history"]:
                        # the latest snapshot is always kept: its ingest key stays valid
                        self.write_ref("datasets", base, {**ref, "latest": history[-1] if history else None, "history": history})
        return removed

    # -- integrity ---------------------------------------------------------------------------
    def verify(self, *, deep: bool = False, repair: bool = False) -> VerifyResult:
        """Check every artifact of the store (:meth:`check`); with ``repair``, remove each damaged
        derived artifact and every artifact derived from it (transitively, through input
        fingerprints), so the next run recomputes them. Snapshots are never removed: their
        damage names the ``dq ingest`` that replaces them."""
        result = VerifyResult()
        records: dict[tuple[str, str], dict[str, Any]] = {}
        for kind in ARTIFACT_KINDS:
            base = self._path(kind)
            entries = self.fs.ls(base, detail=False) if self.fs.exists(base) else []
            for name in sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in entries):
                if name.startswith("."):
                    continue
                record = self._group_record(kind, name) or {}
                records[kind, name] = record
                result.checked += 1
                if record and "chunks" not in record:
                    result.without_checksums.append(f"{kind}/{name}")
                problem = self.check(kind, name, deep=deep)
                if problem is not None:
                    result.damaged.append(self.damaged(kind, name, problem, record))
        if repair:
            doomed = {(e.kind, e.name) for e in result.damaged if e.derived}
            grew = True
            while grew:  # and whatever was made from them
                made_from = {records[key].get("fingerprint") for key in doomed} - {None}
                more = {key for key, r in records.items() if made_from.intersection(r.get("inputs", []))} - doomed
                doomed |= more
                grew = bool(more)
            with self.writing():
                for kind, name in sorted(doomed, key=lambda key: (ARTIFACT_KINDS.index(key[0]), key[1])):
                    self._remove(kind, name)
                    result.removed.append(f"{kind}/{name}")
        return result

    def _ref_names(self, kind: str) -> list[str]:
        base = self._path("refs", kind)
        if not self.fs.exists(base):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False)]
        return sorted(n[: -len(".json")] for n in names if n.endswith(".json"))

    def _publish(self, kind: str, staging: str, name: str) -> None:
        """Move a finished staging group to ``kind/name``, replacing any previous artifact.

        The previous artifact is moved aside first and put back if the move fails, so a failed
        publish never loses what was stored.
        """
        src, dst = self._path(kind, STAGING, staging), self._path(kind, name)
        old = self._path(kind, STAGING, f"{name}-replaced-{uuid.uuid4().hex[:8]}")
        with self.lock("publish", kind, name):  # two writers of one name publish one after the other
            had_old = self.fs.exists(dst)
            if had_old:
                self._move(dst, old)
            try:
                self._move(src, dst)
            except BaseException:
                if had_old:
                    if self.fs.exists(dst):
                        self.fs.rm(dst, recursive=True)
                    self._move(old, dst)
                raise
            if had_old:
                self.fs.rm(old, recursive=True)

    def _move(self, src: str, dst: str) -> None:
        """Rename a group folder: atomic on local disks; elsewhere copy with the root
        ``zarr.json`` (which carries the completion record) copied last, then delete."""
        if _is_local(self.url):
            os.rename(src, dst)
            return
        marker = f"{src}/zarr.json"
        paths = sorted(p for p in self.fs.find(src) if p != marker)
        # One call: an object store copies them server-side, many at a time (s3fs batches them).
        self.fs.copy(paths, [dst + path[len(src):] for path in paths])
        self.fs.copy(marker, f"{dst}/zarr.json")
        self.fs.rm(src, recursive=True)

    def _remove(self, *parts: str) -> None:
        path = self._path(*parts)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    # -- locks and staging clean-up (dq_ops.locks) ----------------------------------------------
    def _lock_path(self, *parts: str) -> str:
        return self._path(LOCKS, "--".join(parts) + ".lock")

    @contextmanager
    def lock(self, *parts: str) -> Iterator[None]:
        """An exclusive lock named by ``parts`` among the writers of this store (local stores;
        a no-op on object stores, see :mod:`dq_ops.locks`)."""
        if not _is_local(self.url):
            yield
            return
        with file_lock(self._lock_path(*parts)):
            yield

    @contextmanager
    def _staging_lock(self, kind: str, staging: str) -> Iterator[None]:
        """Held by the writer of a one-off staging group for its whole life: the proof that it is
        alive (:meth:`clean_staging`). Its lock file goes with it."""
        with self.lock("staging", kind, staging):
            try:
                yield
            finally:
                if _is_local(self.url):
                    Path(self._lock_path("staging", kind, staging)).unlink(missing_ok=True)

    def clean_staging(self) -> list[str]:
        """Remove the staging groups of writers that are gone (killed runs); return their paths.

        A staging group is in use while its writer holds its staging lock (one-off groups of
        :meth:`write`) or its stage lock (resumable groups, held by ``ChunkedStage.run``).
        Resumable groups with finished chunks are kept: they are what a rerun resumes from.
        Local stores only (elsewhere liveness cannot be told): returns ``[]`` there.
        """
        if not _is_local(self.url):
            return []
        removed = []
        for kind in ARTIFACT_KINDS:
            base = self._path(kind, STAGING)
            if not self.fs.exists(base):
                continue
            for entry in sorted(self.fs.ls(base, detail=False)):
                staging = entry.rstrip("/").rsplit("/", 1)[-1]
                if is_held(self._lock_path("staging", kind, staging)) or is_held(self._lock_path("stage", kind, staging)):
                    continue
                if self._has_finished_chunks(kind, staging):
                    continue
                with self.writing():
                    self._remove(kind, STAGING, staging)
                    Path(self._lock_path("staging", kind, staging)).unlink(missing_ok=True)
                removed.append(f"{kind}/{STAGING}/{staging}")
        return removed

    def _has_finished_chunks(self, kind: str, staging: str) -> bool:
        try:
            group = self._open_group(self.artifact_url(kind, f"{STAGING}/{staging}"), "r")
            return "done" in group and bool(np.asarray(group["done"][:]).any())
        except (FileNotFoundError, KeyError, ValueError, zarr.errors.GroupNotFoundError):
            return False


def check_artifact_name(name: str) -> None:
    """An artifact name is one path component of letters, digits, ``.``, ``_`` and ``-`` starting
    with a letter or digit (internally below ``.staging/``): no name can reach outside its
    ``<kind>/`` folder of the store (``..``, ``/``, absolute paths, URLs are refused)."""
    parts = str(name).split("/")
    if parts[0] == STAGING and len(parts) == 2:
        parts = parts[1:]
    if len(parts) != 1 or not _ARTIFACT_NAME.fullmatch(parts[0]):
        raise DQStoreError(f"{name!r} is not an artifact name (letters, digits, '.', '_', '-'; no '/' or '..')")


def _check_kind(kind: str) -> None:
    if kind not in ARTIFACT_KINDS:
        raise DQInputError(f"unknown artifact kind {kind!r}; expected one of {', '.join(ARTIFACT_KINDS)}")
