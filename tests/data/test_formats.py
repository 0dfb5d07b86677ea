"""Rows in every supported format -> Conversation; bad rows -> Rejection with a stable reason; whole files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sftune.config import DataConfig
from sftune.data.formats import (
    FORMATS,
    DataError,
    detect_format,
    read_conversations,
    read_rows,
    split_validation,
    to_conversation,
)
from sftune.data.types import Conversation, Message, Rejection

SHARED_DATA = Path(__file__).parents[3] / "shared" / "data"

SYSTEM = "You are terse."
USER = "What is 2 + 2?"
ANSWER = "4"


def convert(row: dict[str, Any], fmt: str | None = None, **kwargs: Any) -> Conversation:
    """Convert a row that must be accepted, detecting its format unless one is given."""
    result = to_conversation(row, fmt or detect_format(row, kwargs.get("columns")), "test:1", **kwargs)
    assert isinstance(result, Conversation), result
    return result


def reject(row: Any, fmt: str, **kwargs: Any) -> Rejection:
    result = to_conversation(row, fmt, "test:1", **kwargs)
    assert isinstance(result, Rejection), result
    assert result.source == "test:1" and result.row is row
    return result


def pairs(conversation: Conversation) -> list[tuple[str, str]]:
    return [(message.role, message.content) for message in conversation.messages]


# ---------------------------------------------------------------- round trips: one conversation, every format

EXPECTED = [("system", SYSTEM), ("user", USER), ("assistant", ANSWER)]

ROUND_TRIP_ROWS: dict[str, dict[str, Any]] = {
    "alpaca": {"instruction": USER, "input": "", "output": ANSWER, "system": SYSTEM},
    "messages": {
        "messages": [{"role": role, "content": content} for role, content in EXPECTED],
    },
    "sharegpt": {
        "conversations": [{"from": "human", "value": USER}, {"from": "gpt", "value": ANSWER}],
        "system": SYSTEM,
    },
    "prompt_completion": {
        "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
        "completion": [{"role": "assistant", "content": ANSWER}],
    },
}


@pytest.mark.parametrize("fmt", sorted(ROUND_TRIP_ROWS))
def test_every_chat_format_gives_the_same_conversation(fmt: str) -> None:
    row = ROUND_TRIP_ROWS[fmt]
    assert detect_format(row) == fmt
    conversation = convert(row)
    assert pairs(conversation) == EXPECTED
    assert conversation.source == "test:1" and conversation.text is None


def test_messages_round_trip_through_as_dict() -> None:
    original = [
        Message(role="user", content=USER),
        Message(role="assistant", content="", extra={"tool_calls": [{"function": {"name": "add"}}]}),
        Message(role="tool", content="4", extra={"name": "add"}),
        Message(role="assistant", content=ANSWER),
    ]
    conversation = convert({"messages": [message.as_dict() for message in original]})
    assert conversation.messages == original


def test_text_format_keeps_text_and_no_messages() -> None:
    conversation = convert({"text": "Once upon a time."})
    assert conversation.text == "Once upon a time." and conversation.messages == []


def test_every_format_constant_has_a_round_trip() -> None:
    assert set(FORMATS) == set(ROUND_TRIP_ROWS) | {"text"}


# ---------------------------------------------------------------- alpaca


def test_alpaca_input_is_appended_after_a_blank_line() -> None:
    conversation = convert({"instruction": "Translate.", "input": "Bonjour", "output": "Hello"})
    assert pairs(conversation) == [("user", "Translate.\n\nBonjour"), ("assistant", "Hello")]


@pytest.mark.parametrize("empty_input", ["", "  ", None])
def test_alpaca_empty_input_leaves_instruction_alone(empty_input: str | None) -> None:
    conversation = convert({"instruction": "Say hi.", "input": empty_input, "output": "Hi"}, "alpaca")
    assert conversation.messages[0] == Message(role="user", content="Say hi.")


def test_alpaca_history_comes_before_the_current_turn() -> None:
    row = {"instruction": "And 3+3?", "output": "6", "history": [["1+1?", "2"], ["2+2?", "4"]]}
    assert pairs(convert(row)) == [
        ("user", "1+1?"),
        ("assistant", "2"),
        ("user", "2+2?"),
        ("assistant", "4"),
        ("user", "And 3+3?"),
        ("assistant", "6"),
    ]


# ---------------------------------------------------------------- messages and sharegpt details


def test_messages_extra_keys_and_row_tools() -> None:
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    call = [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]
    row = {
        "messages": [
            {"role": "user", "content": USER, "tool_calls": None},  # None: as `datasets` fills absent keys
            {"role": "assistant", "content": None, "tool_calls": call},
            {"role": "tool", "content": "4", "name": "add", "tool_call_id": "c1"},
            {"role": "assistant", "content": ANSWER},
        ],
        "tools": [tool],
    }
    conversation = convert(row)
    assert conversation.tools == [tool]
    assert [message.extra for message in conversation.messages] == [
        {},
        {"tool_calls": call},
        {"name": "add", "tool_call_id": "c1"},
        {},
    ]
    assert conversation.messages[1].content == ""


def test_messages_under_the_conversations_key() -> None:
    row = {"conversations": [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}]}
    assert detect_format(row) == "messages"
    assert pairs(convert(row)) == EXPECTED[1:]


def test_sharegpt_roles_function_calls_and_tools_as_json_string() -> None:
    tools = [{"name": "add", "description": "Add numbers", "parameters": {"type": "object"}}]
    turns = [
        ("system", SYSTEM),
        ("human", USER),
        ("function_call", '{"name": "add", "arguments": {"a": 2, "b": 2}}'),
        ("observation", '{"result": 4}'),
        ("gpt", ANSWER),
        ("user", "Thanks"),
        ("assistant", "You're welcome."),
        ("tool", "{}"),
    ]
    row = {"conversations": [{"from": speaker, "value": value} for speaker, value in turns], "tools": json.dumps(tools)}
    conversation = convert(row)
    assert [message.role for message in conversation.messages] == [
        *("system", "user", "assistant", "tool", "assistant", "user", "assistant", "tool")
    ]
    assert [message.content for message in conversation.messages] == [value for _, value in turns]
    assert conversation.messages[2].extra == {"function_call": True}
    assert all(not message.extra for index, message in enumerate(conversation.messages) if index != 2)
    assert conversation.tools == tools


@pytest.mark.parametrize("tools", ["not json", "", "[]", "42", None])
def test_unusable_tools_become_none(tools: str | None) -> None:
    row = {"conversations": [{"from": "human", "value": USER}, {"from": "gpt", "value": ANSWER}], "tools": tools}
    assert convert(row).tools is None


def test_messages_given_as_json_text_in_a_csv_cell() -> None:
    row = {"messages": json.dumps([{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}])}
    assert detect_format(row) == "messages"
    assert pairs(convert(row)) == EXPECTED[1:]


def test_prompt_completion_strings() -> None:
    assert pairs(convert({"prompt": USER, "completion": ANSWER})) == EXPECTED[1:]


def test_conversation_may_end_with_a_user_turn() -> None:
    row = {"messages": [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}]}
    row["messages"].append({"role": "user", "content": "Thanks"})
    assert pairs(convert(row))[-1] == ("user", "Thanks")


# ---------------------------------------------------------------- system prompt


def test_system_prompt_is_added_only_when_the_conversation_has_none() -> None:
    plain = {"instruction": USER, "output": ANSWER}
    assert pairs(convert(plain, system_prompt="Be nice.")) == [("system", "Be nice."), *EXPECTED[1:]]
    assert pairs(convert(ROUND_TRIP_ROWS["sharegpt"], system_prompt="Be nice.")) == EXPECTED
    assert convert({"text": "raw"}, system_prompt="Be nice.").messages == []


# ---------------------------------------------------------------- column mapping


def test_columns_map_user_names_before_detection_and_conversion() -> None:
    row = {"question": USER, "answer": ANSWER, "id": 7}
    columns = {"instruction": "question", "output": "answer"}
    assert detect_format(row, columns) == "alpaca"
    assert pairs(convert(row, columns=columns)) == EXPECTED[1:]


def test_columns_map_conversation_lists_too() -> None:
    row = {"dialog": [{"from": "human", "value": USER}, {"from": "gpt", "value": ANSWER}]}
    assert detect_format(row, {"conversations": "dialog"}) == "sharegpt"
    assert pairs(convert(row, columns={"conversations": "dialog"})) == EXPECTED[1:]


def test_unknown_canonical_column_suggests_the_closest() -> None:
    with pytest.raises(DataError, match=r"unknown field 'instrucion'.*did you mean 'instruction'"):
        detect_format({"q": "x"}, {"instrucion": "q"})


# ---------------------------------------------------------------- detection errors


def test_no_format_matches_lists_columns_found_and_formats_tried() -> None:
    with pytest.raises(DataError) as error:
        detect_format({"question": USER, "instruction": "x"})
    message = str(error.value)
    assert "[question, instruction]" in message
    for fmt in FORMATS:
        assert f"{fmt} needs" in message
    assert "Closest: alpaca, which also needs 'output'" in message
    assert "data.columns" in message


def test_null_fields_count_as_absent_for_detection() -> None:
    # parquet / `datasets` rows carry every column of the file, set to None where a row has no value
    row = {"messages": None, "instruction": USER, "output": ANSWER, "text": None}
    assert detect_format(row) == "alpaca"


# ---------------------------------------------------------------- rejections: stable reasons, useful details

USER_TURN = {"role": "user", "content": USER}

REJECTED_ROWS: list[tuple[str, dict[str, Any], str, str]] = [
    ("alpaca", {"instruction": USER, "response": ANSWER}, "missing_field", "'output'"),
    ("alpaca", {"instruction": USER, "output": "  \n"}, "empty_response", "empty"),
    ("alpaca", {"instruction": USER, "output": 4}, "wrong_type", "'output' must be a string"),
    ("alpaca", {"instruction": USER, "output": ANSWER, "history": [["only one"]]}, "wrong_type", "history[0]"),
    ("messages", {"messages": "hello"}, "wrong_type", "'messages' must be a list"),
    ("messages", {"messages": [USER_TURN]}, "no_assistant_turn", "roles: user"),
    ("messages", {"messages": []}, "no_assistant_turn", "roles: none"),
    ("messages", {"messages": [USER_TURN, {"role": "bot", "content": "x"}]}, "bad_role", "'bot'"),
    ("messages", {"messages": [USER_TURN, {"role": "assistant", "content": ["x"]}]}, "wrong_type", "message 1"),
    ("messages", {"messages": [USER_TURN, {"role": "assistant", "content": ""}]}, "empty_response", "message 1"),
    ("messages", {"messages": [{"from": "human", "value": USER}]}, "missing_field", "sharegpt"),
    ("messages", {"messages": ["hi"]}, "wrong_type", "message 0"),
    (
        "sharegpt",
        {"conversations": [{"from": "human", "value": USER}, {"from": "bot", "value": "x"}]},
        "bad_role",
        "gpt",
    ),
    ("sharegpt", {"conversations": [{"from": "human", "value": USER}]}, "no_assistant_turn", "roles: user"),
    ("sharegpt", {"conversations": [{"from": "human"}]}, "missing_field", "'value'"),
    ("sharegpt", {"conversations": [{"from": "gpt", "value": None}]}, "wrong_type", "turn 0 value"),
    ("prompt_completion", {"prompt": USER, "completion": ""}, "empty_response", "empty"),
    ("prompt_completion", {"prompt": [USER_TURN], "completion": ANSWER}, "wrong_type", "both"),
    ("text", {"text": "   "}, "empty_text", "empty"),
    ("text", {"text": 3}, "wrong_type", "'text' must be a string"),
]


@pytest.mark.parametrize(("fmt", "row", "reason", "detail_part"), REJECTED_ROWS)
def test_bad_rows_become_rejections_with_stable_reasons(fmt: str, row: dict, reason: str, detail_part: str) -> None:
    rejection = reject(row, fmt)
    assert rejection.reason == reason
    assert detail_part in rejection.detail


def test_missing_field_detail_names_the_field_and_lists_columns_found() -> None:
    rejection = reject({"question": USER, "answer": ANSWER}, "alpaca")
    assert rejection.reason == "missing_field"
    assert "'instruction'" in rejection.detail and "columns found: question, answer" in rejection.detail


def test_bad_role_detail_lists_the_valid_roles() -> None:
    rejection = reject({"messages": [USER_TURN, {"role": "gpt", "content": "x"}]}, "messages")
    assert "system, user, assistant, tool" in rejection.detail
    assert "sharegpt" in rejection.detail  # 'gpt' is a ShareGPT speaker: say which format fits


def test_unknown_format_name_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown data format 'chatml'"):
        to_conversation({"text": "x"}, "chatml", "test:1")


# ---------------------------------------------------------------- whole files


def write_jsonl(path: Path, rows: list[Any]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


GOOD_ROWS: list[dict[str, Any]] = [
    {"instruction": USER, "output": ANSWER},
    ROUND_TRIP_ROWS["messages"],
    ROUND_TRIP_ROWS["sharegpt"],
    {"prompt": USER, "completion": ANSWER},
    {"text": "plain text"},
]
BAD_ROWS: list[dict[str, Any]] = [
    {"instruction": USER, "output": ""},  # empty_response
    {"question": USER},  # unknown_format
    {"messages": [USER_TURN]},  # no_assistant_turn
]


def test_mixed_file_every_row_is_kept_or_rejected(tmp_path: Path) -> None:
    spec = write_jsonl(tmp_path / "mixed.jsonl", GOOD_ROWS + BAD_ROWS)
    kept, rejected, counts = read_conversations(spec, DataConfig(train=spec))
    assert len(kept) + len(rejected) == len(read_rows(spec)) == len(GOOD_ROWS) + len(BAD_ROWS)
    assert sum(counts.values()) == len(GOOD_ROWS) + len(BAD_ROWS)
    assert counts == {"alpaca": 2, "messages": 2, "sharegpt": 1, "prompt_completion": 1, "text": 1, "unknown": 1}
    assert [rejection.reason for rejection in rejected] == ["empty_response", "unknown_format", "no_assistant_turn"]
    assert [rejection.source for rejection in rejected] == ["mixed.jsonl:6", "mixed.jsonl:7", "mixed.jsonl:8"]
    assert [conversation.source for conversation in kept] == [f"mixed.jsonl:{line}" for line in range(1, 6)]


def test_forced_format_rejects_rows_without_its_fields(tmp_path: Path) -> None:
    rows = [{"instruction": USER, "output": ANSWER}, {"text": "plain"}, {"instruction": "x", "output": "y"}]
    spec = write_jsonl(tmp_path / "forced.jsonl", rows)
    kept, rejected, counts = read_conversations(spec, DataConfig(train=spec, format="alpaca"))
    assert len(kept) == 2 and [rejection.reason for rejection in rejected] == ["missing_field"]
    assert counts == {"alpaca": 3}


def test_forced_format_that_fits_no_row_is_an_error(tmp_path: Path) -> None:
    spec = write_jsonl(tmp_path / "sharegpt.jsonl", [ROUND_TRIP_ROWS["sharegpt"]] * 3)
    with pytest.raises(DataError, match=r"data.format is 'alpaca'.*none of the 3 rows.*sharegpt\.jsonl:1"):
        read_conversations(spec, DataConfig(train=spec, format="alpaca"))


def test_file_whose_first_row_has_no_known_format_is_an_error(tmp_path: Path) -> None:
    spec = write_jsonl(tmp_path / "odd.jsonl", [{"q": USER, "a": ANSWER}] * 3)
    with pytest.raises(DataError, match=r"odd\.jsonl:1: no known data format matches the columns found: \[q, a\]"):
        read_conversations(spec, DataConfig(train=spec))


def test_file_level_columns_and_system_prompt(tmp_path: Path) -> None:
    spec = write_jsonl(tmp_path / "qa.jsonl", [{"q": USER, "a": ANSWER}] * 2)
    config = DataConfig(train=spec, columns={"instruction": "q", "output": "a"}, system_prompt=SYSTEM)
    kept, rejected, counts = read_conversations(spec, config)
    assert not rejected and counts == {"alpaca": 2}
    assert all(pairs(conversation) == EXPECTED for conversation in kept)


def test_truncated_jsonl_line_stops_the_read_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "cut.jsonl"
    lines = [json.dumps(row) for row in GOOD_ROWS]
    lines[2] = lines[2][:30]
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"cut\.jsonl:3: line 3, column \d+ is not valid JSON"):
        read_conversations(str(path), DataConfig(train=str(path)))


def test_csv_file_of_alpaca_rows(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text('instruction,input,output\nTranslate.,Bonjour,Hello\n"Add, please",,4\n')
    kept, rejected, _ = read_conversations(str(path), DataConfig(train=str(path)))
    assert not rejected
    assert [pairs(conversation) for conversation in kept] == [
        [("user", "Translate.\n\nBonjour"), ("assistant", "Hello")],
        [("user", "Add, please"), ("assistant", "4")],
    ]


# ---------------------------------------------------------------- real data from ../shared


def shared_file(name: str) -> str:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (../shared is only on CI and developer machines)")
    return str(path)


def test_real_alpaca_demo_loads_cleanly() -> None:
    spec = shared_file("alpaca_en_demo.json")
    kept, rejected, counts = read_conversations(spec, DataConfig(train=spec))
    assert (len(kept), rejected, counts) == (999, [], {"alpaca": 999})
    rows = [row for _, row in read_rows(spec)]
    for conversation, row in zip(kept, rows, strict=True):
        assert conversation.messages[-1] == Message(role="assistant", content=row["output"])
        assert conversation.messages[0].content.startswith(row["instruction"])


def test_real_glaive_toolcall_demo_loads_cleanly() -> None:
    spec = shared_file("glaive_toolcall_en_demo.json")
    kept, rejected, counts = read_conversations(spec, DataConfig(train=spec))
    assert (len(kept), rejected, counts) == (300, [], {"sharegpt": 300})
    rows = [row for _, row in read_rows(spec)]
    for conversation, row in zip(kept, rows, strict=True):
        assert conversation.tools == (json.loads(row["tools"]) or None)  # "[]" (no tools) becomes None
        assert len(conversation.messages) == len(row["conversations"])
        for message, turn in zip(conversation.messages, row["conversations"], strict=True):
            assert message.content == turn["value"]
            if turn["from"] == "function_call":
                assert message.role == "assistant" and message.extra == {"function_call": True}
                assert set(json.loads(message.content)) >= {"name", "arguments"}
            if turn["from"] == "observation":
                assert message.role == "tool"
    function_calls = sum(message.extra.get("function_call", False) for c in kept for message in c.messages)
    assert function_calls == 211  # every function_call turn of the file survived


# ---------------------------------------------------------------- split_validation


@pytest.mark.parametrize(("count", "fraction", "expected_validation"), [(100, 0.1, 10), (10, 0.01, 1), (2, 0.5, 1)])
def test_split_sizes_and_partition(count: int, fraction: float, expected_validation: int) -> None:
    items = list(range(count))
    train, validation = split_validation(items, fraction, seed=0)
    assert len(validation) == expected_validation
    assert sorted(train + validation) == items and not set(train) & set(validation)
    assert train == sorted(train) and validation == sorted(validation)  # original order kept


def test_split_is_deterministic_per_seed() -> None:
    items = list(range(200))
    assert split_validation(items, 0.1, seed=1) == split_validation(items, 0.1, seed=1)
    assert split_validation(items, 0.1, seed=1) != split_validation(items, 0.1, seed=2)


@pytest.mark.parametrize(("items", "fraction"), [([1, 2, 3], 0.0), ([1], 0.5), ([], 0.3)])
def test_split_without_validation(items: list[int], fraction: float) -> None:
    assert split_validation(items, fraction, seed=0) == (items, [])


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_rejects_fractions_outside_zero_to_one(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction must be in"):
        split_validation([1, 2, 3], fraction, seed=0)


def test_split_works_on_conversations() -> None:
    conversations = [Conversation(messages=[], text=str(index)) for index in range(20)]
    train, validation = split_validation(conversations, 0.25, seed=3)
    assert len(validation) == 5 and {c.text for c in train} | {c.text for c in validation} == {
        str(i) for i in range(20)
    }
