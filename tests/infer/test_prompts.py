"""Rows to generate from: every training format with or without its answer; ids kept; bad rows counted."""

from __future__ import annotations

import json

import pytest

from sftune.data.formats import DataError
from sftune.infer.prompts import read_prompt_rows, to_prompt_row


def test_every_format_gives_a_prompt_ending_with_a_user_turn_and_its_reference():
    rows = [
        {"id": "a", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"id": "b", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]},
        {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
        {"instruction": "Translate", "input": "Good morning", "output": "Guten Morgen"},
        {"prompt": "Capital of France?", "completion": "Paris"},
        {"question": "3*4?", "answer": "Twelve.\n#### 12"},
        {"prompt": "No answer given"},
    ]
    results = [to_prompt_row(row, f"f.jsonl:{i + 1}") for i, row in enumerate(rows)]
    assert all(r.messages[-1]["role"] == "user" for r in results)
    assert [r.id for r in results[:3]] == ["a", "b", "f.jsonl:3"]  # a row's own id, else where it came from
    assert [r.reference for r in results] == ["Hello", None, "4", "Guten Morgen", "Paris", "Twelve.\n#### 12", None]
    assert results[1].messages[0] == {"role": "system", "content": "S"}
    assert results[3].prompt_text == "Translate\n\nGood morning"  # joined as the alpaca converter does in training


def test_bad_rows_are_rejected_with_a_reason_and_a_bad_first_row_is_an_error(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [
        {"id": 1, "prompt": "fine"},
        {
            "id": 2,
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": "y"},
                {"role": "assistant", "content": "z"},
            ],
        },  # noqa: E501
        {"id": 3, "text": "no prompt field"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in lines))
    kept, rejected = read_prompt_rows(str(path))
    assert [r.id for r in kept] == ["1"]
    assert [r.reason for r in rejected] == ["no_prompt", "missing_field"]
    assert len(kept) + len(rejected) == len(lines)  # nothing lost silently

    path.write_text(json.dumps({"text": "only text"}) + "\n")
    with pytest.raises(DataError, match="prompts.jsonl:1"):
        read_prompt_rows(str(path))
