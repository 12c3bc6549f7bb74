"""WebDataset tar shards::

    root/train-000000.tar, ..., test-000000.tar   (or train/*.tar)

A sample is the run of consecutive tar members sharing a key (the member's path up to the first
``.`` of its file name): ``<key>.jpg|.jpeg|.png|.webp`` is the image; the label is the integer
in ``<key>.cls``, else the ``label_field`` (default ``label``; none with ``null``) of
``<key>.json``, whose optional ``id`` names the sample. Other members are ignored.

Counting reads every member header once up front (skipping the data where the file can seek);
samples then stream member by member, so memory holds one batch of encoded images. Samples are
named ``<shard>:<key>``: keys repeat across shards in many datasets, the shard makes them unique.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator

from dq_ops.errors import DQInputError
from dq_ops.readers.base import DEFAULT_MAX_IMAGE_PIXELS, NO_LABEL, ItemErrors, OnError
from dq_ops.readers.shards import Record, Shard, ShardReader

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# WebDataset's own split of a member name into key and extension.
_KEY_EXTENSION = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class WebDatasetReader(ShardReader):
    """``*.tar`` shards (a folder, one file or a glob; path or fsspec URL)."""

    suffixes = (".tar",)
    kind = "WebDataset"

    def __init__(self, url: str, *, label_field: str | None = "label", resize: int | None = None,
                 on_error: OnError = "raise", limit: int | None = None, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self._label = label_field
        super().__init__(url, resize=resize, on_error=on_error, limit=limit, max_image_pixels=max_image_pixels)

    def _open_shard(self, path: str, name: str) -> Shard:
        """Count the keys that have an image."""
        count, last = 0, None
        with self._fs.open(path, "rb") as fh, self._tar(fh, name, "r:") as tar:
            for key, extension, _ in self._members(tar, name):
                if extension in IMAGE_EXTENSIONS and key != last:
                    count, last = count + 1, key
        return Shard(path, name, count)

    def _tar(self, fh, name: str, mode: str) -> tarfile.TarFile:
        try:
            return tarfile.open(fileobj=fh, mode=mode)
        except tarfile.TarError as exc:
            raise DQInputError(f"{self._where(name)}: not a readable tar file ({exc})") from None

    def _members(self, tar: tarfile.TarFile, name: str) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
        """``(key, lower-case extension, member)`` of the shard's files, in tar order."""
        try:
            for member in tar:
                match = _KEY_EXTENSION.match(member.name)
                if member.isfile() and match:
                    yield match[1], match[2].lower(), member
        except (tarfile.TarError, EOFError) as exc:  # a truncated or damaged shard
            raise DQInputError(f"{self._where(name)}: damaged tar file ({exc})") from None

    def _records(self, shard: Shard, errors: ItemErrors) -> Iterator[Record]:
        with self._fs.open(shard.path, "rb") as fh, self._tar(fh, shard.name, "r|") as tar:
            key, files = None, {}
            for member_key, extension, member in self._members(tar, shard.name):
                if member_key != key:
                    if key is not None and (record := self._record(shard, key, files, errors)) is not None:
                        yield record
                    key, files = member_key, {}
                if extension in (*IMAGE_EXTENSIONS, "cls", "json"):
                    files[extension] = tar.extractfile(member).read()
            if key is not None and (record := self._record(shard, key, files, errors)) is not None:
                yield record

    def _record(self, shard: Shard, key: str, files: dict[str, bytes], errors: ItemErrors) -> Record | None:
        """One sample from its members, or ``None`` when it lacks an image or a label."""
        name = f"{shard.name}:{key}"
        where = self._where(name)
        image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
        if image is None:
            errors.bad(where, f"no image ({', '.join(f'{key}.{e}' for e in IMAGE_EXTENSIONS)})")
            return None
        meta = {}
        if "json" in files:
            try:
                meta = json.loads(files["json"])
            except ValueError as exc:  # bad UTF-8 or bad JSON
                errors.bad(where, f"{key}.json is not valid JSON ({exc})")
                return None
            if not isinstance(meta, dict):
                errors.bad(where, f"{key}.json holds a {type(meta).__name__}, expected an object")
                return None
        if self._label is None:
            label = NO_LABEL
        elif "cls" in files:
            text = files["cls"].decode(errors="replace").strip()
            if not re.fullmatch(r"-?\d+", text):
                errors.bad(where, f"{key}.cls holds {text[:40]!r}, expected an integer label")
                return None
            label = int(text)
        elif isinstance(meta.get(self._label), int) and not isinstance(meta[self._label], bool):
            label = meta[self._label]
        elif self._label in meta:
            errors.bad(where, f"{key}.json field {self._label!r} is {meta[self._label]!r}, expected an integer label")
            return None
        else:
            errors.bad(where, f"missing label: no {key}.cls and no {self._label!r} field in {key}.json")
            return None
        sample_id = meta.get("id")
        return Record(name, image, label, None if sample_id is None else str(sample_id))
