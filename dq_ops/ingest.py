"""Ingest: read a dataset source and write it into the store as ``datasets/<name>``.

Each split becomes ``<split>/{images|texts, labels, ids}`` (see ``dq_ops.store``), written in
whole chunks as batches stream in, inside one ``Store.write_snapshot``: the result is the
immutable snapshot ``datasets/<name>-<fingerprint[:12]>`` and ``<name>``'s ``latest`` pointer
moves to it. Re-ingesting unchanged content finds the same snapshot; a failed ingest leaves every
snapshot and the pointer as they were. The dataset group's attributes hold ``modality``
("images" or "texts"), ``class_names`` (or null) and ``source_format``.

Sources stored as shards (Parquet, WebDataset) are spread over dask workers when a cluster runs
or the source is large: each worker decodes whole shards into parts of the staging group, then
each output chunk is gathered from the parts on a worker and the parts are removed. The flow
process holds shard lists and counts, never pixels, and the snapshot is byte-identical to the one
a single process writes (same rows in the same order, same chunks, same fingerprint).

A refresh decodes only the shards that changed. Beside each snapshot read shard by shard, the
sidecar ``parts.json`` records where each shard's rows lie in it, under the shard's path, name,
size and modification time. The next ingest with the same settings gathers an unchanged shard's
rows from that earlier snapshot, as stored, instead of decoding the shard again; the snapshot
it writes is the same, row for row and byte for byte.

The artifact's parameters are the dataset settings that shape its content (format, limit, resize,
error policy, text fields, label field). The source URL and the dataset name are left out, so the
same data ingested from another place has the same fingerprint and downstream caches still hit.

As a pipeline stage (:class:`IngestStage`), ingest's key is the dataset settings plus a signature
of the source files (:func:`source_signature`): the dataset's ref records the key its latest
snapshot was read under, so an unchanged source is not read again, and a refreshed one is.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import compress
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from dq_ops.config import DatasetConfig
from dq_ops.errors import DQInputError
from dq_ops.progress import Progress
from dq_ops.readers import Batch, Reader, SkippedItem, open_reader
from dq_ops.readers.base import ItemErrors, OnError, PartitionedReader
from dq_ops.readers.shards import Shard, ShardReader
from dq_ops.stage import Stage, is_running, resolve_client, run_jobs
from dq_ops.store import (
    DECODE_ERRORS,
    Artifact,
    ChunkCopy,
    DQStoreError,
    Store,
    copy_chunks,
    open_zarr_store,
    sidecars_unlisted,
    write_array,
    write_rows,
)
from dq_ops.urls import filesystem, is_glob

if TYPE_CHECKING:
    from distributed import Client

    from dq_ops.stage import ClientSource

# Bumped when what ingest writes for the same source changes (it enters the ingest stage's key).
INGEST_VERSION = 2
# Samples per reader batch: small enough for large images (256 × 224² RGB ≈ 38 MB).
BATCH_SIZE = 256
# A sharded source this large is spread over workers even when no cluster runs yet: decoding it
# here would take longer than starting a local cluster.
SPREAD_MIN_SAMPLES = 20_000
# Beside a snapshot read shard by shard: where each shard's rows lie in it (module docstring).
PARTS_SIDECAR = "parts.json"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardReuse:
    """How one split read shard by shard was made: shards decoded, shards whose rows were taken
    from the earlier snapshot ``source`` (unchanged since it was read), those rows, and the
    chunks copied as stored bytes (whole chunks of a part or of ``source``) rather than encoded."""

    decoded: int
    reused: int
    reused_rows: int
    source: str | None
    copied_chunks: int = 0

    def __str__(self) -> str:
        taken = f", {self.reused} unchanged: {self.reused_rows:,} rows from {self.source}" if self.reused else ""
        return f"{self.decoded} shards decoded{taken}; {self.copied_chunks} chunks copied as stored"


@dataclass(frozen=True)
class IngestResult:
    """What an ingest stored: the snapshot (name, URL, fingerprint), per-split counts, skipped items,
    class names, and per split read shard by shard what was decoded (``shards``). ``dataset`` is
    the dataset's name, ``name`` its snapshot's."""

    dataset: str
    name: str
    url: str
    fingerprint: str
    source: str
    modality: str
    counts: dict[str, int]
    class_names: list[str] | None
    skipped: list[SkippedItem]
    shards: dict[str, ShardReuse] = field(default_factory=dict)


def ingest(
    config: DatasetConfig, store: Store, *, progress: Progress | None = None, client: ClientSource = None,
) -> IngestResult:
    """Read ``config``'s source and store it as a snapshot of ``datasets/<config.name>`` (always
    reads it: ``dq ingest``; a run's stage reads it only when it changed, :class:`IngestStage`).

    ``progress(done, total)`` is called after every batch (every part when spread over
    workers); ``total`` counts the samples the source announces (after ``limit``), so with
    skipped items ``done`` may end below it. ``client``: a dask client, or a function that
    starts one, for sharded sources (module docstring); without, everything is read here.
    Raises :class:`DQInputError` naming the file or record at fault.
    """
    return IngestStage(store, config).ingest(progress=progress, client=client)


def file_signatures(url: str) -> dict[str, str]:
    """``"size|modification time"`` of every file under ``url``, by path: a listing, no reads."""
    fs, root = filesystem(url)
    if is_glob(root):
        paths = fs.glob(root, detail=True)
    else:
        paths = fs.find(root, withdirs=False, detail=True) if fs.isdir(root) else {root: fs.info(root)}
    return {path: f"{info.get('size')}|{info.get('mtime') or info.get('LastModified') or info.get('created') or ''}"
            for path, info in paths.items()}


def source_signature(url: str | Mapping[str, str]) -> str:
    """sha256 over (path, size, modification time) of every file under ``url`` (or of the
    :func:`file_signatures` already taken).

    Cheap on any fsspec filesystem (a listing, no reads); any added, removed, resized or
    rewritten file changes it.
    """
    digest = hashlib.sha256()
    for path, signature in sorted((file_signatures(url) if isinstance(url, str) else url).items()):
        digest.update(f"{path}|{signature}\n".encode())
    return digest.hexdigest()


def snapshot_summary(snapshot: Artifact) -> dict[str, Any]:
    """What a dataset snapshot holds, read from it: ``modality``, per-split ``counts`` (the
    quantized split first) and ``class_names``."""
    with sidecars_unlisted():
        splits = sorted(snapshot.group.group_keys(), key=lambda split: (split != "train", split))
    return {
        "modality": snapshot.group.attrs["modality"],
        "counts": {split: int(snapshot[f"{split}/labels"].shape[0]) for split in splits},
        "class_names": snapshot.group.attrs["class_names"],
    }


class IngestStage(Stage):
    """Ingest as a pipeline stage: the source read into a dataset snapshot.

    Its key (:meth:`name`) covers the dataset settings, the source's :func:`source_signature`
    and the stage version. A snapshot's name comes from its content, which is only known once
    the source is read, so "done" is not a stored ``datasets/<key>``: it is the dataset's ref
    saying that its latest snapshot was ingested under this key (``source_key``), and that
    snapshot intact. A source changed since, a snapshot of another source made latest in
    between, or a damaged snapshot is read again.
    """

    kind = "datasets"
    version = INGEST_VERSION

    def __init__(self, store: Store, config: DatasetConfig):
        super().__init__(store)
        self.config = config
        self.skipped: list[SkippedItem] = []  # bad items the last read skipped (on_error: skip)
        self.shards: dict[str, ShardReuse] = {}  # per split the last read spread: shards decoded and reused

    @functools.cached_property
    def _files(self) -> dict[str, str]:
        """The source's files, listed once: the key names the state of the source this stage reads."""
        return file_signatures(self.config.url)

    @functools.cached_property
    def _source(self) -> str:
        return source_signature(self._files)

    def params(self) -> dict[str, Any]:
        return {"config": self.config.model_dump(mode="json"), "source": self._source}

    def inputs(self) -> list[Artifact]:
        return []

    def stored(self, name: str | None = None) -> Artifact | None:
        ref = self.store.read_ref(self.kind, self.config.name)
        if ref is None or ref.get("source_key") != (name or self.name()):
            return None
        try:
            return self.store.open(self.kind, ref["latest"])
        except DQStoreError:  # damaged or removed since: read again
            return None

    def compute(self, group: zarr.Group, progress: Progress | None, client: ClientSource) -> None:
        raise NotImplementedError("ingest writes a snapshot named by its content: see run()")

    def run(self, *, progress: Progress | None = None, client: ClientSource = None) -> Artifact:
        """The dataset's latest snapshot when it was read from this very source state, else the
        snapshot :meth:`ingest` writes."""
        stored = self.stored()
        if stored is not None:
            return stored
        return self.store.open(self.kind, self.ingest(progress=progress, client=client).name)

    def ingest(self, *, progress: Progress | None = None, client: ClientSource = None) -> IngestResult:
        """Read the source into a new snapshot (or find its content stored) and make it latest,
        recording this stage's key in the dataset's ref."""
        config, store = self.config, self.store
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
        earlier = self._earlier_parts(reader, params)
        counts: dict[str, int] = {}
        layouts: dict[str, list[dict[str, Any]]] = {}
        shards: dict[str, ShardReuse] = {}
        with store.write_snapshot("datasets", config.name, params, source=config.url, source_key=self.name()) as snapshot:
            group = snapshot.group
            for split, source, test_side in plan:
                hold_out = None if test_side is None else (config.test_fraction, test_side)
                if _spreads(reader, source, client):
                    spread = _SpreadSplit(reader, source, hold_out, config.on_error, f"{snapshot.url}/{split}",
                                          store.storage_options, capacity[split], self._files, earlier.get(split, {}))
                    counts[split] = self._write_spread(group, split, spread, resolve_client(client), tick)
                    layouts[split] = spread.layout
                    shards[split] = spread.reuse()
                else:
                    batches = reader.iter_batches(source, BATCH_SIZE)
                    if hold_out is not None:
                        batches = _hold_out(batches, *hold_out)
                    counts[split] = _write_split(group.create_group(split), reader.modality, batches, capacity[split], tick)
                if counts[split] == 0:
                    skipped = f" ({len(reader.skipped)} bad items skipped)" if reader.skipped else ""
                    raise DQInputError(f"{reader.source}: split {split!r} has no samples (empty dataset){skipped}")
            group.attrs.update(
                {"modality": reader.modality, "class_names": reader.class_names(), "source_format": config.format}
            )
        self.skipped, self.shards = list(reader.skipped), shards
        artifact = snapshot.artifact
        if layouts:
            record = {"version": INGEST_VERSION, "params": params, "splits": layouts}
            store.write_sidecar(self.kind, artifact.name, PARTS_SIDECAR, json.dumps(record).encode())
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
            shards=shards,
        )

    def _write_spread(self, group: zarr.Group, split: str, spread: _SpreadSplit, client: Client,
                      tick: Callable[[int], None]) -> int:
        """``spread.write`` into ``group[split]``. Should the rows taken from the earlier snapshot
        fail to decode (damaged since), the split is read again from every shard."""
        ticked, skipped = 0, len(spread.reader.skipped)

        def counted(n: int) -> None:
            nonlocal ticked
            ticked += n
            tick(n)

        try:
            return spread.write(group.create_group(split), client, counted)
        except DECODE_ERRORS as exc:
            if not spread.earlier:
                raise
            log.warning("%s: the rows of unchanged shards in %s did not decode (%s): reading every shard again",
                        self.config.name, next(iter(spread.earlier.values())).url, exc)
        tick(-ticked)
        del spread.reader.skipped[skipped:]
        _remove_group(group, split)
        spread.earlier = {}
        return spread.write(group.create_group(split), client, tick)

    def _earlier_parts(self, reader: Reader, params: dict[str, Any]) -> dict[str, dict[str, PartRows]]:
        """Per output split, the shards whose rows the dataset's latest snapshot already holds
        (by :func:`part_key`), when it was read shard by shard with these very settings and its
        images have the shape this read decodes to."""
        ref = self.store.read_ref(self.kind, self.config.name)
        if ref is None or not isinstance(reader, ShardReader):
            return {}
        try:
            snapshot = self.store.open(self.kind, ref["latest"])
            payload = self.store.read_sidecar(self.kind, snapshot.name, PARTS_SIDECAR)
        except DQStoreError:  # damaged or removed since: nothing to take rows from
            return {}
        record = json.loads(payload) if payload is not None else {}
        if record.get("version") != INGEST_VERSION or record.get("params") != params:
            return {}
        found = {}
        for split, layout in record["splits"].items():
            if split not in snapshot.group or tuple(snapshot[f"{split}/images"].shape[1:]) != reader.sample_shape():
                continue
            digests = {name: snapshot.chunk_digests(f"{split}/{name}") for name in snapshot[split].array_keys()}
            found[split] = {entry["key"]: PartRows(f"{snapshot.url}/{split}", entry["start"], entry["stop"], entry["good"],
                                                   [SkippedItem(*item) for item in entry["skipped"]], digests)
                            for entry in layout}
        return found


def _remove_group(parent: zarr.Group, name: str, attempts: int = 20) -> None:
    """``del parent[name]`` after a failed job: cancelling the others does not stop those already
    running on a worker, and one that writes a chunk meanwhile makes the removal fail (a folder
    not empty); they finish within seconds, so the removal is tried again."""
    for attempt in range(attempts):
        try:
            del parent[name]
            return
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5)


def part_key(part: Any, files: Mapping[str, str]) -> str | None:
    """What identifies a shard's decoded rows across snapshots: its path, name (which its ids
    hold) and file signature (size, modification time); None for other parts (folders of files)."""
    if not isinstance(part, Shard) or part.path not in files:
        return None
    return f"{part.path}|{part.name}|{files[part.path]}"


@dataclass(frozen=True)
class PartRows:
    """A shard's rows ``[start, stop)`` of an earlier snapshot's split at ``url``, with the good
    samples read and the items skipped when it was decoded."""

    url: str
    start: int
    stop: int
    good: int
    skipped: list[SkippedItem]
    chunk_digests: Mapping[str, list[bytes]]  # the split's, by array name (Artifact.chunk_digests)


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


def _spreads(reader: Reader, split: str, client: ClientSource) -> bool:
    """Whether ``split`` is read on dask workers: a sharded source of several shards, with a
    cluster running or a source large enough to start one."""
    if client is None or not isinstance(reader, PartitionedReader) or len(reader.parts(split)) < 2:
        return False
    return is_running(client) or reader.num_samples(split) >= SPREAD_MIN_SAMPLES


@dataclass(frozen=True)
class PartJob:
    """Decode one part of a split on a worker into its own group at ``url``."""

    part: Any
    take: int | None  # at most this many good samples (the split's limit falls inside this part)
    hold_out: tuple[float, bool] | None  # (test fraction, keep the held-out side?)
    on_error: OnError
    url: str
    storage_options: dict[str, Any]


@dataclass(frozen=True)
class PartWritten:
    rows: int  # rows written (after the hold-out)
    good: int  # good samples read (before it: what the limit counts)
    skipped: list[SkippedItem] = field(default_factory=list)


def write_part(job: PartJob, reader: PartitionedReader) -> PartWritten:
    """Worker side: decode ``job.part`` with ``reader`` and write its rows as ``images|texts, labels, ids``."""
    errors = ItemErrors(job.on_error)
    good = 0

    def counted(batches: Iterator[Batch]) -> Iterator[Batch]:
        nonlocal good
        for batch in batches:
            good += len(batch)
            yield batch

    batches = counted(reader.part_batches(job.part, BATCH_SIZE, job.take, errors))
    if job.hold_out is not None:
        batches = _hold_out(batches, *job.hold_out)
    group = zarr.open_group(open_zarr_store(job.url, job.storage_options), mode="w")
    rows = _write_split(group, reader.modality, batches, job.part.samples, lambda n: None)
    return PartWritten(rows, good, errors.skipped)


# Output chunks per gather job: the job opens its groups once, copies the chunks it can take as
# stored bytes together, and reads and writes the others a run of consecutive chunks at a time
# (one call each, whose chunk requests overlap), instead of paying requests one by one per chunk.
GATHER_CHUNKS = 16

Piece = tuple[str, int, int]  # (URL of a part or of an earlier snapshot's split, first row, end row)


def _append_piece(pieces: list[Piece], piece: Piece) -> None:
    """Append ``piece``, merged into the last one when it continues its rows in the same group."""
    if pieces and pieces[-1][0] == piece[0] and pieces[-1][2] == piece[1]:
        piece = (piece[0], pieces.pop()[1], piece[2])
    pieces.append(piece)


@dataclass(frozen=True)
class GatherJob:
    """Fill consecutive whole chunks of a split's arrays, each from consecutive pieces."""

    url: str
    storage_options: dict[str, Any]
    chunks: list[tuple[int, int, list[Piece]]]  # (first row, end row, its pieces in order)
    digests: dict[tuple[int, str], bytes]  # (first row, array name): a whole chunk's digest, its earlier snapshot's record's


def _runs(chunks: list[tuple[int, int, list[Piece]]]) -> list[tuple[int, int, list[Piece]]]:
    """Consecutive chunks joined into one (first row, end row, merged pieces) each."""
    runs: list[tuple[int, int, list[Piece]]] = []
    for start, stop, pieces in chunks:
        if runs and runs[-1][1] == start:
            start, merged = runs[-1][0], runs.pop()[2]
        else:
            merged = []
        for piece in pieces:
            _append_piece(merged, piece)
        runs.append((start, stop, merged))
    return runs


def gather_rows(job: GatherJob) -> int:
    """Worker side: copy the pieces' rows into the split's arrays; returns the chunks copied as
    stored bytes in every array. A chunk that is one whole chunk of an earlier snapshot (an
    unchanged shard's rows at a chunk boundary, as when shards are only added) or of a part is
    copied as its stored bytes, not decoded and encoded again; the others (rows shifted by a
    removal, or from several pieces) are read and written a run of consecutive chunks at a time."""
    split = zarr.open_group(open_zarr_store(job.url, job.storage_options), mode="r+")
    names = list(split.array_keys())
    targets = {name: split[name] for name in names}
    urls = dict.fromkeys(url for *_, pieces in job.chunks for url, _, _ in pieces)
    groups = {url: zarr.open_group(open_zarr_store(url, job.storage_options), mode="r") for url in urls}
    sources = {(url, name): groups[url][name] for url in urls for name in names}
    whole = [(start, stop, pieces[0]) for start, stop, pieces in job.chunks if len(pieces) == 1]
    copies = [(start, name) for start, _, _ in whole for name in names]
    copied = set(compress(copies, copy_chunks([ChunkCopy(sources[url, name], first, targets[name], start, stop - start,
                                                          job.digests.get((start, name)))
                                                for start, stop, (url, first, _) in whole for name in names])))
    for name in names:
        for start, _, pieces in _runs([chunk for chunk in job.chunks if (chunk[0], name) not in copied]):
            write_rows(targets[name], start, np.concatenate([np.asarray(sources[url, name][a:b]) for url, a, b in pieces]))
    return sum(all((start, name) in copied for name in names) for start, _, _ in job.chunks)


@dataclass
class _SpreadSplit:
    """One output split read on dask workers: parts decoded in waves, then gathered chunk by chunk.

    The split's ``limit`` counts good samples in read order: parts whose bounds fit in what is left
    are read whole, at once; the part the limit falls in is read alone, capped, and so on until
    the limit is reached or the parts run out. A part read whole whose rows an earlier snapshot
    holds (``earlier``, by :func:`part_key` over the source's ``files``) is not decoded: the
    gather takes its rows from there. ``layout`` is what the snapshot's ``parts.json`` records.
    """

    reader: PartitionedReader
    source: str
    hold_out: tuple[float, bool] | None
    on_error: OnError
    url: str
    storage_options: dict[str, Any]
    capacity: int
    files: Mapping[str, str]
    earlier: Mapping[str, PartRows]
    layout: list[dict[str, Any]] = field(default_factory=list)
    _parts: int = field(default=0, init=False)  # parts the last write read
    _reused: list[tuple[str, int]] = field(default_factory=list, init=False)  # (earlier split URL, rows) of those it took
    _copied: int = field(default=0, init=False)  # chunks the last write copied as stored bytes

    def write(self, group: zarr.Group, client: Client, tick: Callable[[int], None]) -> int:
        parts = self.reader.parts(self.source)
        limit = self.reader.num_samples(self.source)
        group.create_group("parts")  # the workers' parts, removed once gathered
        self._copied = 0
        [reader] = client.scatter([self.reader], hash=False)  # sent to the workers once, not with every job
        # per part read: (its key if read whole, the group holding its rows, the first of them, what was read)
        written: list[tuple[str | None, str, int, PartWritten]] = []
        good, next_part = 0, 0
        while good < limit and next_part < len(parts):
            wave, bound, take = [], 0, None
            while next_part < len(parts) and bound + parts[next_part].samples <= limit - good:
                wave.append(next_part)
                bound += parts[next_part].samples
                next_part += 1
            if not wave:  # the limit falls inside the next part
                wave, take, next_part = [next_part], limit - good, next_part + 1
            keys = {k: None if take is not None else part_key(parts[k], self.files) for k in wave}
            reused = {k: self.earlier[key] for k, key in keys.items() if key in self.earlier}
            for rows in reused.values():
                tick(rows.stop - rows.start)
            jobs = {k: PartJob(parts[k], take, self.hold_out, self.on_error, f"{self.url}/parts/{k}", self.storage_options)
                    for k in wave if k not in reused}
            # the error raised is the earliest in job order: the one a single reader would have met first
            decoded = dict(zip(jobs, run_jobs(client, write_part, list(jobs.values()), shared=(reader,),
                                              on_done=lambda d: tick(d.rows))))
            for k in wave:
                if k in reused:
                    rows = reused[k]
                    written.append((keys[k], rows.url, rows.start, PartWritten(rows.stop - rows.start, rows.good, rows.skipped)))
                else:
                    written.append((keys[k], jobs[k].url, 0, decoded[k]))
                self.reader.skipped.extend(written[-1][3].skipped)
                good += written[-1][3].good
        rows = self._gather(group, client, [(url, first, done.rows) for _, url, first, done in written])
        del group["parts"]
        offsets = np.cumsum([0] + [done.rows for *_, done in written]).tolist()
        self._reused = [(url, done.rows) for key, url, _, done in written if key in self.earlier]
        self._parts = len(written)
        self.layout = [{"key": key, "start": start, "stop": stop, "good": done.good,
                        "skipped": [[item.name, item.reason] for item in done.skipped]}
                       for (key, _, _, done), start, stop in zip(written, offsets[:-1], offsets[1:]) if key is not None]
        return rows

    def reuse(self) -> ShardReuse:
        """What the last :meth:`write` decoded and what it took from the earlier snapshot."""
        source = self._reused[0][0].rsplit("/", 1)[0] if self._reused else None
        return ShardReuse(self._parts - len(self._reused), len(self._reused), sum(rows for _, rows in self._reused), source,
                          self._copied)

    def _gather(self, group: zarr.Group, client: Client, parts: list[tuple[str, int, int]]) -> int:
        """Create the split's arrays as a single writer would (so chunks and bytes match) and fill
        them from the parts (group URL, first row there, rows), :data:`GATHER_CHUNKS` output chunks a job."""
        parts = [part for part in parts if part[2]]
        total = sum(rows for *_, rows in parts)
        if total == 0:
            return 0
        first = zarr.open_group(open_zarr_store(parts[0][0], self.storage_options), mode="r")
        sample_name = "images" if self.reader.modality == "images" else "texts"
        samples = first[sample_name]
        arrays = [write_array(group, sample_name, shape=(self.capacity, *samples.shape[1:]), dtype=samples.dtype)]
        chunk_rows = arrays[0].chunks[0]
        arrays += [write_array(group, "labels", shape=(self.capacity,), dtype=np.int64, chunk_rows=chunk_rows),
                   write_array(group, "ids", shape=(self.capacity,), dtype=str, chunk_rows=chunk_rows)]
        offsets = np.cumsum([0] + [rows for *_, rows in parts])
        chunks = []
        for start in range(0, total, chunk_rows):
            stop = min(total, start + chunk_rows)
            pieces: list[Piece] = []
            for (url, first, _), lo, hi in zip(parts, offsets[:-1].tolist(), offsets[1:].tolist()):
                if lo < stop and hi > start:
                    _append_piece(pieces, (url, first + max(start, lo) - lo, first + min(stop, hi) - lo))
            chunks.append((start, stop, pieces))
        recorded = {rows.url: rows.chunk_digests for rows in self.earlier.values()}
        digests = {}
        for start, _, pieces in chunks:  # a chunk that is one whole chunk of an earlier snapshot: its digest is known
            url, first, _ = pieces[0]
            if len(pieces) == 1 and url in recorded and not first % chunk_rows:
                for name, known in recorded[url].items():
                    if first // chunk_rows < len(known):
                        digests[start, name] = known[first // chunk_rows]
        jobs = [GatherJob(self.url, self.storage_options, chunks[k:k + GATHER_CHUNKS],
                          {key: d for key, d in digests.items() if chunks[k][0] <= key[0] < chunks[k:k + GATHER_CHUNKS][-1][1]})
                for k in range(0, len(chunks), GATHER_CHUNKS)]
        self._copied = sum(run_jobs(client, gather_rows, jobs))
        if total < self.capacity:
            for array in arrays:
                array.resize((total, *array.shape[1:]))
        return total


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
            write_rows(arrays[name], written, merged[key][:rows])
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
