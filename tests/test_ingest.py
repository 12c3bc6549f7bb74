"""Ingest from every source format into real stores, with real data: Fashion-MNIST images (as IDX,
PNG/JPEG folders, npz, Zarr) and Debian fortunes (as JSON/JSONL records)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import typing
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import yaml
import zarr
from PIL import Image

from dq_ops.config import DatasetConfig, DatasetFormat
from dq_ops.errors import DQInputError
from dq_ops.ingest import IngestStage, ingest
from dq_ops.readers.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR
from dq_ops.store import Store, open_zarr_store, write_array

FORTUNES = Path("/usr/share/games/fortunes")
REPO = Path(__file__).resolve().parents[1]


def _idx(name: str, header: int) -> np.ndarray:
    """Parse a Fashion-MNIST file independently of dq_ops (fixed header length, uint8 payload)."""
    return np.frombuffer(gzip.open(FASHION_MNIST_DIR / name).read(), dtype=np.uint8, offset=header)


@pytest.fixture(scope="module")
def fm_test() -> tuple[np.ndarray, np.ndarray]:
    """The real Fashion-MNIST test split: images (10000, 28, 28) and labels (10000,)."""
    return _idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28), _idx("t10k-labels-idx1-ubyte.gz", 8)


def _fortunes(topic: str, n: int) -> list[str]:
    """The first ``n`` entries of a fortune file (entries end with a line holding only '%')."""
    entries = (FORTUNES / topic).read_text(encoding="utf-8").split("\n%\n")
    return [entry.strip("\n") for entry in entries if entry.strip()][:n]


def _save_png_folder(root: Path, images: np.ndarray, labels: np.ndarray, split: str | None, suffix: str = ".png") -> list[str]:
    """Write images as ``[split/]<class name>/<index>.png``; return their relative paths in write order."""
    paths = []
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        rel = f"{FASHION_MNIST_CLASSES[label].replace('/', '-')}/{index:05d}{suffix}"
        rel = f"{split}/{rel}" if split else rel
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / rel)
        paths.append(rel)
    return paths


def _store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"))


def _sha12(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


# -- Fashion-MNIST / IDX ----------------------------------------------------------------------
def test_full_fashion_mnist_round_trips_exactly(tmp_path):
    result = ingest(DatasetConfig(), _store(tmp_path))

    assert result.counts == {"train": 60_000, "test": 10_000}
    assert result.class_names == list(FASHION_MNIST_CLASSES) and result.skipped == []
    dataset = _store(tmp_path).open("datasets", "fashion-mnist")
    assert dataset.fingerprint == result.fingerprint and dataset.url == result.url
    assert dataset.group.attrs["class_names"] == list(FASHION_MNIST_CLASSES)
    for split, prefix, n in (("train", "train", 60_000), ("test", "t10k", 10_000)):
        images, labels, ids = (dataset[f"{split}/{key}"][:] for key in ("images", "labels", "ids"))
        np.testing.assert_array_equal(images, _idx(f"{prefix}-images-idx3-ubyte.gz", 16).reshape(n, 28, 28, 1))
        np.testing.assert_array_equal(labels, _idx(f"{prefix}-labels-idx1-ubyte.gz", 8))
        assert images.dtype == np.uint8 and labels.dtype == np.int64
        assert np.bincount(labels).tolist() == [n // 10] * 10
        assert len(set(ids)) == n
        for k in (0, 1, n - 1):
            assert ids[k] == f"{k}:{_sha12(images[k].tobytes())}"


def test_limit_takes_the_first_samples_of_each_split(tmp_path, fm_test):
    result = ingest(DatasetConfig(limit=300, name="fm-300"), _store(tmp_path))
    assert result.counts == {"train": 300, "test": 300}
    dataset = _store(tmp_path).open("datasets", "fm-300")
    np.testing.assert_array_equal(dataset["test/images"][:, ..., 0], fm_test[0][:300])
    np.testing.assert_array_equal(dataset["test/labels"][:], fm_test[1][:300])


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_plain_idx_folder(tmp_path, fm_test):
    images, labels = fm_test
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:50])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:50])
    result = ingest(DatasetConfig(format="idx", url=str(tmp_path), name="plain"), _store(tmp_path))
    assert result.counts == {"test": 50} and result.class_names is None
    np.testing.assert_array_equal(_store(tmp_path).open("datasets", "plain")["test/images"][:, ..., 0], images[:50])


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda d: (d / "t10k-labels-idx1-ubyte").unlink(), r"missing labels for split 'test'"),
        (lambda d: _write_idx(d / "t10k-labels-idx1-ubyte", np.zeros(49)), r"label count differs .* 50 images, 49 labels"),
        (lambda d: (d / "t10k-images-idx3-ubyte").write_bytes((d / "t10k-images-idx3-ubyte").read_bytes()[:-100]),
         r"t10k-images-idx3-ubyte: truncated IDX file"),
        (lambda d: (d / "t10k-images-idx3-ubyte").write_bytes(b"not idx at all"), r"t10k-images-idx3-ubyte: not an IDX file"),
        (lambda d: [p.unlink() for p in d.iterdir()], r"no IDX images found"),
    ],
    ids=["missing-labels", "count-mismatch", "truncated", "bad-magic", "empty"],
)
def test_bad_idx_folders_name_the_file_and_problem(tmp_path, fm_test, break_it, message):
    source = tmp_path / "src"
    source.mkdir()
    _write_idx(source / "t10k-images-idx3-ubyte", fm_test[0][:50])
    _write_idx(source / "t10k-labels-idx1-ubyte", fm_test[1][:50])
    break_it(source)
    with pytest.raises(DQInputError, match=message):
        ingest(DatasetConfig(format="idx", url=str(source)), _store(tmp_path))


# -- image folders ------------------------------------------------------------------------------
def test_png_folder_with_split_folders_round_trips(tmp_path, fm_test):
    images, labels = fm_test
    source = tmp_path / "png"
    train_paths = _save_png_folder(source, images[:60], labels[:60], "train")
    _save_png_folder(source, images[60:80], labels[60:80], "test")

    result = ingest(DatasetConfig(format="image-folder", url=str(source), name="png"), _store(tmp_path))

    classes = sorted({FASHION_MNIST_CLASSES[k].replace("/", "-") for k in labels[:80]})
    assert result.counts == {"train": 60, "test": 20} and result.class_names == classes
    dataset = _store(tmp_path).open("datasets", "png")
    stored_ids = list(dataset["train/ids"][:])
    # Samples are stored in sorted path order; put the source in that order to compare.
    order = np.argsort(train_paths)
    np.testing.assert_array_equal(dataset["train/images"][:], images[:60][order][..., None])
    expected_labels = [classes.index(FASHION_MNIST_CLASSES[k].replace("/", "-")) for k in labels[:60][order]]
    assert dataset["train/labels"][:].tolist() == expected_labels
    assert stored_ids == [f"{train_paths[k]}:{_sha12(images[k].tobytes())}" for k in order]


def test_jpeg_folder_without_split_folders_is_one_train_split(tmp_path, fm_test):
    images, labels = fm_test
    source = tmp_path / "jpg"
    _save_png_folder(source, images[:40], labels[:40], None, suffix=".jpg")
    result = ingest(DatasetConfig(format="image-folder", url=str(source), name="jpg"), _store(tmp_path))
    assert result.counts == {"train": 40}
    stored = _store(tmp_path).open("datasets", "jpg")["train/images"][:]
    assert stored.shape == (40, 28, 28, 1)
    # JPEG is lossy: close to the source pixels, not equal.
    order = np.argsort([f"{FASHION_MNIST_CLASSES[k].replace('/', '-')}/{i:05d}" for i, k in enumerate(labels[:40])])
    assert np.abs(stored[..., 0].astype(int) - images[:40][order]).mean() < 8


def test_rgb_and_mixed_gray_rgb_folders_store_rgb(tmp_path, fm_test):
    images = fm_test[0][:4]
    source = tmp_path / "mixed"
    (source / "a").mkdir(parents=True)
    Image.fromarray(images[0]).save(source / "a" / "gray.png")
    tinted = np.stack([images[1], images[2], images[3]], axis=-1)
    Image.fromarray(tinted, "RGB").save(source / "a" / "rgb.png")
    ingest(DatasetConfig(format="image-folder", url=str(source), name="mixed"), _store(tmp_path))
    stored = _store(tmp_path).open("datasets", "mixed")["train/images"][:]
    assert stored.shape == (2, 28, 28, 3)
    np.testing.assert_array_equal(stored[0], np.repeat(images[0][..., None], 3, axis=-1))
    np.testing.assert_array_equal(stored[1], tinted)


def test_loose_images_get_no_label(tmp_path, fm_test):
    source = tmp_path / "loose"
    source.mkdir()
    Image.fromarray(fm_test[0][0]).save(source / "x.png")
    _save_png_folder(source, fm_test[0][1:3], fm_test[1][1:3], None)
    result = ingest(DatasetConfig(format="image-folder", url=str(source), name="loose"), _store(tmp_path))
    labels = _store(tmp_path).open("datasets", "loose")["train/labels"][:]
    assert result.counts == {"train": 3} and labels.tolist()[-1] == -1 and -1 not in labels.tolist()[:-1]


def test_mixed_sizes_need_resize(tmp_path, fm_test):
    source = tmp_path / "sizes"
    _save_png_folder(source, fm_test[0][:3], fm_test[1][:3], None)
    big = source / "Zebra" / "big.png"
    big.parent.mkdir()
    Image.fromarray(fm_test[0][3]).resize((32, 40)).save(big)
    with pytest.raises(DQInputError, match=r"images differ in size: Ankle boot/00000\.png is 28x28 \(WxH\) but Zebra/big\.png is 32x40"):
        ingest(DatasetConfig(format="image-folder", url=str(source)), _store(tmp_path))
    result = ingest(DatasetConfig(format="image-folder", url=str(source), name="sized", resize=16), _store(tmp_path))
    assert result.counts == {"train": 4}
    assert _store(tmp_path).open("datasets", "sized")["train/images"].shape == (4, 16, 16, 1)


def _corrupt_folder(root: Path, fm_test) -> str:
    """Ten good PNGs, one file of garbage and one truncated PNG (its header still reads) in their
    first class folder, whose name is returned."""
    paths = _save_png_folder(root, fm_test[0][:10], fm_test[1][:10], None)
    folder = paths[0].split("/")[0]
    (root / folder / "garbage.png").write_bytes(b"definitely not a png")
    good = (root / paths[0]).read_bytes()
    (root / folder / "truncated.png").write_bytes(good[: len(good) // 2])
    return folder


@pytest.mark.parametrize("bad", ["garbage.png", "truncated.png"])
def test_corrupt_image_is_named(tmp_path, fm_test, bad):
    source = tmp_path / "corrupt"
    folder = _corrupt_folder(source, fm_test)
    (source / folder / ({"garbage.png", "truncated.png"} - {bad}).pop()).unlink()
    with pytest.raises(DQInputError, match=rf"corrupt/{folder}/{bad}: corrupt"):
        ingest(DatasetConfig(format="image-folder", url=str(source)), _store(tmp_path))


def test_on_error_skip_reports_and_drops_bad_images(tmp_path, fm_test):
    source = tmp_path / "corrupt"
    _corrupt_folder(source, fm_test)
    result = ingest(DatasetConfig(format="image-folder", url=str(source), on_error="skip"), _store(tmp_path))
    assert result.counts == {"train": 10}
    assert sorted(Path(item.name).name for item in result.skipped) == ["garbage.png", "truncated.png"]
    assert all("corrupt" in item.reason for item in result.skipped)
    dataset = _store(tmp_path).open("datasets", result.name)
    assert dataset["train/images"].shape[0] == dataset["train/labels"].shape[0] == dataset["train/ids"].shape[0] == 10


def test_empty_sources_are_refused(tmp_path, fm_test):
    empty = tmp_path / "empty"
    (empty / "cats").mkdir(parents=True)
    with pytest.raises(DQInputError, match="no readable PNG/JPEG images"):
        ingest(DatasetConfig(format="image-folder", url=str(empty)), _store(tmp_path))
    (empty / "cats" / "broken.png").write_bytes(b"\x89PNG nope")
    with pytest.raises(DQInputError, match="no readable PNG/JPEG images"):
        ingest(DatasetConfig(format="image-folder", url=str(empty), on_error="skip"), _store(tmp_path))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DQInputError, match=r"empty\.jsonl: no records \(empty dataset\)"):
        ingest(DatasetConfig(format="jsonl", url=str(tmp_path / "empty.jsonl")), _store(tmp_path))


# -- npz and Zarr -------------------------------------------------------------------------------
def test_npz_layouts(tmp_path, fm_test):
    images, labels = fm_test
    np.savez(tmp_path / "plain.npz", images=images[:70], labels=labels[:70],
             class_names=np.array(FASHION_MNIST_CLASSES))
    np.savez_compressed(tmp_path / "keras.npz", x_train=images[:50], y_train=labels[:50],
                        x_test=images[50:70, :, :, None], y_test=labels[50:70])
    store = _store(tmp_path)
    plain = ingest(DatasetConfig(format="npz", url=str(tmp_path / "plain.npz"), name="plain"), store)
    keras = ingest(DatasetConfig(format="npz", url=str(tmp_path / "keras.npz"), name="keras"), store)
    assert plain.counts == {"train": 70} and plain.class_names == list(FASHION_MNIST_CLASSES)
    assert keras.counts == {"train": 50, "test": 20} and keras.class_names is None
    np.testing.assert_array_equal(store.open("datasets", "plain")["train/images"][:, ..., 0], images[:70])
    np.testing.assert_array_equal(store.open("datasets", "keras")["test/images"][:, ..., 0], images[50:70])
    np.testing.assert_array_equal(store.open("datasets", "keras")["test/labels"][:], labels[50:70])
    small = ingest(DatasetConfig(format="npz", url=str(tmp_path / "keras.npz"), name="small", resize=14), store)
    assert small.counts == keras.counts
    assert store.open("datasets", "small")["test/images"].shape == (20, 14, 14, 1)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((5, 8, 8), np.uint8)}, r"missing labels: array 'images' has no 'labels'"),
        ({"images": np.zeros((5, 8, 8), np.uint8), "labels": np.zeros(4, np.int64)}, r"label count differs .* 5 images, 4 labels"),
        ({"x_train": np.zeros((5, 8, 8), np.uint8)}, r"missing labels: array 'x_train' has no 'y_train'"),
        ({"features": np.zeros((5, 8))}, r"no images found.*\['features'\]"),
        ({"images": np.full((5, 8, 8), 0.5), "labels": np.zeros(5, np.int64)}, r"integer pixels in 0\.\.255"),
        ({"images": np.zeros((5, 8, 8, 2), np.uint8), "labels": np.zeros(5, np.int64)}, r"C = 1 or 3"),
    ],
    ids=["no-labels", "count-mismatch", "no-y", "no-images", "float-pixels", "two-channels"],
)
def test_bad_npz_is_named(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DQInputError, match=rf"bad\.npz.*{message}"):
        ingest(DatasetConfig(format="npz", url=str(tmp_path / "bad.npz")), _store(tmp_path))


def test_zarr_groups_local_and_memory(tmp_path, fm_test):
    images, labels = fm_test
    memory_url = f"memory://dq-test-{uuid.uuid4().hex}/src"
    for url in (str(tmp_path / "src.zarr"), memory_url):
        group = zarr.open_group(store=open_zarr_store(url), mode="w")
        write_array(group, "images", images[:64, :, :, None], chunk_rows=10)
        write_array(group, "labels", labels[:64].astype(np.int32))
        group.attrs["class_names"] = list(FASHION_MNIST_CLASSES)
        result = ingest(DatasetConfig(format="zarr", url=url, name="z"), _store(tmp_path))
        assert result.counts == {"train": 64} and result.class_names == list(FASHION_MNIST_CLASSES)
        np.testing.assert_array_equal(_store(tmp_path).open("datasets", "z")["train/images"][:, ..., 0], images[:64])
    fsspec.filesystem("memory").rm(memory_url.removeprefix("memory:/").rsplit("/", 1)[0], recursive=True)


def test_a_stored_dataset_can_be_reingested_from_its_zarr_group(tmp_path):
    store = _store(tmp_path)
    first = ingest(DatasetConfig(limit=100, name="fm"), store)
    again = ingest(DatasetConfig(format="zarr", url=first.url, name="copy"), store)
    assert again.counts == first.counts and again.class_names == first.class_names
    for key in ("train/images", "train/labels", "train/ids", "test/images"):
        np.testing.assert_array_equal(store.open("datasets", "copy")[key][:], store.open("datasets", "fm")[key][:])


def test_the_ingest_stage_reads_its_source_only_when_it_changed(tmp_path, fm_test):
    images, labels = fm_test
    source, other = tmp_path / "fm.npz", tmp_path / "other.npz"
    np.savez(source, x_train=images[:40], y_train=labels[:40], x_test=images[40:50], y_test=labels[40:50])
    np.savez(other, x_train=images[50:70], y_train=labels[50:70])
    store, config = _store(tmp_path), DatasetConfig(format="npz", url=str(source), name="fm")
    first = IngestStage(store, config).run()
    assert store.read_ref("datasets", "fm")["source_key"] == IngestStage(store, config).name()

    # Same paths, sizes and times, other bytes: a stage that read the source would fail on them.
    stat = source.stat()
    source.write_bytes(b"\0" * stat.st_size)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert IngestStage(store, config).run().fingerprint == first.fingerprint

    # A snapshot of another source made latest in between: read again, and latest again.
    np.savez(source, x_train=images[:40], y_train=labels[:40], x_test=images[40:50], y_test=labels[40:50])
    ingest(DatasetConfig(format="npz", url=str(other), name="fm"), store)
    assert store.open("datasets", "fm").fingerprint != first.fingerprint
    assert IngestStage(store, config).stored() is None
    again = IngestStage(store, config).run()
    assert again.name == first.name and store.open("datasets", "fm").fingerprint == first.fingerprint

    # gc keeps what makes the latest snapshot done; a damaged one is read again (and replaced).
    assert "datasets/" + first.name not in store.gc(keep=1)
    assert IngestStage(store, config).stored().fingerprint == first.fingerprint
    chunk = next(p for p in (tmp_path / "store" / "datasets" / first.name / "train" / "labels" / "c").rglob("*") if p.is_file())
    chunk.unlink()
    assert IngestStage(store, config).stored() is None
    assert IngestStage(store, config).run().fingerprint == first.fingerprint
    assert store.check("datasets", first.name) is None

    # A source that changed is read: a new snapshot becomes latest.
    np.savez(source, x_train=images[:45], y_train=labels[:45], x_test=images[45:50], y_test=labels[45:50])
    grown = IngestStage(store, config).run()
    assert grown.name != first.name and grown["train/labels"].shape == (45,)


def test_bad_zarr_sources_are_named(tmp_path):
    url = str(tmp_path / "src.zarr")
    with pytest.raises(DQInputError, match=r"src\.zarr: no Zarr group here"):
        ingest(DatasetConfig(format="zarr", url=url), _store(tmp_path))
    split = zarr.open_group(store=open_zarr_store(url), mode="w").create_group("test")
    write_array(split, "images", np.zeros((5, 8, 8, 1), np.uint8))
    with pytest.raises(DQInputError, match=r"src\.zarr: missing labels: test/images has no 'labels'"):
        ingest(DatasetConfig(format="zarr", url=url), _store(tmp_path))
    write_array(split, "labels", np.zeros(6, np.int64))
    with pytest.raises(DQInputError, match=r"src\.zarr: label count differs .* split 'test': 5 images, 6 labels"):
        ingest(DatasetConfig(format="zarr", url=url), _store(tmp_path))


# -- JSON / JSONL text records --------------------------------------------------------------------
def _fortune_records() -> list[dict]:
    """Alpaca-style records from real fortunes; the fortune file's name is the label."""
    return [
        {"instruction": f"Tell me a fortune about {topic}.", "input": "", "output": text, "label": topic}
        for topic in ("science", "food", "computers") for text in _fortunes(topic, 15)
    ]


def test_jsonl_alpaca_records(tmp_path):
    records = _fortune_records()
    path = tmp_path / "fortunes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = ingest(DatasetConfig(format="jsonl", url=str(path), name="fortunes"), _store(tmp_path))

    assert result.modality == "texts" and result.counts == {"train": 45}
    assert result.class_names == ["computers", "food", "science"]
    dataset = _store(tmp_path).open("datasets", "fortunes")
    texts, labels, ids = (dataset[f"train/{key}"][:] for key in ("texts", "labels", "ids"))
    first = records[0]
    assert texts[0] == f"### instruction\n{first['instruction']}\n\n### output\n{first['output']}"
    assert labels.tolist() == [2] * 15 + [1] * 15 + [0] * 15
    assert ids[0] == f"1:{_sha12(texts[0].encode())}" and ids[-1].startswith("45:")
    assert dataset.group.attrs["modality"] == "texts"


def test_json_list_with_one_text_field_and_integer_labels(tmp_path):
    texts = _fortunes("science", 20)
    path = tmp_path / "science.json"
    path.write_text(json.dumps([{"text": t, "label": k % 3} for k, t in enumerate(texts)] + [{"text": "unlabelled"}]))
    config = DatasetConfig(format="json", url=str(path), name="sci", text_fields=["text"], limit=21)
    result = ingest(config, _store(tmp_path))
    dataset = _store(tmp_path).open("datasets", "sci")
    assert result.counts == {"train": 21} and result.class_names is None
    assert list(dataset["train/texts"][:]) == [*texts, "unlabelled"]
    assert dataset["train/labels"][:].tolist() == [k % 3 for k in range(20)] + [-1]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"instruction": "a", "input": "", "output": "b"}', '{"instruction": "c", '],
         r"bad\.jsonl:2: not valid JSON"),
        (['{"instruction": "a", "input": "", "output": "b"}', "", '{"instruction": "c"}'],
         r"bad\.jsonl:3: record lacks text field\(s\) 'input', 'output'"),
        (['["a list"]'], r"bad\.jsonl:1: expected a JSON object, got list"),
        (['{"instruction": "a", "input": "", "output": "b", "label": 1.5}'], r"bad\.jsonl:1: label 1\.5"),
    ],
    ids=["bad-json", "missing-fields", "not-object", "float-label"],
)
def test_bad_jsonl_names_file_and_line(tmp_path, lines, message):
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DQInputError, match=message):
        ingest(DatasetConfig(format="jsonl", url=str(tmp_path / "bad.jsonl")), _store(tmp_path))


def test_bad_json_document_names_the_line(tmp_path):
    (tmp_path / "bad.json").write_text('[\n  {"instruction": "a", "input": "", "output": "b"},\n  oops\n]')
    with pytest.raises(DQInputError, match=r"bad\.json:3:3: not valid JSON"):
        ingest(DatasetConfig(format="json", url=str(tmp_path / "bad.json")), _store(tmp_path))
    (tmp_path / "bad.json").write_text('[{"instruction": "a", "output": "b"}]')
    with pytest.raises(DQInputError, match=r"bad\.json\[0\]: record lacks text field\(s\) 'input'"):
        ingest(DatasetConfig(format="json", url=str(tmp_path / "bad.json")), _store(tmp_path))


def test_on_error_skip_reports_bad_records(tmp_path):
    records = [json.dumps(r) for r in _fortune_records()[:6]]
    records[1] = "{broken"
    records[4] = json.dumps({"instruction": "no output"})
    (tmp_path / "mixed.jsonl").write_text("\n".join(records))
    config = DatasetConfig(format="jsonl", url=str(tmp_path / "mixed.jsonl"), on_error="skip")
    result = ingest(config, _store(tmp_path))
    assert result.counts == {"train": 4}
    assert [item.name.rsplit("/", 1)[-1] for item in result.skipped] == ["mixed.jsonl:2", "mixed.jsonl:5"]
    ids = _store(tmp_path).open("datasets", result.name)["train/ids"][:]
    assert [i.split(":")[0] for i in ids] == ["1", "3", "4", "6"]


# -- store semantics of ingest ------------------------------------------------------------------
def test_failed_ingest_leaves_the_previous_dataset_untouched(tmp_path, fm_test):
    store = _store(tmp_path)
    good = ingest(DatasetConfig(limit=200, name="data"), store)
    before = {key: store.open("datasets", "data")[key][:] for key in ("train/images", "train/ids", "test/labels")}
    source = tmp_path / "corrupt"
    _corrupt_folder(source, fm_test)
    with pytest.raises(DQInputError, match="corrupt"):
        ingest(DatasetConfig(format="image-folder", url=str(source), name="data"), store)
    after = store.open("datasets", "data")
    assert after.fingerprint == good.fingerprint and after.record["complete"]
    for key, value in before.items():
        np.testing.assert_array_equal(after[key][:], value)
    assert store.list("datasets") == [good.name] and good.name.startswith("data-")
    assert not any((tmp_path / "store" / "datasets" / ".staging").iterdir())


def test_fingerprint_follows_content_and_parameters_not_location(tmp_path, fm_test):
    np.savez(tmp_path / "a.npz", images=fm_test[0][:30], labels=fm_test[1][:30])
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(tmp_path / "a.npz", tmp_path / "elsewhere" / "b.npz")
    store = _store(tmp_path)
    first = ingest(DatasetConfig(format="npz", url=str(tmp_path / "a.npz"), name="a"), store)
    moved = ingest(DatasetConfig(format="npz", url=str(tmp_path / "elsewhere" / "b.npz"), name="b"), store)
    fewer = ingest(DatasetConfig(format="npz", url=str(tmp_path / "a.npz"), name="c", limit=29), store)
    resized = ingest(DatasetConfig(format="npz", url=str(tmp_path / "a.npz"), name="d", resize=28), store)
    assert moved.fingerprint == first.fingerprint
    assert len({first.fingerprint, fewer.fingerprint, resized.fingerprint}) == 3


def test_progress_reports_every_batch_up_to_the_total(tmp_path):
    calls: list[tuple[int, int]] = []
    ingest(DatasetConfig(limit=600), _store(tmp_path), progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (1200, 1200) and len(calls) == 6
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_ingest_into_a_memory_store(fm_test):
    url = f"memory://dq-test-{uuid.uuid4().hex}"
    result = ingest(DatasetConfig(limit=50), Store(url))
    assert result.url == f"{url}/datasets/{result.name}" and result.name.startswith("fashion-mnist-")
    np.testing.assert_array_equal(Store(url).open("datasets", "fashion-mnist")["test/images"][:, ..., 0], fm_test[0][:50])
    fsspec.filesystem("memory").rm(url.removeprefix("memory:/"), recursive=True)


# -- the command line -----------------------------------------------------------------------------
def _dq(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_help(tmp_path):
    top = _dq("--help", cwd=tmp_path)
    assert top.returncode == 0 and "Dataset Quantization" in top.stdout and "ingest" in top.stdout
    sub = _dq("ingest", "--help", cwd=tmp_path)
    assert sub.returncode == 0
    for flag in ("--format", "--url", "--name", "--store", "--limit", "--on-error", "CONFIG.yaml"):
        assert flag in sub.stdout
    help_text = " ".join(sub.stdout.split())
    assert all(fmt in help_text for fmt in typing.get_args(DatasetFormat))


def test_cli_module_and_dq_ops_import_lightly(tmp_path):
    code = (
        "import sys, flows.cli; cli = {m.split('.')[0] for m in sys.modules}; "
        "import dq_ops.ingest; ops = {m.split('.')[0] for m in sys.modules} - cli; "
        "print(sorted(cli & {'numpy', 'zarr', 'prefect', 'dq_ops'}), sorted(ops & {'prefect', 'mlflow', 'tasks'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[] []", done.stderr


def test_cli_ingest_with_config_and_flags(tmp_path, fm_test):
    np.savez(tmp_path / "small.npz", x_train=fm_test[0][:40], y_train=fm_test[1][:40])
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "dataset": {"format": "npz", "url": str(tmp_path / "small.npz"), "name": "from-yaml"},
        "store_url": str(tmp_path / "yaml-store"),
    }))
    done = _dq("ingest", str(config), "--name", "small", "--limit", "25", "--store", str(tmp_path / "s"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    artifact = Store(str(tmp_path / "s")).open("datasets", "small")
    assert artifact["train/images"].shape == (25, 28, 28, 1)
    assert "train" in done.stdout and "25 samples" in done.stdout
    assert artifact.fingerprint in done.stdout and artifact.url in done.stdout
    assert not (tmp_path / "yaml-store").exists()


def test_cli_input_errors_exit_2_without_traceback(tmp_path):
    missing = _dq("ingest", "--format", "npz", "--url", str(tmp_path / "nope.npz"), cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith(f"error: {tmp_path / 'nope.npz'}: file not found (details: ")
    bad_flag = _dq("ingest", "--limit", "0", cwd=tmp_path)
    assert bad_flag.returncode == 2 and bad_flag.stderr.startswith("error: invalid option: --limit")
    assert "Traceback" not in missing.stderr + bad_flag.stderr


def test_cli_reports_skipped_items(tmp_path, fm_test):
    source = tmp_path / "corrupt"
    _corrupt_folder(source, fm_test)
    done = _dq("ingest", "--format", "image-folder", "--url", str(source), "--on-error", "skip",
               "--store", str(tmp_path / "s"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "10 samples" in done.stdout and "2 bad items" in done.stdout
    assert "garbage.png: corrupt image" in done.stdout and "truncated.png: corrupt image" in done.stdout


def test_hold_out_split_is_stable_when_the_source_grows(tmp_path):
    from dq_ops.ingest import held_out

    records = [{"instruction": text, "label": topic} for topic in ("art", "science") for text in _fortunes(topic, 150)]
    source = tmp_path / "records.jsonl"
    config = DatasetConfig(format="jsonl", url=str(source), name="t", test_fraction=0.25, text_fields=["instruction"])

    def ingest_records(rows: list[dict]) -> tuple[set[str], set[str]]:
        source.write_text("".join(json.dumps(r) + "\n" for r in rows))
        ingest(config, _store(tmp_path))
        stored = _store(tmp_path).open("datasets", "t")
        return set(stored["train/ids"][:]), set(stored["test/ids"][:])

    train, test = ingest_records(records[:200])
    assert not train & test and len(train) + len(test) == 200
    assert 20 < len(test) < 80  # about a quarter
    assert all(held_out(np.array([i]), 0.25)[0] for i in test)
    # Refreshed source: 100 more records. Every old sample stays on its side.
    more_train, more_test = ingest_records(records)
    assert train <= more_train and test <= more_test and len(more_train) + len(more_test) == 300


def test_fortunes_reader_takes_topic_files_and_skips_indexes_and_links(tmp_path):
    from dq_ops.readers import FortunesReader

    folder = tmp_path / "fortunes"
    folder.mkdir()
    for topic in ("art", "science"):
        (folder / topic).write_bytes((FORTUNES / topic).read_bytes())
        (folder / f"{topic}.dat").write_bytes((FORTUNES / f"{topic}.dat").read_bytes())
        (folder / f"{topic}.u8").symlink_to(topic)
    (folder / "tiny").write_text("only entry\n%\n\n%\nsecond entry\n")
    reader = FortunesReader(str(folder))
    assert reader.class_names() == ["art", "science", "tiny"]
    assert reader.num_samples("train") == len(_fortunes("art", 10_000)) + len(_fortunes("science", 10_000)) + 2
    # A limit keeps every topic: entries are interleaved across the files.
    batch = next(FortunesReader(str(folder), limit=7).iter_batches("train", 100))
    assert batch.labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert list(batch.samples[2:6:3]) == ["only entry", "second entry"]
    assert batch.ids[2].startswith("tiny:0:")


def test_fortunes_reader_reads_the_real_debian_corpus():
    from dq_ops.readers import FortunesReader

    reader = FortunesReader(str(FORTUNES))
    topics = sorted(p.name for p in FORTUNES.iterdir() if not p.is_symlink() and p.suffix != ".dat")
    assert reader.class_names() == topics
    assert reader.num_samples("train") > 10_000


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.array([0, -5, 1])}, "sample 1 has label -5"),
        ({"images": np.full((3, 4, 4), np.nan), "labels": np.array([0, 1, 1])}, "sample 0 has non-finite pixel values"),
    ],
)
def test_npz_rejects_bad_labels_and_pixels_naming_the_sample(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DQInputError, match=message):
        ingest(DatasetConfig(format="npz", url=str(path), name="bad"), _store(tmp_path))
    assert not (tmp_path / "store" / "datasets" / "bad").exists()
