"""read_rows: every supported file type, where each row came from, and errors that point at the broken spot."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sftune.data.sources import DataError, read_rows

ROWS = [
    {"instruction": "Add 2 and 2.", "input": "", "output": "4"},
    {"instruction": "Say hi, politely", "input": "to Ann", "output": "Hello, Ann."},
    {"instruction": 'Quote: "x"\nthen a newline', "input": "a, b", "output": "done"},
]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- each file type returns the same rows


def test_jsonl_rows_and_one_based_line_sources_skip_blank_lines(tmp_path: Path) -> None:
    lines = [json.dumps(ROWS[0]), "", "   ", json.dumps(ROWS[1]), json.dumps(ROWS[2])]
    rows = read_rows(str(write_jsonl(tmp_path / "train.jsonl", lines)))
    assert [row for _, row in rows] == ROWS
    assert [source for source, _ in rows] == ["train.jsonl:1", "train.jsonl:4", "train.jsonl:5"]


def test_json_list_rows_with_index_sources(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps(ROWS, indent=2))
    rows = read_rows(str(path))
    assert rows == [(f"train.json[{index}]", row) for index, row in enumerate(ROWS)]


def test_json_object_with_one_key_holding_the_list(tmp_path: Path) -> None:
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": ROWS}))
    assert [row for _, row in read_rows(str(path))] == ROWS


def test_csv_rows_with_line_sources_counting_the_header_and_multiline_fields(tmp_path: Path) -> None:
    import csv

    path = tmp_path / "train.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows([ROWS[2], ROWS[0], ROWS[1]])
    rows = read_rows(str(path))
    assert [row for _, row in rows] == [ROWS[2], ROWS[0], ROWS[1]]
    # The first row's instruction spans lines 2-3; each source is the line where its row starts.
    assert [source for source, _ in rows] == ["train.csv:2", "train.csv:4", "train.csv:5"]


def test_parquet_rows_keep_nested_lists(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 2
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    assert read_rows(str(path)) == [("train.parquet[0]", records[0]), ("train.parquet[1]", records[1])]


def test_utf8_byte_order_mark_and_line_separator_inside_strings(tmp_path: Path) -> None:
    row = {"text": "first\u2028second"}  # U+2028 is legal inside a JSON string; it must not split the line
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(row, ensure_ascii=False).encode() + b"\n")
    assert read_rows(str(path)) == [("bom.jsonl:1", row)]


def test_local_dataset_folder_goes_through_datasets_load_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # keep the test hermetic
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [json.dumps(row) for row in ROWS])
    rows = read_rows(str(folder), split="train")
    assert [row for _, row in rows] == ROWS
    assert rows[0][0].endswith(":train[0]")


# ---------------------------------------------------------------- errors name the file, the line and the fix


def test_truncated_jsonl_line_names_file_line_and_column(tmp_path: Path) -> None:
    lines = [json.dumps(ROWS[0]), json.dumps(ROWS[1]), json.dumps(ROWS[2])[:25], json.dumps(ROWS[0])]
    path = write_jsonl(tmp_path / "broken.jsonl", lines)
    with pytest.raises(DataError) as error:
        read_rows(str(path))
    message = str(error.value)
    assert f"{path}:3" in message and "line 3" in message
    assert "column" in message and "not valid JSON" in message


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "lists.jsonl", [json.dumps(ROWS[0]), json.dumps(["a", "b"])])
    with pytest.raises(DataError, match=r"lists\.jsonl:2.*JSON array, not an object"):
        read_rows(str(path))


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(DataError) as error:
        read_rows(str(path))
    assert f"{path}:3" in str(error.value) and "line 3" in str(error.value)


def test_json_file_holding_json_lines_suggests_renaming(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "really_lines.json", [json.dumps(row) for row in ROWS])
    with pytest.raises(DataError, match=r"really_lines\.json:2.*rename it to \.jsonl"):
        read_rows(str(path))


def test_json_object_with_several_keys_lists_them(tmp_path: Path) -> None:
    path = tmp_path / "dict.json"
    path.write_text(json.dumps({"train": ROWS, "meta": {"version": 1}}))
    with pytest.raises(DataError, match=r"keys \[train, meta\]"):
        read_rows(str(path))


def test_json_list_item_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([ROWS[0], "oops"]))
    with pytest.raises(DataError, match=r"mixed\.json\[1\].*string, not an object"):
        read_rows(str(path))


@pytest.mark.parametrize(
    ("name", "content"),
    [("empty.jsonl", ""), ("blank.jsonl", "\n \n"), ("empty.json", "[]"), ("header_only.csv", "instruction,output\n")],
)
def test_files_without_rows_are_errors(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=name.replace(".", r"\.")):
        read_rows(str(path))


def test_csv_row_with_more_fields_than_the_header(tmp_path: Path) -> None:
    path = tmp_path / "ragged.csv"
    path.write_text("instruction,output\nadd,4\nsay hi, politely,hello\n")
    with pytest.raises(DataError, match=r"ragged\.csv:3.*more fields than the header"):
        read_rows(str(path))


def test_missing_file_is_not_sent_to_the_hub(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"typo\.jsonl' does not exist"):
        read_rows(str(tmp_path / "typo.jsonl"))


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'.*\.jsonl"):
        read_rows(str(path))


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl.*not UTF-8"):
        read_rows(str(path))


def test_dataset_name_that_cannot_be_loaded_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def refuse(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'someone/data' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(DataError) as error:
        read_rows("someone/data", split="train")
    message = str(error.value)
    assert "someone/data" in message and "split='train'" in message
    assert "HF_HUB_OFFLINE" in message and "ConnectionError" in message


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="only run where the hub is known to be off")
def test_real_load_dataset_offline_becomes_data_error() -> None:
    with pytest.raises(DataError, match="HF_HUB_OFFLINE"):
        read_rows("sftune-tests/no-such-dataset")
