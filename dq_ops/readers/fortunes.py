"""Fortune files (the ``fortune`` program's format, e.g. Debian's ``/usr/share/games/fortunes``).

A fortune file holds entries separated by lines consisting of a single ``%``. The source is a
folder of such files, one topic per file, or a single file; the label is the file's name and
class names are the sorted topic names. Left out: ``strfile`` indexes (``*.dat``), symbolic
links (Debian's ``*.u8`` are links to the topic file itself) and hidden files.

Entries are read interleaved across topics (entry 0 of every topic, then entry 1, ...), so a
``limit`` keeps every topic instead of the first files alphabetically. Files are decoded as
UTF-8, undecodable bytes replaced (the replacement character marks them). Ids are
``<topic>:<entry>:<content hash>``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from dq_ops.errors import DQInputError
from dq_ops.readers.base import Batch, SkippedItem, content_hash, open_fs

SKIPPED_SUFFIXES = (".dat",)


class FortunesReader:
    """A folder of fortune files (or one file); a single "train" split of labelled texts."""

    modality = "texts"

    def __init__(self, url: str, *, limit: int | None = None):
        self.source = url
        self.skipped: list[SkippedItem] = []
        fs, root = open_fs(url)
        if not fs.exists(root):
            raise DQInputError(f"{url}: no such fortune file or folder")
        files = _topic_files(fs, root)
        if not files:
            raise DQInputError(f"{url}: no fortune files (files of entries separated by '%' lines)")
        topics = {path.rstrip("/").rsplit("/", 1)[-1]: _entries(fs.cat_file(path)) for path in files}
        self._classes = sorted(name for name, entries in topics.items() if entries)
        if not self._classes:
            raise DQInputError(f"{url}: the fortune files hold no entries (empty dataset)")
        # (topic index, entry index, text), interleaved across topics.
        longest = max(len(entries) for entries in topics.values())
        self._entries = [
            (k, i, topics[name][i])
            for i in range(longest) for k, name in enumerate(self._classes) if i < len(topics[name])
        ][:limit]

    def splits(self) -> list[str]:
        return ["train"]

    def num_samples(self, split: str) -> int:
        return len(self._entries)

    def class_names(self) -> list[str] | None:
        return self._classes

    def iter_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(self._entries), batch_size):
            chunk = self._entries[start:start + batch_size]
            texts = [text for _, _, text in chunk]
            ids = [f"{self._classes[k]}:{i}:{content_hash(text.encode())}" for k, i, text in chunk]
            yield Batch(
                np.array(texts, dtype=np.dtypes.StringDType()),
                np.array([k for k, _, _ in chunk], dtype=np.int64),
                np.array(ids, dtype=str),
            )


def _topic_files(fs, root: str) -> list[str]:
    """The topic files under ``root`` (or ``root`` itself when it is a file), sorted."""
    if not fs.isdir(root):
        return [root]
    files = []
    for info in fs.ls(root, detail=True):
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if info["type"] != "file" or info.get("islink") or name.startswith(".") or name.endswith(SKIPPED_SUFFIXES):
            continue
        files.append(info["name"])
    return sorted(files)


def _entries(raw: bytes) -> list[str]:
    """The non-empty entries of one fortune file, trailing whitespace removed."""
    entries, current = [], []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if line.rstrip("\r") == "%":
            entries.append("\n".join(current))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current))
    return [entry.rstrip() for entry in entries if entry.strip()]
