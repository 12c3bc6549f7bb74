"""embed_dataset on a real 2-process LocalCluster: images, gradient mode, resume, text, errors."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr
from distributed import Client

from dq_ops.backbones import load_image_extractor
from dq_ops.cluster import dask_client, resolve_kind
from dq_ops.config import ClusterConfig, EmbeddingConfig
from dq_ops.embed import EmbeddingsStage, embed_dataset
from dq_ops.errors import DQInputError
from dq_ops.features import GradientEmbedding, gradient_embedding
from dq_ops.readers.idx import FASHION_MNIST_CLASSES, load_fashion_mnist
from dq_ops.store import Store, group_digest, write_array
from tests.dask_helpers import Interrupted, wait_until_idle

N_IMAGES = 384
CHUNK_ROWS = 32  # 12 chunks: an interruption after the first leaves most of them to do
FORTUNES = Path("/usr/share/games/fortunes")


@pytest.fixture(scope="module")
def client() -> Client:
    with dask_client(ClusterConfig(kind="local", n_workers=2, threads_per_worker=1)) as client:
        yield client


def _write_dataset(root: Path, modality: str, samples: np.ndarray, labels: np.ndarray, class_names: list[str]) -> Store:
    """A dataset group in the ingest layout (``datasets/<name>/train/...``), chunked unlike the
    embeddings so that tasks read across dataset chunk boundaries."""
    store = Store(str(root))
    with store.write("datasets", "data", {"source": modality}) as group:
        split = group.create_group("train")
        write_array(split, modality, samples, chunk_rows=100)
        write_array(split, "labels", labels, chunk_rows=100)
        write_array(split, "ids", np.array([f"train:{i}" for i in range(len(labels))]), chunk_rows=100)
        group.attrs.update({"modality": modality, "class_names": class_names})
    return store


@pytest.fixture(scope="module")
def fashion() -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_fashion_mnist("train")
    return images[:N_IMAGES, ..., None], labels[:N_IMAGES]


@pytest.fixture(scope="module")
def image_store(tmp_path_factory, fashion) -> Store:
    return _write_dataset(tmp_path_factory.mktemp("images"), "images", *fashion, list(FASHION_MNIST_CLASSES))


@pytest.fixture(scope="module")
def image_run(image_store, client):
    """One uninterrupted run, with its progress calls."""
    calls: list[tuple[int, int]] = []
    result = embed_dataset(
        image_store, "data", "train", EmbeddingConfig(batch_size=16), client,
        seed=0, progress=lambda done, total: calls.append((done, total)), chunk_rows=CHUNK_ROWS,
    )
    return result, calls


def test_images_embed_on_a_local_process_cluster(image_run, fashion):
    result, calls = image_run
    features = result.artifact["features"][:]
    assert features.shape == (N_IMAGES, 1280) and features.dtype == np.float32
    assert list(result.artifact["ids"][:]) == [f"train:{i}" for i in range(N_IMAGES)]
    assert result.rows_computed == N_IMAGES and result.chunks_skipped == 0
    assert result.samples_per_second > 0
    assert calls[0] == (0, 12) and calls[-1] == (12, 12) and [d for d, _ in calls] == list(range(13))
    assert "done" not in result.artifact.group  # completion markers are staging-only
    # The workers compute what the extractor computes in this process.
    local = load_image_extractor(image_size=32)(fashion[0][:CHUNK_ROWS], batch_size=16)
    np.testing.assert_allclose(features[:CHUNK_ROWS], local, rtol=1e-4, atol=1e-5)


def test_a_committed_embedding_is_reused(image_run, image_store, client):
    again = embed_dataset(
        image_store, "data", "train", EmbeddingConfig(batch_size=16), client, seed=5, chunk_rows=CHUNK_ROWS
    )
    assert again.artifact.name == image_run[0].artifact.name  # the seed only matters in gradient mode
    assert again.rows_computed == 0 and again.samples_per_second is None


def test_an_interrupted_run_resumes_bit_for_bit(tmp_path, fashion, image_run, client):
    store = _write_dataset(tmp_path, "images", *fashion, list(FASHION_MNIST_CLASSES))
    config = EmbeddingConfig(batch_size=16)

    def interrupt_after_first_chunk(done: int, total: int) -> None:
        if done >= 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        embed_dataset(
            store, "data", "train", config, client, seed=0, progress=interrupt_after_first_chunk, chunk_rows=CHUNK_ROWS
        )
    wait_until_idle(client)
    key = image_run[0].artifact.name
    assert not store.exists("embeddings", key)
    staging = zarr.open_group(f"{tmp_path}/embeddings/.staging/{key}", mode="r")
    done_before = int(staging["done"][:].sum())
    assert 1 <= done_before < 12

    resumed = embed_dataset(store, "data", "train", config, client, seed=0, chunk_rows=CHUNK_ROWS)
    assert resumed.chunks_skipped == done_before
    assert resumed.rows_computed == N_IMAGES - done_before * CHUNK_ROWS
    uninterrupted = image_run[0].artifact
    assert resumed.artifact.name == key
    assert resumed.artifact.record["content_digest"] == uninterrupted.record["content_digest"]
    assert resumed.artifact["features"][:].tobytes() == uninterrupted["features"][:].tobytes()


def test_gradient_mode_stores_the_factorised_embedding(image_store, image_run, fashion, client):
    result = embed_dataset(
        image_store, "data", "train", EmbeddingConfig(batch_size=16, mode="gradient"), client, seed=7, chunk_rows=96
    )
    # The factorised form bins take (dq_ops.stages.embedding_rows reads it the same way).
    loaded = GradientEmbedding(result.artifact["gradients"][:], result.artifact["features"][:])
    assert loaded.g.shape == (N_IMAGES, 10) and result.artifact.params["seed"] == 7
    # e is the embedding-mode feature; g is one seeded head's gradient across all chunks.
    np.testing.assert_array_equal(loaded.e, image_run[0].artifact["features"][:])
    expected = gradient_embedding(loaded.e, fashion[1], num_classes=10, seed=7).g
    np.testing.assert_allclose(loaded.g, expected, rtol=1e-6, atol=1e-8)


def _fortunes(files: tuple[str, ...], per_file: int) -> tuple[np.ndarray, np.ndarray]:
    texts, labels = [], []
    for label, name in enumerate(files):
        entries = (FORTUNES / name).read_text(encoding="utf-8", errors="replace").split("\n%\n")
        chosen = [e.strip() for e in entries if e.strip()][:per_file]
        texts += chosen
        labels += [label] * len(chosen)
    return np.array(texts), np.array(labels, dtype=np.int64)


def test_text_records_embed_to_unit_384d_vectors(tmp_path, client):
    files = ("computers", "science", "food")
    texts, labels = _fortunes(files, per_file=16)
    store = _write_dataset(tmp_path, "texts", texts, labels, list(files))
    result = embed_dataset(store, "data", "train", EmbeddingConfig(batch_size=16), client, seed=0)
    features = result.artifact["features"][:]
    assert features.shape == (48, 384) and features.dtype == np.float32
    assert result.chunks_skipped == 0 and result.rows_computed == 48  # one default-sized chunk
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    assert result.artifact.params["text_model"] == "all-MiniLM-L6-v2"


def test_bad_backbones_and_weights_fail_with_clear_errors(image_store, tmp_path, client):
    def run(**config):
        return embed_dataset(
            image_store, "data", "train", EmbeddingConfig(**config), client, seed=0, chunk_rows=CHUNK_ROWS
        )

    with pytest.raises(DQInputError, match="unknown backbone 'resnet9000'; known: efficientnet-lite0"):
        run(backbone="resnet9000")
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(DQInputError, match=f"{missing}: weights file not found"):
        run(backbone="timm:test_resnet", weights=str(missing))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 truncated zip")
    # Found by the workers when they load the model: the error travels back unchanged.
    with pytest.raises(DQInputError, match=f"{corrupt}: not a readable weights file"):
        run(backbone="timm:test_resnet", weights=str(corrupt))
    with pytest.raises(DQInputError, match="no split 'validation'; splits: train"):
        embed_dataset(image_store, "data", "validation", EmbeddingConfig(), client, seed=0)


def test_cluster_kind_resolution(monkeypatch, client):
    import dq_ops.cluster as cluster

    monkeypatch.setattr(cluster, "_visible_gpus", lambda: 0)
    assert resolve_kind(ClusterConfig(kind="auto")) == "local"
    monkeypatch.setattr(cluster, "_visible_gpus", lambda: 2)
    assert resolve_kind(ClusterConfig(kind="auto")) == "local-cuda"
    # An existing scheduler: the client connects, and leaves the cluster running on exit.
    with dask_client(ClusterConfig(kind="address", address=client.scheduler.address)) as remote:
        assert remote.submit(sum, [1, 2]).result() == 3
    assert client.submit(sum, [3, 4]).result() == 7


@pytest.mark.skipif(importlib.util.find_spec("dask_cuda") is not None, reason="dask-cuda is installed")
def test_local_cuda_without_dask_cuda_names_the_extra():
    with pytest.raises(DQInputError, match=r"dq\[gpu\]"), dask_client(ClusterConfig(kind="local-cuda")):
        pass


def test_a_refresh_that_only_removes_samples_copies_rows_without_importing_torch(image_run, image_store, tmp_path):
    # Every row of the smaller snapshot is in the committed embeddings: the stage copies them in
    # a fresh process that never imports the model library.
    source = image_store.open("datasets", "data")["train"]
    keep = np.arange(0, N_IMAGES, 3)
    with image_store.write("datasets", "data-fewer", {"source": "images"}) as group:
        split = group.create_group("train")
        for name in ("images", "labels", "ids"):
            write_array(split, name, source[name].get_orthogonal_selection((keep,)), chunk_rows=100)
        group.attrs.update(image_store.open("datasets", "data").group.attrs.asdict())
    script = textwrap.dedent(f"""
        import json, sys
        from dq_ops.config import EmbeddingConfig
        from dq_ops.embed import EmbeddingsStage
        from dq_ops.store import Store
        store = Store({str(image_store.url)!r})
        stage = EmbeddingsStage(store, store.open("datasets", "data-fewer"), "train", EmbeddingConfig(chunk_rows=64),
                                seed=0, precision="float32")
        artifact = stage.run()
        print(json.dumps({{"torch": "torch" in sys.modules, "embedded": stage.work_done, "copied": stage.chunks_copied,
                          "name": artifact.name}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[1],
                          env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report == {"torch": False, "embedded": 0, "copied": 0, "name": report["name"]}  # rows moved: decoded, copied
    copied = np.asarray(image_store.open("embeddings", report["name"])["features"][:])
    np.testing.assert_array_equal(copied, np.asarray(image_run[0].artifact["features"][:])[keep])


def test_chunks_that_line_up_with_the_earlier_embeddings_are_copied_as_stored(image_run, image_store):
    # The refreshed snapshot lost the first chunk's samples and gained 40: each of its chunks
    # before the new rows is, in order, a whole chunk of the committed embeddings (the next
    # one), so its stored bytes are copied (checksum verified, nothing decoded or encoded).
    images, labels = load_fashion_mnist("train")
    rows = np.arange(CHUNK_ROWS, N_IMAGES + 40)
    with image_store.write("datasets", "data-shifted", {"source": "images"}) as group:
        split = group.create_group("train")
        write_array(split, "images", images[rows, ..., None], chunk_rows=100)
        write_array(split, "labels", labels[rows], chunk_rows=100)
        write_array(split, "ids", np.array([f"train:{i}" for i in rows]), chunk_rows=100)
        group.attrs.update(image_store.open("datasets", "data").group.attrs.asdict())
    stage = EmbeddingsStage(image_store, image_store.open("datasets", "data-shifted"), "train",
                            EmbeddingConfig(batch_size=16), seed=0, precision="float32", chunk_rows=CHUNK_ROWS)
    refreshed = stage.run()
    kept = N_IMAGES - CHUNK_ROWS
    assert (stage.chunks_copied, stage.work_done) == (kept // CHUNK_ROWS, 40)
    np.testing.assert_array_equal(refreshed["features"][:kept], image_run[0].artifact["features"][CHUNK_ROWS:])
    local = load_image_extractor(image_size=32)(images[N_IMAGES:N_IMAGES + 40, ..., None], batch_size=16)
    np.testing.assert_allclose(refreshed["features"][kept:], local, rtol=1e-4, atol=1e-5)
    # The copies carried the committed chunks' digests: the commit's digest is that of every value read back.
    assert refreshed.record["content_digest"] == group_digest(refreshed.group)
