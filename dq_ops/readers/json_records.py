"""Text records from JSON (one list of objects) or JSONL (one object per line), e.g. Alpaca.

Each record's ``text_fields`` are joined into one text: a single field is taken verbatim;
several become ``"### <field>\\n<value>"`` sections separated by blank lines, empty fields left
out (Alpaca's ``input`` is often empty). The optional ``label_field`` holds an integer label or
a class name; class names are sorted and labels index them. A record without a label gets -1.

Records are named ``<url>:<line>`` (JSONL) or ``<url>[<index>]`` (JSON) in ids and errors. One
pass before reading counts records and collects class names, so label indices do not depend on
``limit``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np

from dq_ops.errors import DQInputError
from dq_ops.readers.base import NO_LABEL, Batch, ItemErrors, OnError, SkippedItem, open_fs, sample_ids

_SECTION = "### {field}\n{value}"


class JsonRecordsReader:
    """One JSON or JSONL file (path or fsspec URL; ``.gz`` is decompressed); a single "train" split."""

    modality = "texts"

    def __init__(
        self,
        url: str,
        *,
        layout: Literal["json", "jsonl"],
        text_fields: list[str],
        label_field: str | None = "label",
        on_error: OnError = "raise",
        limit: int | None = None,
    ):
        if not text_fields:
            raise DQInputError("text_fields must name at least one JSON field")
        self.source = url
        self._layout, self._fields, self._label_field = layout, list(text_fields), label_field
        self._errors = ItemErrors(on_error)
        self.skipped: list[SkippedItem] = self._errors.skipped
        count, names = 0, set()
        for _, _, record in self._records():
            count += 1
            label = record.get(label_field) if isinstance(record, dict) and label_field else None
            if isinstance(label, str):
                names.add(label)
        if count == 0:
            raise DQInputError(f"{url}: no records (empty dataset)")
        self._count = min(count, limit or count)
        self._classes = sorted(names)
        self._class_index = {name: k for k, name in enumerate(self._classes)}

    def _records(self) -> Iterator[tuple[int, str, Any]]:
        """``(position, name, record)`` for every record; a JSONL line that does not parse is a :class:`_BadLine`.

        A JSON document that does not parse has no records to skip, so it always raises.
        """
        fs, path = open_fs(self.source)
        try:
            fh = fs.open(path, "rb", compression="gzip" if path.endswith(".gz") else None)
        except FileNotFoundError:
            raise DQInputError(f"{self.source}: file not found") from None
        with fh:
            if self._layout == "json":
                try:
                    records = json.loads(fh.read().decode("utf-8"))
                except UnicodeDecodeError as exc:
                    raise DQInputError(f"{self.source}: not UTF-8 text ({exc})") from None
                except json.JSONDecodeError as exc:
                    raise DQInputError(f"{self.source}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
                if not isinstance(records, list):
                    raise DQInputError(f"{self.source}: expected a JSON list of records, got {type(records).__name__}")
                for index, record in enumerate(records):
                    yield index, f"{self.source}[{index}]", record
                return
            for line_no, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    record = _BadLine(str(exc))
                yield line_no, f"{self.source}:{line_no}", record

    def _parse(self, name: str, record: Any) -> tuple[str, int] | None:
        """A record's text and label, or ``None`` after reporting why it is bad."""
        if isinstance(record, _BadLine):
            return self._errors.bad(name, f"not valid JSON ({record.reason})")
        if not isinstance(record, dict):
            return self._errors.bad(name, f"expected a JSON object, got {type(record).__name__}")
        missing = [f for f in self._fields if f not in record]
        if missing:
            present = ", ".join(map(repr, record)) or "none"
            return self._errors.bad(name, f"record lacks text field(s) {', '.join(map(repr, missing))} (it has {present})")
        not_text = [f for f in self._fields if not isinstance(record[f], str)]
        if not_text:
            return self._errors.bad(name, f"text field(s) {', '.join(map(repr, not_text))} are not strings")
        if len(self._fields) == 1:
            text = record[self._fields[0]]
        else:
            text = "\n\n".join(_SECTION.format(field=f, value=record[f]) for f in self._fields if record[f])
        if not text.strip():
            return self._errors.bad(name, "all text fields are empty")
        label = record.get(self._label_field) if self._label_field else None
        if label is None:
            return text, NO_LABEL
        if isinstance(label, str):
            return text, self._class_index[label]
        if isinstance(label, int) and not isinstance(label, bool) and not self._classes and label >= NO_LABEL:
            return text, label
        expected = "a class name (other labels are strings)" if self._classes else "an integer >= -1 or a class name"
        return self._errors.bad(name, f"label {label!r} in field {self._label_field!r} is not {expected}")

    def splits(self) -> list[str]:
        return ["train"]

    def num_samples(self, split: str) -> int:
        return self._count

    def class_names(self) -> list[str] | None:
        return self._classes or None

    def iter_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        texts: list[str] = []
        labels: list[int] = []
        positions: list[int] = []
        done = 0
        for position, name, record in self._records():
            if done == self._count:
                break
            parsed = self._parse(name, record)
            if parsed is None:
                continue
            texts.append(parsed[0])
            labels.append(parsed[1])
            positions.append(position)
            done += 1
            if len(texts) == batch_size:
                yield _batch(texts, labels, positions)
                texts, labels, positions = [], [], []
        if texts:
            yield _batch(texts, labels, positions)


class _BadLine:
    """A JSONL line that did not parse; kept so the reading pass reports it with its line number."""

    def __init__(self, reason: str):
        self.reason = reason


def _batch(texts: list[str], labels: list[int], positions: list[int]) -> Batch:
    # Variable-width strings: a fixed-width array would pad every text to the longest one.
    samples = np.array(texts, dtype=np.dtypes.StringDType())
    return Batch(samples, np.array(labels, dtype=np.int64), sample_ids(positions, texts))
