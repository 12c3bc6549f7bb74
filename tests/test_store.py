"""The storage layer on real stores: a local path, a file:// URL and fsspec's memory://."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import fsspec
import numpy as np
import pytest
import zarr

from dq_ops.errors import DQInputError
from dq_ops.store import (
    STAGING,
    ChunkCopy,
    DQDamagedError,
    DQStoreError,
    Store,
    chunk_digest,
    copy_chunks,
    default_compressor,
    derive_key,
    group_digest,
    open_zarr_store,
    write_array,
    write_rows,
)


@pytest.fixture(params=["path", "file-url", "memory"])
def store(request, tmp_path) -> Iterator[Store]:
    if request.param == "path":
        yield Store(str(tmp_path / "store"))
    elif request.param == "file-url":
        yield Store(f"file://{tmp_path}/store")
    else:  # memory:// is one filesystem per process: give each test its own root
        root = f"dq-test-{uuid.uuid4().hex}"
        yield Store(f"memory://{root}")
        memory = fsspec.filesystem("memory")
        if memory.exists(f"/{root}"):  # a test that removed the store's last file left no folder
            memory.rm(f"/{root}", recursive=True)


def _write(store: Store, name: str = "toy", *, values=None, params=None, inputs=(), attrs=None, chunk_rows=None):
    values = np.arange(12, dtype=np.float32).reshape(6, 2) if values is None else values
    with store.write("embeddings", name, params or {"k": 1}, inputs) as group:
        write_array(group, "features", values, chunk_rows=chunk_rows)
        write_array(group, "ids", np.array([f"s{i}" for i in range(len(values))]))
        group.attrs.update(attrs or {})
    return store.open("embeddings", name)


def _staging(store: Store, kind: str) -> list[str]:
    path = f"{store._root}/{kind}/{STAGING}"
    return store.fs.ls(path, detail=False) if store.fs.exists(path) else []


def test_write_commit_open_roundtrip(store: Store):
    values = np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32)
    artifact = _write(store, values=values, params={"backbone": "x", "size": 32}, inputs=["abc"])

    assert artifact.url == store.artifact_url("embeddings", "toy") == f"{store.url}/embeddings/toy"
    np.testing.assert_array_equal(artifact["features"][:], values)
    assert list(artifact["ids"][:]) == [f"s{i}" for i in range(100)]
    assert artifact.record["complete"] is True
    assert artifact.record["kind"] == "embeddings" and artifact.record["name"] == "toy"
    assert artifact.params == {"backbone": "x", "size": 32}
    assert artifact.record["inputs"] == ["abc"]
    assert len(artifact.fingerprint) == 64
    assert store.exists("embeddings", "toy") and store.list("embeddings") == ["toy"]
    assert _staging(store, "embeddings") == []
    # A second Store object on the same URL (a new process, say) sees the same artifact.
    assert Store(store.url).open("embeddings", "toy").fingerprint == artifact.fingerprint


def test_plain_path_and_file_url_address_the_same_store(tmp_path):
    written = _write(Store(f"file://{tmp_path}/s"))
    opened = Store(str(tmp_path / "s")).open("embeddings", "toy")
    assert opened.fingerprint == written.fingerprint


def test_artifact_invisible_until_commit(store: Store):
    with store.write("bins", "b", {}) as group:
        write_array(group, "bin_of_sample", np.zeros(10, np.int32))
        assert not store.exists("bins", "b")
        assert store.list("bins") == []
        assert len(_staging(store, "bins")) == 1
    assert store.list("bins") == ["b"]
    assert _staging(store, "bins") == []


def test_failed_write_leaves_old_artifact_intact(store: Store):
    old = _write(store)
    old_values = old["features"][:]
    with pytest.raises(RuntimeError, match="disk on fire"):
        with store.write("embeddings", "toy", {"k": 2}) as group:
            write_array(group, "features", np.ones((6, 2), np.float32))
            raise RuntimeError("disk on fire")
    again = store.open("embeddings", "toy")
    assert again.fingerprint == old.fingerprint and again.params == {"k": 1}
    np.testing.assert_array_equal(again["features"][:], old_values)
    assert _staging(store, "embeddings") == []


def test_rewrite_replaces_artifact_without_leftovers(store: Store):
    first = _write(store)
    second = _write(store, values=np.zeros((3, 2), np.float32))
    assert second.fingerprint != first.fingerprint
    assert store.open("embeddings", "toy")["features"].shape == (3, 2)
    assert store.list("embeddings") == ["toy"]
    assert _staging(store, "embeddings") == []


def test_fingerprint_changes_exactly_with_content_or_parameters(store: Store):
    base = _write(store, name="a").fingerprint
    # Same content and parameters: same fingerprint, whatever the name or write time.
    assert _write(store, name="a").fingerprint == base
    assert _write(store, name="b").fingerprint == base
    # Any change of values, dtype, shape, chunk grid (the digest combines chunk digests), parameters,
    # inputs or attributes: a new fingerprint.
    values = np.arange(12, dtype=np.float32).reshape(6, 2)
    changed = values.copy()
    changed[5, 1] += 1
    variants = [
        _write(store, name="d", values=changed),
        _write(store, name="e", values=values.astype(np.float64)),
        _write(store, name="f", values=values.reshape(12, 1)),
        _write(store, name="g", params={"k": 2}),
        _write(store, name="h", inputs=["upstream"]),
        _write(store, name="i", attrs={"note": "x"}),
        _write(store, name="c", chunk_rows=1),
    ]
    fingerprints = [artifact.fingerprint for artifact in variants]
    assert base not in fingerprints and len(set(fingerprints)) == len(fingerprints)


def test_incomplete_artifacts_are_refused(store: Store):
    # A group at the artifact's place without a completion record (an interrupted copy, say).
    group = zarr.open_group(store=open_zarr_store(store.artifact_url("models", "half")), mode="w")
    write_array(group, "weights", np.zeros(4, np.float32))
    with pytest.raises(DQStoreError, match=r"models/half: artifact is incomplete"):
        store.open("models", "half")
    # A record not marked complete is refused too.
    group.attrs["dq"] = {"fingerprint": "0" * 64, "complete": False}
    with pytest.raises(DQStoreError, match="incomplete"):
        store.open("models", "half")
    assert not store.exists("models", "half")
    _write(store, name="whole")
    assert store.list("models") == [] and store.list("embeddings") == ["whole"]


def test_missing_artifacts_and_paths_name_their_url(store: Store):
    with pytest.raises(DQStoreError, match=r"datasets/nope: no such artifact"):
        store.open("datasets", "nope")
    assert store.list("datasets") == []
    artifact = _write(store)
    with pytest.raises(DQStoreError, match=r"embeddings/toy: no array or group 'missing'"):
        artifact["missing"]
    with pytest.raises(DQInputError, match="unknown artifact kind 'tables'"):
        store.artifact_url("tables", "x")


def test_resumable_write_survives_a_restart(store: Store):
    group, url = store.resumable("patches", "p")
    write_array(group, "kept", shape=(4, 2), dtype=np.uint8)[:2] = 1
    assert not store.exists("patches", "p")
    # A restarted run reopens the same staging group and finds the rows already written.
    group, _ = store.resumable("patches", "p")
    group["kept"][2:] = 2
    artifact = store.commit_resumable("patches", "p", {"theta": 0.2})
    np.testing.assert_array_equal(artifact["kept"][:, 0], [1, 1, 2, 2])
    assert _staging(store, "patches") == []
    store.resumable("patches", "q")
    store.discard_resumable("patches", "q")
    assert _staging(store, "patches") == []


def test_derive_key_is_a_stable_function_of_stage_params_and_inputs():
    key = derive_key("bins", {"num_bins": 10, "kernel": "cosine"}, ["f1"])
    assert key == derive_key("bins", {"kernel": "cosine", "num_bins": 10}, ["f1"])
    assert len(key) == 16
    assert len({
        key,
        derive_key("bins", {"num_bins": 11, "kernel": "cosine"}, ["f1"]),
        derive_key("bins", {"num_bins": 10, "kernel": "cosine"}, ["f2"]),
        derive_key("subsets", {"num_bins": 10, "kernel": "cosine"}, ["f1"]),
    }) == 4


def _snapshot(store: Store, base: str, values: np.ndarray):
    with store.write_snapshot("datasets", base, {"format": "toy"}) as snapshot:
        write_array(snapshot.group.create_group("train"), "labels", values)
    return snapshot.artifact


def test_snapshots_are_named_by_content_and_the_name_opens_the_latest(store: Store):
    first = _snapshot(store, "toy", np.arange(5))
    again = _snapshot(store, "toy", np.arange(5))
    assert first.name == again.name and first.name.startswith("toy-") and first.fingerprint[:12] in first.name
    second = _snapshot(store, "toy", np.arange(6))
    assert second.name != first.name
    assert store.open("datasets", "toy").name == second.name  # the dataset's name opens its latest snapshot
    assert store.open("datasets", first.name)["train/labels"][:].tolist() == list(range(5))  # old ones stay
    assert store.read_ref("datasets", "toy")["history"] == [first.name, second.name]
    assert _staging(store, "datasets") == []


def test_gc_removes_old_snapshots_and_only_what_depends_on_them(store: Store):
    old = _snapshot(store, "toy", np.arange(5))
    new = _snapshot(store, "toy", np.arange(6))
    old_only = _write(store, "from-old", inputs=[old.fingerprint])
    from_new = _write(store, "from-new", inputs=[new.fingerprint])
    assert store.gc(keep=1, dry_run=True) == [f"datasets/{old.name}", "embeddings/from-old"]
    assert store.exists("datasets", old.name)  # a dry run removes nothing
    assert store.gc(keep=1) == [f"datasets/{old.name}", "embeddings/from-old"]
    assert not store.exists("embeddings", old_only.name) and not store.exists("datasets", old.name)
    assert store.open("embeddings", "from-new").fingerprint == from_new.fingerprint
    assert store.open("datasets", "toy").name == new.name
    assert store.read_ref("datasets", "toy")["history"] == [new.name]
    with pytest.raises(DQInputError, match="at least 1"):
        store.gc(keep=0)


def test_gc_keeps_what_a_kept_artifact_was_made_from(store: Store):
    old = _snapshot(store, "toy", np.arange(5))
    model = _write(store, "model", values=np.ones((2, 2), np.float32), inputs=[old.fingerprint])
    new = _snapshot(store, "toy", np.arange(6))
    _write(store, "from-new", inputs=[new.fingerprint, model.fingerprint])
    sibling = _write(store, "sibling", values=np.zeros((2, 2), np.float32), inputs=[old.fingerprint])
    # The model (made from the old snapshot) is needed by the new chain: it and its snapshot stay;
    # another artifact of the old snapshot that nothing kept needs goes.
    assert store.gc(keep=1) == [f"embeddings/{sibling.name}"]
    assert store.exists("datasets", old.name) and store.exists("embeddings", "model")


def _chunk_path(store: Store, name: str, key: str) -> str:
    return f"{store._root}/embeddings/{name}/features/c/{key}"


def test_a_lost_chunk_is_an_error_naming_the_artifact_never_fill_values(store: Store):
    _write(store, chunk_rows=2)  # 3 chunks of features
    store.fs.rm(_chunk_path(store, "toy", "1/0"))
    with pytest.raises(DQDamagedError, match=r"embeddings/toy is damaged: features: 1 of 3 chunks missing; the next run recomputes it"):
        store.open("embeddings", "toy")
    assert not store.exists("embeddings", "toy")
    (damage,) = store.verify().damaged
    assert (damage.kind, damage.name) == ("embeddings", "toy")


def test_a_corrupted_chunk_fails_to_decode_and_names_its_artifact(store: Store):
    artifact = _write(store, chunk_rows=2)
    path = _chunk_path(store, "toy", "1/0")
    data = bytearray(store.fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    store.fs.pipe_file(path, bytes(data))
    assert store.check("embeddings", "toy").startswith("features: chunk 1/0 does not decode (ValueError: Stored and computed checksum")
    with pytest.raises(DQDamagedError, match=r"embeddings/toy is damaged: features: chunk 1/0 does not decode"):
        with store.reading(lambda: [artifact]):
            artifact["features"][:]
    assert not store.exists("embeddings", "toy")  # damaged derived data is not kept


def test_artifacts_written_before_checksums_still_open_and_verify_says_so(store: Store):
    values = np.arange(12, dtype=np.float32).reshape(6, 2)
    with store.write("embeddings", "old", {}) as group:  # as dq wrote arrays before checksums
        group.create_array("features", shape=values.shape, dtype=values.dtype, chunks=(2, 2),
                           compressors=default_compressor())[...] = values
    record = store.open("embeddings", "old").record
    group = zarr.open_group(open_zarr_store(f"{store.url}/embeddings/old"), mode="r+")
    # Nor did records count chunks or keep a digest version: their content digest streamed every value.
    old = {k: v for k, v in record.items() if k not in ("chunks", "digest_version")}
    group.attrs["dq"] = old | {"content_digest": group_digest(group, version=1)}
    assert group_digest(group, version=1) != record["content_digest"]
    np.testing.assert_array_equal(store.open("embeddings", "old")["features"][:], values)
    result = store.verify(deep=True)
    assert result.damaged == [] and result.without_checksums == ["embeddings/old"]
    store.fs.rm(_chunk_path(store, "old", "1/0"))  # unseen without a chunk record, but not by --deep
    assert store.verify().damaged == []
    (damage,) = store.verify(deep=True).damaged
    assert "no longer matches the digest recorded at commit" in damage.problem


@pytest.mark.parametrize(("lost", "problem"), [
    ("zarr.json", "zarr.json (the group's metadata and record) is missing"),
    ("features/zarr.json", "features/zarr.json (the array's metadata) is missing"),
])
def test_lost_metadata_is_damage_naming_the_artifact(store: Store, lost, problem):
    _write(store)
    store.fs.rm(f"{store._root}/embeddings/toy/{lost}")
    with pytest.raises(DQDamagedError, match=rf"embeddings/toy is damaged: {re.escape(problem)}; the next run recomputes it"):
        store.open("embeddings", "toy")
    (damage,) = store.verify().damaged
    assert damage.problem == problem


@pytest.mark.parametrize("overwritten", ["zarr.json", "features/zarr.json"])
def test_overwritten_metadata_is_damage_naming_the_artifact(store: Store, overwritten):
    _write(store)
    path = f"{store._root}/embeddings/toy/{overwritten}"
    data = bytearray(store.fs.cat_file(path))
    data[len(data) // 2:len(data) // 2 + 12] = bytes(12)
    store.fs.pipe_file(path, bytes(data))
    (damage,) = store.verify().damaged
    assert "zarr.json does not parse" in damage.problem and damage.url.endswith("embeddings/toy")


def test_a_lost_snapshot_record_still_names_the_ingest_of_its_dataset(store: Store):
    with store.write_snapshot("datasets", "fm", {"format": "npz"}, source="/data/fm.npz") as write:
        write_array(write.group.create_group("train"), "labels", np.arange(4))
    store.fs.rm(f"{store._root}/datasets/{write.artifact.name}/zarr.json")
    (damage,) = store.verify().damaged
    assert f"dq ingest --url <source> --name fm --store {store.url}" in damage.repair


def test_the_commit_takes_the_chunk_digests_their_writers_recorded_and_reads_back_the_rest(store: Store):
    """Rows written whole chunks at a time leave each chunk's digest beside it; a chunk written in
    part has none (and loses the one it had), so the commit reads it back. Either way the recorded
    content digest is the one computed from every value read back."""
    values = np.random.default_rng(1).normal(size=(50, 3)).astype(np.float32)
    with store.write("embeddings", "toy", {"k": 1}) as group:
        features = write_array(group, "features", shape=values.shape, dtype=np.float32, chunk_rows=8)
        write_rows(features, 0, values[:24])  # chunks 0-2 whole
        write_rows(features, 24, values[24:30])  # chunk 3 in part
        write_rows(features, 30, values[30:])  # chunk 3's rest, chunks 4-5 whole, chunk 6 (the last, 2 rows) in part
        write_rows(features, 8, values[8:12])  # chunk 1 again, in part: its digest goes
        write_array(group, "ids", np.array([f"s{i}" for i in range(len(values))]), chunk_rows=8)
        left = store.fs.find(f"{store._root}/embeddings/{STAGING}")
        assert sorted(int(f.rsplit("/", 1)[-1]) for f in left if "/features/digests/" in f) == [0, 2, 4, 5]
    artifact = store.open("embeddings", "toy")
    np.testing.assert_array_equal(artifact["features"][:], values)
    assert artifact.record["content_digest"] == group_digest(artifact.group)
    assert artifact.record["digest_version"] == 2 and store.check("embeddings", "toy", deep=True) is None
    # The record keeps every row chunk's digest (what a copy of the chunk carries); the files go.
    assert artifact.chunk_digests("features") == [chunk_digest(values[k:k + 8]) for k in range(0, 50, 8)]
    assert not any("/digests" in f for f in store.fs.find(f"{store._root}/embeddings/toy"))


def test_a_deep_check_names_the_chunk_whose_values_changed(store: Store):
    """Values rewritten through Zarr keep valid checksums: only the content digest sees them,
    and the recorded chunk digests say where."""
    artifact = _write(store, chunk_rows=2)
    group = zarr.open_group(open_zarr_store(artifact.url), mode="r+")
    group["features"][3] = [-1.0, -1.0]  # row 3: row chunk 1
    assert store.check("embeddings", "toy") is None
    assert store.check("embeddings", "toy", deep=True) == (
        "its content no longer matches the digest recorded at commit (first: features: row chunk 1)")


def test_chunks_copied_as_stored_carry_their_digests(store: Store):
    """A chunk copied as its stored bytes takes the digest its source's record holds, or the file
    its writer left beside it in a staging group; one without either is read back at commit."""
    values = np.arange(96, dtype=np.int64).reshape(48, 2)
    source = _write(store, name="source", values=values, chunk_rows=8)
    with store.write("embeddings", "copy", {"k": 1}) as group:
        staged = write_array(group, "staged", values[:16], chunk_rows=8)  # digests left as files
        features = write_array(group, "features", shape=(48, 2), dtype=np.int64, chunk_rows=8)
        known = source.chunk_digests("features")
        copies = [ChunkCopy(source["features"], 0, features, 0, 8, known[0]),  # from the source's record
                  ChunkCopy(staged, 8, features, 8, 8),  # from the staging file beside the chunk
                  ChunkCopy(source["features"], 16, features, 16, 8)]  # none given: the source's own file, here none
        assert copy_chunks(copies) == [True, True, True]
        write_rows(features, 24, values[24:])
        left = store.fs.find(f"{store._root}/embeddings/{STAGING}")
        assert sorted(int(f.rsplit("/", 1)[-1]) for f in left if "/features/digests/" in f) == [0, 1, 3, 4, 5]
    copied = store.open("embeddings", "copy")
    assert copied.chunk_digests("features") == known
    assert copied.record["content_digest"] == group_digest(copied.group)


def test_the_commit_reads_back_without_verifying_and_records_the_verified_digest(store: Store):
    artifact = _write(store, chunk_rows=2)
    assert artifact.record["content_digest"] == group_digest(artifact.group)
    path = _chunk_path(store, "toy", "1/0")  # a chunk's stored checksum changed: values intact
    data = bytearray(store.fs.cat_file(path))
    data[-1] ^= 0xFF
    store.fs.pipe_file(path, bytes(data))
    assert group_digest(store.open("embeddings", "toy").group, verify=False) == artifact.record["content_digest"]
    assert "does not decode" in store.check("embeddings", "toy")  # every other read verifies
