"""Read raw rows from local files or a `datasets` name, each tagged with where it came from.

Every row comes back as `(source, row)`, where `source` points a person at the row: `train.jsonl:12` (1-based
line), `train.json[3]` (0-based index), `train.csv:5` (1-based line, header included), `train.parquet[3]`.
Problems with the file itself (malformed JSON, an empty file) raise `DataError`, naming the file and line.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from sftune.config import DATA_FILE_SUFFIXES, UserError

__all__ = ["DataError", "SUPPORTED_EXTENSIONS", "read_rows"]

SUPPORTED_EXTENSIONS = DATA_FILE_SUFFIXES

Row = dict[str, Any]


class DataError(UserError, ValueError):
    """Data that cannot be used as given; the message names the file, line or field and how to fix it."""


def read_rows(spec: str, split: str = "train") -> list[tuple[str, Any]]:
    """Read rows from a .json/.jsonl/.csv/.parquet file, or else from `datasets.load_dataset(spec, split=split)`."""
    path = Path(spec)
    if path.is_file():
        rows = _read_file(path)
    elif path.suffix.lower() in SUPPORTED_EXTENSIONS:
        # Looks like a file name: a typo here should not turn into a confusing hub lookup.
        where = "" if path.is_absolute() else f", looked for at {path.resolve()} (the working directory)"
        raise DataError(
            f"data file '{spec}' does not exist{where}: check the path (paths in a YAML file start from "
            "the YAML file's folder, paths on the command line from the working directory)"
        )
    else:
        rows = _read_hub_dataset(spec, split)
    if not rows:
        raise DataError(f"'{spec}' contains no rows: point data.train at a file with at least one example")
    return rows


def _read_file(path: Path) -> list[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"'{path}' is empty: it needs at least one example")
    if suffix == ".jsonl":
        return _parse_jsonl(text, path)
    if suffix == ".json":
        return _parse_json(text, path)
    if suffix == ".csv":
        return _parse_csv(text, path)
    raise DataError(
        f"'{path}': unsupported file type '{suffix}': use one of {', '.join(SUPPORTED_EXTENSIONS)} "
        "(or rename the file if its content is one of these)"
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate the byte-order mark some editors write
    except UnicodeDecodeError as exc:
        raise DataError(f"'{path}' is not UTF-8 text (byte {exc.start}): re-save it with UTF-8 encoding") from None


def _parse_jsonl(text: str, path: Path) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    # split("\n"), not splitlines(): a JSON string may hold a raw U+2028, which splitlines() would cut at.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{line_number}: line {line_number}, column {exc.colno} is not valid JSON ({exc.msg}): "
                "each line of a .jsonl file must be one complete JSON object; fix or delete that line"
            ) from None
        except RecursionError:
            raise DataError(f"{path}:{line_number}: line {line_number} is nested too deeply to read") from None
        if not isinstance(row, dict):
            raise DataError(
                f"{path}:{line_number}: line {line_number} is a JSON {_json_type(row)}, not an object: "
                'each line of a .jsonl file must be one object such as {"instruction": ..., "output": ...}'
            )
        rows.append((f"{path.name}:{line_number}", row))
    return rows


def _parse_json(text: str, path: Path) -> list[tuple[str, Any]]:
    try:
        document = json.loads(text)
    except RecursionError:
        raise DataError(f"{path}: the JSON is nested too deeply to read") from None
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{exc.lineno}: line {exc.lineno}, column {exc.colno} is not valid JSON ({exc.msg})"
            f"{_jsonl_hint(text, exc)}"
        ) from None
    records = _find_record_list(document, path)
    rows: list[tuple[str, Any]] = []
    for index, row in enumerate(records):
        if not isinstance(row, dict):
            raise DataError(
                f"{path}[{index}]: item {index} is a JSON {_json_type(row)}, not an object: "
                "the file must be a list of objects, one per example"
            )
        rows.append((f"{path.name}[{index}]", row))
    return rows


def _jsonl_hint(text: str, exc: json.JSONDecodeError) -> str:
    """A .json file holding one object per line fails with 'Extra data' on line 2: say what it really is."""
    if exc.msg == "Extra data" and exc.lineno > 1:
        return ": the file looks like JSON Lines (one object per line); rename it to .jsonl"
    return ": fix the file (a JSON validator shows the exact spot)"


def _find_record_list(document: Any, path: Path) -> list[Any]:
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        lists = [key for key, value in document.items() if isinstance(value, list)]
        if len(document) == 1 and lists:
            return document[lists[0]]
        keys = ", ".join(list(document)[:10])
        raise DataError(
            f"'{path}' holds a JSON object with keys [{keys}], not a list of examples: make the file a list of "
            'objects, or an object with one key holding that list, e.g. {"data": [...]}'
        )
    raise DataError(f"'{path}' holds a JSON {_json_type(document)}: it must be a list of objects, one per example")


def _parse_csv(text: str, path: Path) -> list[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    num_columns = len(reader.fieldnames or [])  # reads the header, so line_num counts it
    rows: list[tuple[str, Any]] = []
    while True:
        line_number = reader.line_num + 1  # where the next row starts; a quoted field may span lines
        try:
            row = next(reader)
        except StopIteration:
            return rows
        except csv.Error as exc:
            raise DataError(f"{path}:{line_number}: line {line_number} is not valid CSV ({exc})") from None
        if None in row:
            raise DataError(
                f"{path}:{line_number}: line {line_number} has more fields than the header "
                f"({num_columns} columns): quote fields that contain commas"
            )
        rows.append((f"{path.name}:{line_number}", row))


def _read_parquet(path: Path) -> list[tuple[str, Any]]:
    import pyarrow.parquet as pq  # heavy import, only when a parquet file is read

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for unreadable files
        raise DataError(f"'{path}' could not be read as Parquet ({type(exc).__name__}: {exc})") from None
    return [(f"{path.name}[{index}]", row) for index, row in enumerate(records)]


def _read_hub_dataset(spec: str, split: str) -> list[tuple[str, Any]]:
    import datasets  # heavy import, only when the data is not a local file

    try:
        dataset = datasets.load_dataset(spec, split=split)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        raise DataError(
            f"'{spec}' is not a local file, and datasets.load_dataset('{spec}', split='{split}') could not load it "
            f"({type(exc).__name__}: {exc}). If it is a hub dataset, HF_HUB_OFFLINE=1 or no network may be why: "
            "download it once with network access, or pass a local .json/.jsonl/.csv/.parquet file instead"
        ) from None
    return [(f"{spec}:{split}[{index}]", row) for index, row in enumerate(dataset)]


def _json_type(value: Any) -> str:
    names = {list: "array", dict: "object", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
