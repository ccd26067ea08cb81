"""Dataset files: the one reader of prompts for dataset jobs and the viewer.

Formats, by suffix (``FORMATS``; any other suffix reads as text):

* text (``.txt``): one prompt a line.
* JSON lines (``.jsonl``, ``.ndjson``): one record a line, a JSON object with the prompt in the
  field ``column``, or a JSON string that is the prompt.
* JSON (``.json``): an array of such records.
* CSV (``.csv``, ``.tsv``): a header row naming ``column``, then one prompt a row.

Blank lines (rows) are skipped. A record's ``index`` is its number in the file: the 0-based line
for text and JSON lines (so indexes of a text file are its line numbers minus one), the 0-based
data row for CSV, the 0-based array item for JSON; ``line`` is the 1-based line it starts on.

Problems of one record (bytes that are not UTF-8, over ``max_chars`` characters, control
characters, a line that is not JSON, nested too deeply, or without the text field) stay with that
record as its ``error``; the rest of the file is still usable. Problems of the whole file (missing,
not a file, unreadable, over ``MAX_DATASET_BYTES``, a CSV without the column, a JSON document that
is not an array, no records at all) raise ``ValueError`` (``FileNotFoundError`` when missing)
naming the file and the problem.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routescope.workers.schema import check_choice

MAX_PROMPT_CHARS = 20_000
MAX_DATASET_BYTES = 2 << 30
FORMATS: dict[str, str] = {".txt": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
                           ".csv": "csv", ".tsv": "csv"}
FORMAT_NAMES: tuple[str, ...] = ("text", "jsonl", "json", "csv")
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


@dataclass
class Record:
    """One record of a dataset: its index, line, and the prompt text or why it is unusable."""

    index: int
    line: int
    text: str | None
    error: str | None = None


@dataclass
class Dataset:
    """A dataset file read by ``read_dataset``: every record, usable or not, and the file's hash."""

    path: Path
    format: str
    sha256: str
    size: int
    records: list[Record]

    @property
    def valid(self) -> list[Record]:
        return [r for r in self.records if r.error is None]

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": self.format, "sha256": self.sha256, "bytes": self.size,
                "n_records": len(self.records), "n_invalid": sum(r.error is not None for r in self.records)}


def format_of(path: str | os.PathLike) -> str:
    """The format a dataset file is read in, from its suffix (text when unknown)."""
    return FORMATS.get(Path(path).suffix.lower(), "text")


def _utf8_error(text: str, where: str) -> str | None:
    """Why ``text`` is not UTF-8: bytes that were not survive decoding as lone surrogates."""
    if any("\udc80" <= c <= "\udcff" for c in text):
        try:
            text.encode("utf-8", "surrogateescape").decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"{where}: not valid UTF-8 (byte {exc.start})"
    return None


def _check_text(text: str, where: str, max_chars: int) -> str | None:
    """Why ``text`` cannot be a prompt (None when it can)."""
    # The pipeline module loads torch; only checking a record needs it.
    from .pipeline import validate_prompt

    bad = _utf8_error(text, where)
    if bad:
        return bad
    if len(text) > max_chars:
        return f"{where}: {len(text)} characters exceeds the limit of {max_chars}"
    try:
        validate_prompt(text)
    except ValueError as exc:
        return f"{where}: {str(exc).removeprefix('prompt: ')}"
    return None


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "text", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _json_record(value: Any, index: int, line: int, where: str, column: str, max_chars: int) -> Record:
    if isinstance(value, dict):
        if column not in value:
            return Record(index, line, None, f"{where}: no text field {column!r}")
        value = value[column]
        if not isinstance(value, str):
            return Record(index, line, None, f"{where}: field {column!r} is {_json_type(value)}, not text")
    elif not isinstance(value, str):
        return Record(index, line, None, f"{where}: {_json_type(value)}, not a JSON object or text")
    return Record(index, line, value, _check_text(value, where, max_chars))


def _jsonl_records(text: str, column: str, max_chars: int) -> list[Record]:
    records = []
    for i, line in enumerate(text.split("\n")):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"line {i + 1}"
        bad = _utf8_error(line, where)
        if bad:
            records.append(Record(i, i + 1, None, bad))
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            records.append(Record(i, i + 1, None, f"{where}: not valid JSON ({exc.msg})"))
            continue
        except RecursionError:
            records.append(Record(i, i + 1, None, f"{where}: JSON nested too deeply"))
            continue
        records.append(_json_record(value, i, i + 1, where, column, max_chars))
    return records


def _json_records(text: str, name: str, column: str, max_chars: int) -> list[Record]:
    """The items of a JSON array, each with the line it starts on (read item by item for that)."""
    decoder = json.JSONDecoder()
    pos = _JSON_SPACE.match(text).end()
    try:
        if not text.startswith("[", pos):
            top = json.loads(text)
            raise ValueError(f"dataset {name}: a .json dataset is an array of records, not {_json_type(top)}")
        items: list[tuple[int, Any]] = []
        pos = _JSON_SPACE.match(text, pos + 1).end()
        if text.startswith("]", pos):
            pos += 1
        else:
            while True:
                value, end = decoder.raw_decode(text, pos)
                items.append((pos, value))
                pos = _JSON_SPACE.match(text, end).end()
                if text.startswith(",", pos):
                    pos = _JSON_SPACE.match(text, pos + 1).end()
                elif text.startswith("]", pos):
                    pos += 1
                    break
                else:
                    raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
        if _JSON_SPACE.match(text, pos).end() != len(text):
            raise json.JSONDecodeError("Extra data", text, pos)
    except json.JSONDecodeError as exc:
        raise ValueError(f"dataset {name}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise ValueError(f"dataset {name}: JSON nested too deeply") from None
    records, line, counted = [], 1, 0
    for i, (start, value) in enumerate(items):
        line += text.count("\n", counted, start)
        counted = start
        records.append(_json_record(value, i, line, f"item {i + 1} (line {line})", column, max_chars))
    return records


def _csv_records(text: str, name: str, delimiter: str, column: str, max_chars: int) -> list[Record]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise ValueError(f"dataset {name} holds no prompts (empty CSV)") from None
    except csv.Error as exc:
        raise ValueError(f"dataset {name}: CSV header: {exc}") from None
    if column not in header:
        raise ValueError(f"dataset {name}: no column {column!r} (columns: {', '.join(header)})")
    col = header.index(column)
    records = []
    row_i = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise ValueError(f"dataset {name}: CSV line {reader.line_num}: {exc}") from None
        where = f"row {row_i + 1} (line {reader.line_num})"
        if row and any(cell.strip() for cell in row):
            value = row[col] if col < len(row) else ""
            err = _check_text(value, where, max_chars) if value.strip() else f"{where}: empty {column!r}"
            records.append(Record(row_i, reader.line_num, value, err))
        row_i += 1
    return records


def read_dataset(path: str | os.PathLike, column: str = "prompt", *, max_chars: int = MAX_PROMPT_CHARS,
                 format: str | None = None, name: str | None = None) -> Dataset:
    """Read a dataset file (see the module docstring for formats and errors).

    ``name``: how messages call the file (default: its path), e.g. a name relative to a viewer's
    data directory, so that a browser is not shown server paths.
    """
    path = Path(path).expanduser()
    name = str(path) if name is None else name
    if not path.exists():
        raise FileNotFoundError(f"dataset {name} does not exist")
    if not path.is_file():
        raise ValueError(f"dataset {name} is not a file")
    fmt = check_choice("dataset format", format or format_of(path), FORMAT_NAMES)
    size = path.stat().st_size
    if size > MAX_DATASET_BYTES:
        raise ValueError(f"dataset {name}: {size} bytes exceeds the limit of {MAX_DATASET_BYTES}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"dataset {name} cannot be read ({exc.strerror or exc})") from None
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    text = raw.decode("utf-8", "surrogateescape")  # bad bytes survive as lone surrogates, per record
    if fmt == "text":
        records = []
        for i, line in enumerate(text.split("\n")):
            line = line.removesuffix("\r")
            if line.strip():
                records.append(Record(i, i + 1, line, _check_text(line, f"line {i + 1}", max_chars)))
    elif fmt == "jsonl":
        records = _jsonl_records(text, column, max_chars)
    elif fmt == "json":
        records = _json_records(text, name, column, max_chars)
    else:
        records = _csv_records(text, name, "\t" if path.suffix.lower() == ".tsv" else ",", column, max_chars)
    for r in records:
        if r.error is not None:
            r.text = None
    if not records:
        raise ValueError(f"dataset {name} holds no prompts")
    return Dataset(path.resolve(), fmt, hashlib.sha256(raw).hexdigest(), size, records)
