"""Parquet and WebDataset shards: real shard files written here with pyarrow and tarfile from real
Fashion-MNIST images, ingested through the real ``dq`` CLI and the library, exported and read
back (same pixels, labels and ids), and broken in the ways real shards break."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from zarr.errors import ZarrUserWarning

from dq_ops.config import DatasetConfig
from dq_ops.errors import DQInputError
from dq_ops.export import export_subset
from dq_ops.ingest import ingest, snapshot_summary
from dq_ops.readers.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR
from dq_ops.store import Store, write_array
from tests.cli_helpers import cli_env, dq, free_port, tree_digest

N = 60  # samples used from the Fashion-MNIST test split


@pytest.fixture(scope="module")
def fm() -> tuple[np.ndarray, np.ndarray]:
    """The first N real Fashion-MNIST test images (N, 28, 28) and labels, parsed independently of dq_ops."""
    with gzip.open(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz") as fh:
        images = np.frombuffer(fh.read(), dtype=np.uint8, offset=16)[: N * 784].reshape(N, 28, 28)
    with gzip.open(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), dtype=np.uint8, offset=8)[:N].astype(np.int64)
    return images, labels


def _encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def _lossless_webp(image: np.ndarray) -> bytes:
    """WebP has no gray mode: Pillow stores a gray image as RGB with equal channels."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="WEBP", lossless=True)
    return buffer.getvalue()


def _sha12(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:12]


def _hf_parquet(path: Path, images: np.ndarray, labels: list[int | None], *, encoded: list[bytes] | None = None,
                compression: str = "snappy") -> None:
    """A shard as Hugging Face ``datasets`` writes one: ``image`` {bytes, path}, ``label`` (ClassLabel)."""
    data = encoded if encoded is not None else [_encode(image) for image in images]
    table = pa.table({
        "image": pa.array([{"bytes": b, "path": f"{k:05d}.png"} for k, b in enumerate(data)],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "label": pa.array(labels, pa.int64()),
    })
    features = {"image": {"_type": "Image"}, "label": {"names": list(FASHION_MNIST_CLASSES), "_type": "ClassLabel"}}
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=8, compression=compression)  # several row groups per shard


def _tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A WebDataset shard: each sample's members ``<key>.<ext>`` one after another."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _cls_samples(images: np.ndarray, labels: np.ndarray, start: int = 0) -> list[tuple[str, dict[str, bytes]]]:
    return [(f"{start + k:06d}", {"png": _encode(image), "cls": str(int(label)).encode()})
            for k, (image, label) in enumerate(zip(images, labels))]


def _stored(store: Path, name: str) -> tuple[Store, dict[str, dict[str, np.ndarray]]]:
    dataset = Store(str(store)).open("datasets", name)
    splits = {split: {key: dataset[f"{split}/{key}"][:] for key in ("images", "labels", "ids")}
              for split in ("train", "test") if split in dataset.group}
    return dataset, splits


# -- Parquet ------------------------------------------------------------------------------------
def test_cli_ingests_a_hugging_face_parquet_folder_as_it_is(tmp_path, fm):
    images, labels = fm
    source = tmp_path / "hub" / "data"
    _hf_parquet(source / "train-00000-of-00002.parquet", images[:20], labels[:20].tolist())
    _hf_parquet(source / "train-00001-of-00002.parquet", images[20:45], labels[20:45].tolist())
    _hf_parquet(source / "test-00000-of-00001.parquet", images[45:], labels[45:].tolist())
    (tmp_path / "hub" / "README.md").write_text("a dataset card, not a shard\n")

    done = dq("ingest", "--format", "parquet", "--url", str(tmp_path / "hub"), "--name", "fm-pq",
              "--store", str(tmp_path / "store"), env=cli_env(tmp_path), cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "45 samples" in done.stdout and "15 samples" in done.stdout
    dataset, splits = _stored(tmp_path / "store", "fm-pq")
    assert dataset.group.attrs["class_names"] == list(FASHION_MNIST_CLASSES)
    assert dataset.group.attrs["source_format"] == "parquet"
    np.testing.assert_array_equal(splits["train"]["images"][..., 0], images[:45])
    np.testing.assert_array_equal(splits["test"]["images"][..., 0], images[45:])
    np.testing.assert_array_equal(splits["train"]["labels"], labels[:45])
    np.testing.assert_array_equal(splits["test"]["labels"], labels[45:])
    assert splits["train"]["ids"][21] == f"data/train-00001-of-00002.parquet:1:{_sha12(images[21][..., None])}"
    assert splits["test"]["ids"][0] == f"data/test-00000-of-00001.parquet:0:{_sha12(images[45][..., None])}"


def test_parquet_split_folders_glob_binary_columns_rgb_and_resize(tmp_path, fm):
    images, labels = fm
    rgb = np.stack([images, 255 - images, images // 2], axis=-1)  # real pixels in three different channels
    for split, rows in (("train", slice(0, 40)), ("test", slice(40, N))):
        table = pa.table({"img": pa.array([_encode(image) for image in rgb[rows]], pa.binary()),
                          "y": pa.array(labels[rows], pa.int16())})
        (tmp_path / "src" / split).mkdir(parents=True)
        pq.write_table(table, tmp_path / "src" / split / "part-0.parquet", row_group_size=16)
    config = DatasetConfig(format="parquet", url=str(tmp_path / "src" / "*" / "part-*.parquet"), name="rgb",
                           image_field="img", label_field="y")
    result = ingest(config, Store(str(tmp_path / "store")))
    assert result.counts == {"train": 40, "test": 20} and result.class_names is None
    _, splits = _stored(tmp_path / "store", "rgb")
    np.testing.assert_array_equal(splits["train"]["images"], rgb[:40])
    np.testing.assert_array_equal(splits["test"]["labels"], labels[40:])
    assert splits["test"]["ids"][3] == f"test/part-0.parquet:3:{_sha12(rgb[43])}"

    resized = ingest(config.model_copy(update={"resize": 16, "name": "rgb16", "limit": 10}), Store(str(tmp_path / "store")))
    assert resized.counts == {"train": 10, "test": 10}
    _, small = _stored(tmp_path / "store", "rgb16")
    expected = np.asarray(Image.fromarray(rgb[0]).resize((16, 16), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(small["train"]["images"][0], expected)


def test_parquet_without_labels_and_with_skipped_rows(tmp_path, fm):
    images, labels = fm
    encoded = [_encode(image) for image in images[:12]]
    encoded[5] = b"not an image"
    rows = labels[:12].tolist()
    rows[7] = None
    _hf_parquet(tmp_path / "train-00000-of-00001.parquet", images[:12], rows, encoded=encoded)
    store = Store(str(tmp_path / "store"))
    result = ingest(DatasetConfig(format="parquet", url=str(tmp_path), name="skip", on_error="skip"), store)
    assert result.counts == {"train": 10}
    assert [(item.name.rsplit("/", 1)[-1], item.reason.split(" ")[0]) for item in result.skipped] == [
        ("train-00000-of-00001.parquet:5", "corrupt"), ("train-00000-of-00001.parquet:7", "missing")]
    kept = [k for k in range(12) if k not in (5, 7)]
    np.testing.assert_array_equal(store.open("datasets", "skip")["train/labels"][:], labels[kept])

    unlabelled = ingest(DatasetConfig(format="parquet", url=str(tmp_path), name="nolabel", label_field=None, on_error="skip"), store)
    assert unlabelled.counts == {"train": 11}
    assert set(store.open("datasets", "nolabel")["train/labels"][:]) == {-1}


# -- WebDataset ---------------------------------------------------------------------------------
def test_cli_ingests_webdataset_shards_with_cls_json_and_jpeg(tmp_path, fm):
    images, labels = fm
    source = tmp_path / "wds"
    _tar(source / "train-000000.tar", _cls_samples(images[:20], labels[:20]))
    # keys restart in the next shard; labels from <key>.json; the shard's first sample is a JPEG
    json_samples = [(f"{k:06d}", {"png": _encode(image), "json": json.dumps({"label": int(label), "caption": "x"}).encode()})
                    for k, (image, label) in enumerate(zip(images[20:40], labels[20:40]))]
    jpeg = _encode(images[20], "JPEG")
    json_samples[0] = ("000000", {"jpg": jpeg, "json": json_samples[0][1]["json"]})
    _tar(source / "train-000001.tar", json_samples)
    _tar(source / "test-000000.tar", _cls_samples(images[40:], labels[40:]))

    done = dq("ingest", "--format", "webdataset", "--url", str(source), "--name", "fm-wds",
              "--store", str(tmp_path / "store"), env=cli_env(tmp_path), cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr
    _, splits = _stored(tmp_path / "store", "fm-wds")
    train = splits["train"]
    np.testing.assert_array_equal(train["labels"], labels[:40])
    np.testing.assert_array_equal(splits["test"]["labels"], labels[40:])
    np.testing.assert_array_equal(np.delete(train["images"][..., 0], 20, axis=0), np.delete(images[:40], 20, axis=0))
    np.testing.assert_array_equal(train["images"][20, ..., 0], np.asarray(Image.open(io.BytesIO(jpeg))))
    np.testing.assert_array_equal(splits["test"]["images"][..., 0], images[40:])
    assert train["ids"][3] == f"train-000000.tar:000003:{_sha12(images[3][..., None])}"
    assert train["ids"][23] == f"train-000001.tar:000003:{_sha12(images[23][..., None])}"
    assert len(set(train["ids"])) == 40


def test_webdataset_split_folders_json_label_field_and_limit(tmp_path, fm):
    images, labels = fm
    for split, rows in (("train", range(0, 30)), ("test", range(30, N))):
        _tar(tmp_path / "src" / split / "shard-0.tar",
             [(f"s{k}", {"webp": _lossless_webp(images[k]) if k == 1 else _encode(images[k]),
                         "json": json.dumps({"class_id": int(labels[k])}).encode()}) for k in rows])
    store = Store(str(tmp_path / "store"))
    result = ingest(DatasetConfig(format="webdataset", url=str(tmp_path / "src"), name="w", label_field="class_id", limit=25), store)
    assert result.counts == {"train": 25, "test": 25}
    stored = store.open("datasets", "w")
    np.testing.assert_array_equal(stored["test/labels"][:], labels[30:55])
    np.testing.assert_array_equal(stored["test/images"][:, ..., 0], images[30:55])
    np.testing.assert_array_equal(stored["train/images"][:, ..., 0], images[:25])  # s1 a WebP, stored gray
    assert stored["test/ids"][0] == f"test/shard-0.tar:s30:{_sha12(images[30][..., None])}"


# -- export and back ----------------------------------------------------------------------------
def _subset(store: Store, dataset: str, rows: np.ndarray) -> str:
    """A subset artifact of the given train rows, written as the subset stages write one."""
    snapshot = store.open("datasets", dataset)
    split = snapshot["train"]
    with store.write("subsets", "picked", {"method": "rows", "dataset": snapshot.name}) as group:
        write_array(group, "indices", rows)
        write_array(group, "ids", np.asarray(split["ids"].get_orthogonal_selection((rows,))))
        write_array(group, "labels", np.asarray(split["labels"].get_orthogonal_selection((rows,))))
        group.attrs.update({"size": len(rows), "dataset": snapshot.name})
    return "picked"


@pytest.mark.parametrize(("fmt", "shards"), [
    ("parquet", [f"train-0000{k}-of-00004.parquet" for k in range(4)]),
    ("webdataset", [f"train-00000{k}.tar" for k in range(4)]),
])
def test_export_as_shards_and_ingest_back_keeps_pixels_labels_and_ids(tmp_path, fm, fmt, shards):
    images, labels = fm
    _hf_parquet(tmp_path / "src" / "train-00000-of-00001.parquet", images, labels.tolist())
    store_path = tmp_path / "store"
    ingest(DatasetConfig(format="parquet", url=str(tmp_path / "src"), name="fm"), Store(str(store_path)))
    rows = np.arange(1, N, 2)  # 30 samples
    subset = _subset(Store(str(store_path)), "fm", rows)
    original = Store(str(store_path)).open("datasets", "fm")["train"]
    env = cli_env(tmp_path)

    out = tmp_path / "out"
    done = dq("export", subset, str(out), "--format", fmt, "--shard-size", "8", "--store", str(store_path), env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([*shards, "manifest.jsonl"])
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["row"] for m in manifest] == rows.tolist()
    assert [m["file"] for m in manifest] == [shards[k // 8] for k in range(30)]

    done = dq("ingest", "--format", fmt, "--url", str(out), "--name", "back", "--store", str(store_path), env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    back = Store(str(store_path)).open("datasets", "back")
    np.testing.assert_array_equal(back["train/images"][:], original["images"].get_orthogonal_selection((rows,)))
    np.testing.assert_array_equal(back["train/labels"][:], labels[rows])
    np.testing.assert_array_equal(back["train/ids"][:], original["ids"].get_orthogonal_selection((rows,)))
    assert [m["id"] for m in manifest] == back["train/ids"][:].tolist()
    assert back.group.attrs["class_names"] == (list(FASHION_MNIST_CLASSES) if fmt == "parquet" else None)

    # Shards are written on threads; pixels handed in by the caller are written one shard at a
    # time: the same files either way.
    one_by_one = tmp_path / "one-by-one"
    export_subset(Store(str(store_path)), subset, str(one_by_one), fmt, shard_size=8,
                  images=lambda picked: np.asarray(original["images"].get_orthogonal_selection((picked,))))
    for name in [*shards, "manifest.jsonl"]:
        assert (one_by_one / name).read_bytes() == (out / name).read_bytes(), name


# -- bad input ----------------------------------------------------------------------------------
def _corrupt_parquet(root: Path, fm) -> None:
    encoded = [_encode(image) for image in fm[0][:10]]
    encoded[3] = encoded[3][: len(encoded[3]) // 2]  # a truncated PNG: its header still reads
    _hf_parquet(root / "train-00000-of-00001.parquet", fm[0][:10], fm[1][:10].tolist(), encoded=encoded)


def _null_label_parquet(root: Path, fm) -> None:
    _hf_parquet(root / "train-00000-of-00001.parquet", fm[0][:10], [*fm[1][:6].tolist(), None, *fm[1][7:10].tolist()])


def _no_label_column(root: Path, fm) -> None:
    _hf_parquet(root / "train-00000-of-00001.parquet", fm[0][:5], fm[1][:5].tolist())
    pq.write_table(pa.table({"image": pa.array([_encode(image) for image in fm[0][5:10]])}), root / "train-00001-of-00002.parquet")


def _not_parquet(root: Path, fm) -> None:
    _hf_parquet(root / "train-00000-of-00002.parquet", fm[0][:5], fm[1][:5].tolist())
    (root / "train-00001-of-00002.parquet").write_bytes(b"PAR1 but not really")


def _corrupt_tar_image(root: Path, fm) -> None:
    samples = _cls_samples(fm[0][:10], fm[1][:10])
    samples[4][1]["png"] = b"garbage"
    _tar(root / "train-000000.tar", samples)


def _tar_without_label(root: Path, fm) -> None:
    samples = _cls_samples(fm[0][:10], fm[1][:10])
    samples[6] = (samples[6][0], {"png": samples[6][1]["png"], "json": b'{"caption": "no label here"}'})
    _tar(root / "train-000000.tar", samples)


def _tar_bad_cls(root: Path, fm) -> None:
    samples = _cls_samples(fm[0][:10], fm[1][:10])
    samples[2][1]["cls"] = b"sandal"
    _tar(root / "train-000000.tar", samples)


def _truncated_tar(root: Path, fm) -> None:
    _tar(root / "train-000000.tar", _cls_samples(fm[0][:10], fm[1][:10]))
    data = (root / "train-000000.tar").read_bytes()
    (root / "train-000000.tar").write_bytes(data[: len(data) // 2])


BAD = [
    ("parquet", _corrupt_parquet, "train-00000-of-00001.parquet:3: corrupt image"),
    ("parquet", _null_label_parquet, "train-00000-of-00001.parquet:6: missing label (null in column 'label')"),
    ("parquet", _no_label_column, "train-00001-of-00002.parquet: no label column 'label' (columns: image)"),
    ("parquet", _not_parquet, "train-00001-of-00002.parquet: not a readable Parquet file"),
    ("webdataset", _corrupt_tar_image, "train-000000.tar:000004: corrupt image"),
    ("webdataset", _tar_without_label, "train-000000.tar:000006: missing label: no 000006.cls and no 'label' field in 000006.json"),
    ("webdataset", _tar_bad_cls, "train-000000.tar:000002: 000002.cls holds 'sandal', expected an integer label"),
    ("webdataset", _truncated_tar, "train-000000.tar: damaged tar file"),
]


@pytest.mark.parametrize(("fmt", "make", "culprit"), BAD, ids=[case[1].__name__.strip("_") for case in BAD])
def test_bad_shards_exit_2_naming_shard_and_sample_with_the_store_unchanged(tmp_path, fm, fmt, make, culprit):
    env = cli_env(tmp_path)
    store = tmp_path / "store"
    good = tmp_path / "good"
    _hf_parquet(good / "train-00000-of-00001.parquet", fm[0][:10], fm[1][:10].tolist())
    assert dq("ingest", "--format", "parquet", "--url", str(good), "--name", "d", "--store", str(store),
              env=env, cwd=tmp_path).returncode == 0
    before = tree_digest(store)
    bad = tmp_path / "bad"
    bad.mkdir()
    make(bad, fm)

    done = dq("ingest", "--format", fmt, "--url", str(bad), "--name", "d", "--store", str(store), env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.last_line.startswith(f"error: {bad}/{culprit}"), done.last_line
    assert "Traceback" not in done.stdout + done.stderr
    assert tree_digest(store) == before


def test_mixed_sizes_and_modes_are_refused_naming_the_sample(tmp_path, fm):
    images, labels = fm
    big = np.asarray(Image.fromarray(images[3]).resize((32, 32)))
    _tar(tmp_path / "sizes" / "train-000000.tar",
         [*_cls_samples(images[:3], labels[:3]), ("000003", {"png": _encode(big), "cls": b"1"})])
    with pytest.raises(DQInputError, match=r"sizes/train-000000\.tar:000003: image is 32x32 \(WxH\) but the first image is 28x28"):
        ingest(DatasetConfig(format="webdataset", url=str(tmp_path / "sizes")), Store(str(tmp_path / "store")))
    assert ingest(DatasetConfig(format="webdataset", url=str(tmp_path / "sizes"), resize=28),
                  Store(str(tmp_path / "store"))).counts == {"train": 4}

    colour = np.stack([images[2], 255 - images[2], images[2] // 2], axis=-1)
    _tar(tmp_path / "modes" / "train-000000.tar",
         [*_cls_samples(images[:2], labels[:2]), ("000002", {"png": _encode(colour), "cls": b"1"})])
    with pytest.raises(DQInputError, match=r"modes/train-000000\.tar:000002: a RGB image in a dataset whose first image is grayscale"):
        ingest(DatasetConfig(format="webdataset", url=str(tmp_path / "modes")), Store(str(tmp_path / "store")))


def test_sources_without_shards_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no shards here")
    for fmt, kind in (("parquet", "Parquet"), ("webdataset", "WebDataset")):
        with pytest.raises(DQInputError, match=rf"empty: no {kind} shards"):
            ingest(DatasetConfig(format=fmt, url=str(tmp_path / "empty")), Store(str(tmp_path / "store")))
    with pytest.raises(DQInputError, match="nowhere: not found"):
        ingest(DatasetConfig(format="parquet", url=str(tmp_path / "nowhere")), Store(str(tmp_path / "store")))


# -- object storage -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free port (in this process): ``(env for the CLI, s3fs filesystem)``."""
    import s3fs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    settings = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "dq-test",
                "AWS_SECRET_ACCESS_KEY": "dq-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    fs = s3fs.S3FileSystem(endpoint_url=settings["AWS_ENDPOINT_URL"], key=settings["AWS_ACCESS_KEY_ID"],
                           secret=settings["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)
    fs.mkdir("shards")
    yield settings, fs
    server.stop()


def test_shards_on_s3_ingest_export_and_ingest_back(tmp_path, fm, s3):
    images, labels = fm
    settings, fs = s3
    env = cli_env(tmp_path, **settings)
    _hf_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet", images[:40], labels[:40].tolist())
    _hf_parquet(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet", images[40:], labels[40:].tolist())
    fs.put(str(tmp_path / "hub"), "shards/hub", recursive=True)
    store = str(tmp_path / "store")

    done = dq("ingest", "--format", "parquet", "--url", "s3://shards/hub", "--name", "fm", "--store", store, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    _, splits = _stored(tmp_path / "store", "fm")
    np.testing.assert_array_equal(splits["train"]["images"][..., 0], images[:40])
    np.testing.assert_array_equal(splits["test"]["labels"], labels[40:])
    assert splits["train"]["ids"][0] == f"data/train-00000-of-00001.parquet:0:{_sha12(images[0][..., None])}"

    rows = np.arange(0, 40, 3)
    subset = _subset(Store(store), "fm", rows)
    done = dq("export", subset, "s3://shards/out", "--format", "webdataset", "--shard-size", "5", "--store", store, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "manifest s3://shards/out/manifest.jsonl" in done.stdout
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("shards/out")) == [
        "manifest.jsonl", "train-000000.tar", "train-000001.tar", "train-000002.tar"]

    done = dq("ingest", "--format", "webdataset", "--url", "s3://shards/out/train-*.tar", "--name", "back", "--store", store,
              env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    _, back = _stored(tmp_path / "store", "back")
    np.testing.assert_array_equal(back["train"]["images"][..., 0], images[rows])
    np.testing.assert_array_equal(back["train"]["labels"], labels[rows])
    np.testing.assert_array_equal(back["train"]["ids"], splits["train"]["ids"][rows])


def test_an_export_to_a_bucket_root_is_written_inside_it_and_replaced_whole(tmp_path, fm, s3):
    """Nothing is beside a bucket: the unfinished export lies inside it, and an overwrite
    replaces the previous export without touching the new one."""
    import os

    images, labels = fm
    settings, fs = s3
    fs.mkdir("rootexports")
    _hf_parquet(tmp_path / "src" / "train-00000-of-00001.parquet", images, labels.tolist())
    store = Store(str(tmp_path / "store"))
    ingest(DatasetConfig(format="parquet", url=str(tmp_path / "src"), name="fm"), store)
    subset = _subset(store, "fm", np.arange(0, N, 3))  # 20 samples
    buckets = set(fs.ls(""))
    seen: list[set[str]] = []

    def look(done: int, total: int) -> None:  # while the export is written: no bucket made for it
        fs.invalidate_cache()
        seen.append(set(fs.ls("")) - buckets)

    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        export_subset(store, subset, "s3://rootexports", "webdataset", shard_size=8, progress=look)
        assert seen and not any(seen)
        fs.invalidate_cache()
        assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("rootexports")) == [
            "manifest.jsonl", "train-000000.tar", "train-000001.tar", "train-000002.tar"]
        export_subset(store, subset, "s3://rootexports", "parquet", shard_size=10, overwrite=True)
        fs.invalidate_cache()
        assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("rootexports")) == [
            "manifest.jsonl", "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    assert len(fs.cat("rootexports/manifest.jsonl").decode().splitlines()) == 20


def test_the_ingest_cache_key_sees_shards_added_to_a_glob(tmp_path, fm):
    from dq_ops.ingest import source_signature

    _tar(tmp_path / "train-000000.tar", _cls_samples(fm[0][:5], fm[1][:5]))
    pattern = str(tmp_path / "train-*.tar")
    first = source_signature(pattern)
    (tmp_path / "notes.txt").write_text("not matched by the glob")
    assert source_signature(pattern) == first
    _tar(tmp_path / "train-000001.tar", _cls_samples(fm[0][5:10], fm[1][5:10], start=5))
    assert source_signature(pattern) != first


# -- spread over dask workers -------------------------------------------------------------------
def _artifact_files(artifact) -> dict[str, bytes]:
    """Every file of an artifact below its root but its ``zarr.json`` (which names the snapshot)
    and the sidecar saying where its shards' rows lie (not content: only a spread read has one)."""
    from dq_ops.ingest import PARTS_SIDECAR

    root = Path(artifact.url)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p not in (root / "zarr.json", root / PARTS_SIDECAR)}


@pytest.mark.parametrize("fmt", ["parquet", "webdataset", "image-folder"])
def test_an_ingest_spread_over_dask_workers_writes_the_single_process_snapshot(tmp_path, fm, fmt, monkeypatch):
    """Shards (an image folder: parts of its sorted files) decoded on two worker processes, with a
    bad sample, a limit that falls inside a part and a hold-out: the same snapshot, byte for
    byte, as one process writes."""
    from distributed import Client, LocalCluster

    from dq_ops.readers import image_folder

    images, labels = fm
    source = tmp_path / "src"
    monkeypatch.setattr(image_folder, "PART_FILES", 12)  # five parts of the 60 files, as five shards
    for k in range(5):  # 5 shards of 12; shards 2 and 4 hold an undecodable image
        rows = range(12 * k, 12 * k + 12)
        encoded = [_encode(images[r]) for r in rows]
        if k in (2, 4):
            encoded[4] = b"not an image"
        if fmt == "image-folder":  # one class folder, files in row order: parts are the shards' rows
            (source / "all").mkdir(parents=True, exist_ok=True)
            for r, data in zip(rows, encoded):
                (source / "all" / f"{r:06d}.png").write_bytes(data)
        elif fmt == "parquet":
            _hf_parquet(source / f"train-{k:05d}-of-00005.parquet", images[list(rows)], labels[list(rows)].tolist(),
                        encoded=encoded)
        else:
            _tar(source / f"train-{k:06d}.tar", [(f"{r:06d}", {"png": e, "cls": str(int(labels[r])).encode()})
                                                   for r, e in zip(rows, encoded)])
    settings = [
        {"on_error": "skip"},
        {"on_error": "skip", "limit": 31},  # shards 0-1 whole, the limit falls inside shard 2
        {"on_error": "skip", "test_fraction": 0.25},
    ]
    started: list[bool] = []
    ticks: list[tuple[int, int]] = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            cluster.get_client() as client:

        def start() -> Client:  # a cluster started on demand: a source this small never starts one
            started.append(True)
            return client

        for number, extra in enumerate(settings):
            config = DatasetConfig(format=fmt, url=str(source), name=f"d{number}", **extra)
            alone = ingest(config, Store(str(tmp_path / f"alone{number}")))
            assert ingest(config, Store(str(tmp_path / f"lazy{number}")), client=start).fingerprint == alone.fingerprint
            assert not started
            ticks.clear()
            spread = ingest(config, Store(str(tmp_path / f"spread{number}")), client=client,
                            progress=lambda done, total: ticks.append((done, total)))
            assert (spread.fingerprint, spread.counts) == (alone.fingerprint, alone.counts)
            assert [str(item) for item in spread.skipped] == [str(item) for item in alone.skipped]
            stored = {p: Store(str(tmp_path / f"{p}{number}")).open("datasets", f"d{number}") for p in ("alone", "spread")}
            assert _artifact_files(stored["spread"]) == _artifact_files(stored["alone"])
            assert not any(path.startswith("parts") for split in alone.counts for path in _artifact_files(stored["spread"]))
            assert ticks[-1][0] == sum(spread.counts.values())
        assert alone.counts["train"] + alone.counts["test"] == 58
        limited = Store(str(tmp_path / "spread1")).open("datasets", "d1")
        if fmt != "image-folder":  # its labels are its one folder's
            np.testing.assert_array_equal(limited["train/labels"][:], np.delete(labels[:32], 28))

        # under on_error="raise" the error names the first bad sample in read order (shard 2's, not 4's)
        with pytest.raises(DQInputError, match=r"(train-0+2[-.].*:(4|000028)|all/000028\.png)\b"):
            ingest(DatasetConfig(format=fmt, url=str(source), name="raise"), Store(str(tmp_path / "raise")), client=client)
        assert Store(str(tmp_path / "raise")).list("datasets") == []


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_a_refresh_decodes_only_the_shards_that_changed(tmp_path, fm, fmt, caplog):
    """Five shards (one with a bad image, skipped) with a hold-out, then shard 1 rewritten without
    a row and shard 5 added. In the unchanged shards every image's bytes are then overwritten in
    place with garbage, their sizes and modification times kept: decoding them would skip every
    row, so the refresh must take their rows from the earlier snapshot, and what it writes is,
    file for file, a fresh ingest of the real shards. With a chunk of that snapshot damaged, the
    next read decodes every shard again."""
    import os
    import shutil

    from distributed import LocalCluster

    images, labels = fm
    source, real = tmp_path / "src", tmp_path / "real"

    def shard(k: int, rows: list[int]) -> tuple[Path, list[bytes]]:
        encoded = [b"not an image" if (k, r) == (3, 34) else _encode(images[r]) for r in rows]
        if fmt == "parquet":  # uncompressed: each image's bytes lie as they are in the file
            path = source / f"train-{k:05d}.parquet"
            _hf_parquet(path, images[rows], labels[rows].tolist(), encoded=encoded, compression="none")
        else:
            path = source / f"train-{k:06d}.tar"
            _tar(path, [(f"{r:06d}", {"png": e, "cls": str(int(labels[r])).encode()}) for r, e in zip(rows, encoded)])
        return path, encoded

    def garble(path: Path, encoded: list[bytes]) -> None:
        stat, data = path.stat(), path.read_bytes()
        for image in encoded:
            at = data.index(image)
            data = data[:at] + bytes(len(image)) + data[at + len(image):]
        path.write_bytes(data)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    shards = [shard(k, list(range(10 * k, 10 * k + 10))) for k in range(5)]
    config = DatasetConfig(format=fmt, url=str(source), name="d", on_error="skip", test_fraction=0.25)
    store = Store(str(tmp_path / "store"))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            cluster.get_client() as client:
        first = ingest(config, store, client=client)
        assert {item.name.rsplit("/", 1)[-1] for item in first.skipped} == {f"{shards[3][0].name}:{4 if fmt == 'parquet' else '000034'}"}
        shard(1, [10, 11, 13, 14, 15, 16, 17, 18, 19])
        shard(5, list(range(50, 60)))
        shutil.copytree(source, real)  # the refreshed source as it really is
        for k in (0, 2, 3, 4):
            garble(*shards[k])
        ticks: list[int] = []
        with warnings.catch_warnings():  # the sidecar beside the splits is no stray file to Zarr
            warnings.simplefilter("error", ZarrUserWarning)
            refresh = ingest(config, store, client=client, progress=lambda done, total: ticks.append(done))
            assert snapshot_summary(store.open("datasets", refresh.name))["counts"] == refresh.counts
        fresh_store = Store(str(tmp_path / "fresh"))
        fresh = ingest(config.model_copy(update={"url": str(real)}), fresh_store, client=client)
        assert (refresh.fingerprint, refresh.counts) == (fresh.fingerprint, fresh.counts) != (first.fingerprint, first.counts)
        assert [str(item).replace(str(real), str(source)) for item in fresh.skipped] == [str(item) for item in refresh.skipped]
        assert ticks[-1] == sum(refresh.counts.values()) == 58
        assert {split: (r.decoded, r.reused) for split, r in first.shards.items()} == {"train": (5, 0), "test": (5, 0)}
        assert {split: (r.decoded, r.reused) for split, r in refresh.shards.items()} == {"train": (2, 4), "test": (2, 4)}
        assert sum(r.reused_rows for r in refresh.shards.values()) == 39  # shards 0, 2-4 but the bad image
        assert refresh.shards["train"].source.endswith(first.name)
        assert _artifact_files(store.open("datasets", refresh.name)) == _artifact_files(fresh_store.open("datasets", fresh.name))

        for k in (0, 2, 3, 4):  # the real shards back, then a chunk of their rows in the snapshot damaged
            shutil.copy2(real / shards[k][0].name, shards[k][0])
        chunk = min(p for p in (Path(store.url) / "datasets" / refresh.name / "train" / "images").rglob("*")
                    if p.is_file() and p.name != "zarr.json")
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
        with caplog.at_level("WARNING", logger="dq_ops.ingest"):
            again = ingest(config, store, client=client)
        assert "did not decode" in caplog.text and "reading every shard again" in caplog.text
        assert again.fingerprint == fresh.fingerprint and again.shards["train"].reused == 0
        assert _artifact_files(store.open("datasets", again.name)) == _artifact_files(fresh_store.open("datasets", fresh.name))


def test_shards_only_added_copy_the_unchanged_chunks_as_stored(tmp_path, fm, caplog, monkeypatch):
    """Four shards of 400 images at 128 px (chunks of 512 rows: most straddle two shards), then a
    fifth added: the refresh copies the three chunks that the unchanged shards fill as their
    stored bytes, instead of decoding and encoding them, and writes, file for file, what a fresh
    ingest of the five shards writes. Gather jobs of two chunks each: copies and rewrites mix
    within a job and across jobs. A damaged chunk is not copied: its checksum fails, and every
    shard is read again."""
    from distributed import LocalCluster

    import dq_ops.ingest

    monkeypatch.setattr(dq_ops.ingest, "GATHER_CHUNKS", 2)

    images, labels = fm
    rows = np.arange(1800) % len(images)  # the 60 test images over and over

    def shard(k: int, start: int, stop: int) -> None:
        _hf_parquet(source / f"train-{k:05d}.parquet", images[rows[start:stop]], labels[rows[start:stop]].tolist())

    source = tmp_path / "src"
    for k in range(4):
        shard(k, 400 * k, 400 * k + 400)
    config = DatasetConfig(format="parquet", url=str(source), name="d", resize=128)
    store, fresh_store = Store(str(tmp_path / "store")), Store(str(tmp_path / "fresh"))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            cluster.get_client() as client:
        first = ingest(config, store, client=client)
        assert store.open("datasets", first.name)["train/images"].chunks[0] == 512  # 16 KiB rows: 8 MiB chunks
        shard(4, 1600, 1700)
        refresh = ingest(config, store, client=client)
        fresh = ingest(config, fresh_store, client=client)
        assert _artifact_files(store.open("datasets", refresh.name)) == _artifact_files(fresh_store.open("datasets", fresh.name))
        np.testing.assert_array_equal(store.open("datasets", refresh.name)["train/labels"][:], labels[rows[:1700]])

        chunk = Path(store.url) / "datasets" / refresh.name / "train" / "images" / "c" / "1" / "0" / "0" / "0"
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
        shard(5, 1700, 1800)
        with caplog.at_level("WARNING", logger="dq_ops.ingest"):
            again = ingest(config, store, client=client)
    assert (first.shards["train"].decoded, first.shards["train"].copied_chunks) == (4, 0)
    reuse = refresh.shards["train"]
    assert (reuse.decoded, reuse.reused, reuse.reused_rows, reuse.copied_chunks) == (1, 4, 1600, 3)
    assert (refresh.fingerprint, refresh.counts) == (fresh.fingerprint, {"train": 1700})
    assert "checksum" in caplog.text and "reading every shard again" in caplog.text
    assert again.shards["train"].reused == 0 and again.counts == {"train": 1800}
    np.testing.assert_array_equal(store.open("datasets", again.name)["train/images"][:1700],
                                  fresh_store.open("datasets", fresh.name)["train/images"][:])
