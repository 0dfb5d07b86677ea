"""Rows in the common fine-tuning formats -> `Conversation` (a list of `Message`), or a `Rejection` saying why not.

Formats and the fields each needs (after `data.columns` renames the user's columns to these names):

| format            | fields                                                                          |
|-------------------|---------------------------------------------------------------------------------|
| alpaca            | instruction, output; optional input, system, history ([[user, assistant], ...]) |
| messages          | messages (or conversations): [{role, content, ...}]; optional tools             |
| sharegpt          | conversations (or messages): [{from, value}]; optional system, tools            |
| prompt_completion | prompt, completion: strings, or lists of {role, content}                        |
| text              | text                                                                            |

A file that cannot be read at all raises `DataError`; a single bad row becomes a `Rejection` with a stable
`reason` key, so a run can report how many rows it dropped and why.
"""

from __future__ import annotations

import difflib
import json
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sftune.data.sources import DataError, read_rows
from sftune.data.types import Conversation, Message, Rejection, Role

if TYPE_CHECKING:
    from sftune.config import DataConfig

__all__ = [
    "CANONICAL_FIELDS",
    "FORMATS",
    "DataError",
    "apply_columns",
    "detect_format",
    "read_conversations",
    "read_rows",
    "split_validation",
    "to_conversation",
]

FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion", "text")
CANONICAL_FIELDS = (
    *("instruction", "input", "output", "system", "history", "messages", "conversations"),
    *("tools", "prompt", "completion", "text"),
)
_FORMAT_NEEDS = {  # what the "no format matches" message tells the user
    "alpaca": "instruction, output (optional: input, system, history)",
    "messages": "messages: a list of {role, content}",
    "sharegpt": "conversations: a list of {from, value}",
    "prompt_completion": "prompt, completion",
    "text": "text",
}
_FLAT_FORMAT_FIELDS = {
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
# A row to generate from needs no answer: the fields that name its format then.
_PROMPT_FORMAT_FIELDS = {"alpaca": ("instruction",), "prompt_completion": ("prompt",), "text": ("text",)}
_TURN_LIST_KEYS = ("messages", "conversations")
_ROLES: tuple[Role, ...] = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES: dict[str, Role] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}

T = TypeVar("T")


class _RowProblem(Exception):
    """Raised inside the converters; `to_conversation` turns it into a `Rejection`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------- columns and detection


def apply_columns(row: Mapping[str, Any], columns: Mapping[str, str] | None) -> dict[str, Any]:
    """Rename the user's columns to canonical fields: columns={"output": "answer"} turns row["answer"] into "output"."""
    if not columns:
        return dict(row)
    _check_column_names(columns)
    renamed = {key: value for key, value in row.items() if key not in columns.values()}
    for canonical, column in columns.items():
        if column in row:
            renamed[canonical] = row[column]
    return renamed


def _check_column_names(columns: Mapping[str, str]) -> None:
    for canonical in columns:
        if canonical not in CANONICAL_FIELDS:
            close = difflib.get_close_matches(canonical, CANONICAL_FIELDS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise DataError(
                f"data.columns maps unknown field '{canonical}'{hint}: its keys are the canonical field names "
                f"({', '.join(CANONICAL_FIELDS)}) and its values are your column names"
            )


def detect_format(row: Mapping[str, Any], columns: Mapping[str, str] | None = None, require_answer: bool = True) -> str:
    """Name the format of one row: 'alpaca', 'messages', 'sharegpt', 'prompt_completion' or 'text'. Without
    `require_answer` (a row to generate from), the answer field need not be there."""
    if not isinstance(row, Mapping):
        raise DataError(f"a row must be an object with named fields, got a {type(row).__name__}")
    fields = apply_columns(row, columns)
    turn_key = _turn_list_key(fields)
    if turn_key is not None:
        return _detect_turn_style(fields[turn_key], turn_key)
    for fmt, needed in (_FLAT_FORMAT_FIELDS if require_answer else _PROMPT_FORMAT_FIELDS).items():
        if all(_has(fields, name) for name in needed):
            return fmt
    raise DataError(_describe_unknown_format(row, fields, columns))


def _has(row: Mapping[str, Any], field: str) -> bool:
    # A null counts as absent: parquet and `datasets` fill a column missing from one row with None.
    return row.get(field) is not None


def _turn_list_key(row: Mapping[str, Any]) -> str | None:
    return next((key for key in _TURN_LIST_KEYS if _has(row, key)), None)


def _detect_turn_style(value: Any, key: str) -> str:
    turns = _decode_json_list(value)
    first = turns[0] if isinstance(turns, list) and turns else None
    if isinstance(first, Mapping) and ("from" in first or "value" in first):
        return "sharegpt"
    if isinstance(first, Mapping) and "role" in first:
        return "messages"
    return "messages" if key == "messages" else "sharegpt"  # the usual meaning of each key


def _describe_unknown_format(row: Mapping[str, Any], fields: Mapping[str, Any], columns: Any) -> str:
    tried = "; ".join(f"{fmt} needs {needs}" for fmt, needs in _FORMAT_NEEDS.items())
    mapped = f" (after data.columns {dict(columns)})" if columns else ""
    return (
        f"no known data format matches the columns found: [{', '.join(map(str, row))}]{mapped}. "
        f"Formats tried: {tried}.{_closest_format_hint(fields)} Rename your columns, or map them with data.columns, "
        "e.g. {instruction: question, output: answer}"
    )


def _closest_format_hint(fields: Mapping[str, Any]) -> str:
    scored = [(sum(_has(fields, n) for n in needed), fmt, needed) for fmt, needed in _FLAT_FORMAT_FIELDS.items()]
    found, fmt, needed = max(scored, key=lambda item: item[0])
    if not found:
        return ""
    missing = ", ".join(f"'{name}'" for name in needed if not _has(fields, name))
    return f" Closest: {fmt}, which also needs {missing}."


# ---------------------------------------------------------------- one row -> Conversation | Rejection


def to_conversation(
    row: Mapping[str, Any],
    fmt: str,
    source: str,
    columns: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    require_answer: bool = True,
) -> Conversation | Rejection:
    """Convert one row of format `fmt`; a row that cannot be trained on becomes a Rejection (never an exception).

    Training and inference both convert rows here: without `require_answer` (a row to generate from) the answer
    (alpaca `output`, `completion`) may be missing and the conversation need not hold an assistant turn.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format '{fmt}': use one of {', '.join(FORMATS)}")
    if not isinstance(row, Mapping):
        return Rejection(source, "wrong_type", f"a row must be an object, got a {type(row).__name__}", row)
    fields = apply_columns(row, columns)
    try:
        conversation = _CONVERTERS[fmt](fields, source, require_answer)
        if conversation.text is None:
            conversation = _with_system_prompt(conversation, system_prompt)
            if require_answer:
                _check_trainable(conversation.messages)
    except _RowProblem as problem:
        return Rejection(source, problem.reason, problem.detail, row)
    except (TypeError, ValueError, AttributeError, KeyError, RecursionError) as error:  # a shape no check foresaw
        return Rejection(source, "malformed_row", f"{type(error).__name__}: {error}", row)
    return conversation


def _alpaca_to_conversation(row: Mapping[str, Any], source: str, require_answer: bool = True) -> Conversation:
    instruction = _require_string(row, "instruction", "alpaca")
    output = _require_string(row, "output", "alpaca") if require_answer or _has(row, "output") else None
    query = _optional_string(row, "input")
    user = "\n\n".join(part for part in (instruction, query) if part.strip())
    # Templates that give the input its own section (the built-in alpaca) read these; others use content.
    fields = {"instruction": instruction, "input": query} if query.strip() else {}
    messages = [
        *_history_messages(row.get("history")),
        Message(role="user", content=user, extra=fields),
        *([] if output is None else [Message(role="assistant", content=output)]),
    ]
    return _chat_conversation(row, messages, source)


def _messages_to_conversation(row: Mapping[str, Any], source: str, require_answer: bool = True) -> Conversation:
    key = _require_turn_list_key(row, "messages", "a list of {role, content}")
    turns = _require_turn_list(row[key], key)
    return _chat_conversation(row, [_openai_message(turn, index) for index, turn in enumerate(turns)], source)


def _sharegpt_to_conversation(row: Mapping[str, Any], source: str, require_answer: bool = True) -> Conversation:
    key = _require_turn_list_key(row, "sharegpt", "a list of {from, value}")
    turns = _require_turn_list(row[key], key)
    return _chat_conversation(row, [_sharegpt_message(turn, index) for index, turn in enumerate(turns)], source)


def _prompt_completion_to_conversation(
    row: Mapping[str, Any], source: str, require_answer: bool = True
) -> Conversation:
    prompt = _require(row, "prompt", "prompt_completion")
    if not require_answer and not _has(row, "completion"):
        completion: Any = "" if isinstance(prompt, str) else []
    else:
        completion = _require(row, "completion", "prompt_completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion and not require_answer:
            return _chat_conversation(row, [Message(role="user", content=prompt)], source)
        messages = [Message(role="user", content=prompt), Message(role="assistant", content=completion)]
    elif isinstance(prompt, list) and isinstance(completion, list):
        messages = [_openai_message(turn, index) for index, turn in enumerate([*prompt, *completion])]
    else:
        raise _RowProblem(
            "wrong_type",
            "prompt and completion must both be strings, or both lists of {role, content} messages; got "
            f"{type(prompt).__name__} and {type(completion).__name__}",
        )
    return _chat_conversation(row, messages, source)


def _text_to_conversation(row: Mapping[str, Any], source: str, require_answer: bool = True) -> Conversation:
    text = _require_string(row, "text", "text")
    if not text.strip():
        raise _RowProblem("empty_text", "the 'text' field is empty or whitespace, so there is nothing to train on")
    return Conversation(messages=[], source=source, text=text)


_CONVERTERS = {
    "alpaca": _alpaca_to_conversation,
    "messages": _messages_to_conversation,
    "sharegpt": _sharegpt_to_conversation,
    "prompt_completion": _prompt_completion_to_conversation,
    "text": _text_to_conversation,
}


def parse_turns(row: Mapping[str, Any], source: str) -> list[Message] | Rejection:
    """The turns of a messages/sharegpt row as they are, with no assistant turn required: a prompt to answer."""
    key = _turn_list_key(row)
    if key is None:
        return Rejection(source, "missing_field", "no 'messages' or 'conversations' list", row)
    try:
        turns = _require_turn_list(row[key], key)
        if _detect_turn_style(turns, key) == "sharegpt":
            return [_sharegpt_message(turn, index) for index, turn in enumerate(turns)]
        return [_openai_message(turn, index) for index, turn in enumerate(turns)]
    except _RowProblem as problem:
        return Rejection(source, problem.reason, problem.detail, row)


def to_message(turn: Any, index: int) -> Message:
    """One turn in either shape ({role, content} or ShareGPT {from, value}); a bad turn raises RowProblem."""
    if isinstance(turn, Mapping) and "from" in turn:
        return _sharegpt_message(turn, index)
    return _openai_message(turn, index)


RowProblem = _RowProblem  # public name: raised by to_message, carries a stable `reason`


# ---------------------------------------------------------------- pieces of a conversation


def _chat_conversation(row: Mapping[str, Any], messages: list[Message], source: str) -> Conversation:
    """Attach the row-level fields every chat format may carry: a system message and tool definitions."""
    system = _optional_string(row, "system")
    conversation = Conversation(messages=messages, source=source, tools=_parse_tools(row.get("tools")))
    return _with_system_prompt(conversation, system or None)


def _with_system_prompt(conversation: Conversation, system_prompt: str | None) -> Conversation:
    if not system_prompt or any(message.role == "system" for message in conversation.messages):
        return conversation
    messages = [Message(role="system", content=system_prompt), *conversation.messages]
    return Conversation(messages=messages, source=conversation.source, tools=conversation.tools)


def _history_messages(history: Any) -> list[Message]:
    """LLaMA-Factory's alpaca 'history': earlier turns as [[user, assistant], ...]."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise _RowProblem(
            "wrong_type", f"'history' must be a list of [user, assistant] pairs, got {_describe(history)}"
        )
    messages: list[Message] = []
    for index, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(text, str) for text in pair)):
            raise _RowProblem(
                "wrong_type", f"history[{index}] must be a [user, assistant] pair of strings, got {_describe(pair)}"
            )
        messages += [Message(role="user", content=pair[0]), Message(role="assistant", content=pair[1])]
    return messages


def _openai_message(turn: Any, index: int) -> Message:
    """{role, content, ...}: keys other than role and content (tool_calls, name, ...) go to Message.extra."""
    if not isinstance(turn, Mapping):
        raise _RowProblem(
            "wrong_type", f"message {index} must be an object with role and content, got {_describe(turn)}"
        )
    if "role" not in turn:
        hint = ": it looks like ShareGPT ({from, value}); set data.format to sharegpt or auto" if "from" in turn else ""
        raise _RowProblem("missing_field", f"message {index} has no 'role' (keys found: {', '.join(turn)}){hint}")
    role = turn["role"]
    if role not in _ROLES:
        raise _RowProblem(
            "bad_role",
            f"message {index} has role {role!r}; valid roles: {', '.join(_ROLES)}{_sharegpt_role_hint(role)}",
        )
    extra = _extra_fields(turn, ("role", "content"))
    if "content" not in turn and "tool_calls" not in extra:
        raise _RowProblem("missing_field", f"message {index} has no 'content' (keys found: {', '.join(turn)})")
    content = turn.get("content")
    content = "" if content is None else _check_string(content, f"message {index} content")
    return Message(role=cast(Role, role), content=content, extra=extra)


def _sharegpt_role_hint(role: Any) -> str:
    if isinstance(role, str) and role in _SHAREGPT_ROLES:
        return f" ('{role}' is a ShareGPT 'from' value: set data.format to sharegpt or auto)"
    return ""


def _sharegpt_message(turn: Any, index: int) -> Message:
    """{from, value}: function_call turns become assistant turns marked extra={'function_call': True}."""
    if not isinstance(turn, Mapping):
        raise _RowProblem("wrong_type", f"turn {index} must be an object with from and value, got {_describe(turn)}")
    if "from" not in turn or "value" not in turn:
        missing = "from" if "from" not in turn else "value"
        hint = ": it looks like {role, content}; set data.format to messages or auto" if "role" in turn else ""
        raise _RowProblem("missing_field", f"turn {index} has no '{missing}' (keys found: {', '.join(turn)}){hint}")
    speaker = turn["from"]
    if not isinstance(speaker, str) or speaker not in _SHAREGPT_ROLES:
        valid = ", ".join(_SHAREGPT_ROLES)
        raise _RowProblem("bad_role", f"turn {index} has from={speaker!r}; valid 'from' values: {valid}")
    content = _check_string(turn["value"], f"turn {index} value")
    extra = _extra_fields(turn, ("from", "value"))
    if speaker == "function_call":
        extra["function_call"] = True
    return Message(role=_SHAREGPT_ROLES[speaker], content=content, extra=extra)


def _extra_fields(turn: Mapping[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    # Nulls dropped: `datasets` gives every message every key (tool_calls=None), which templates read as present.
    return {key: value for key, value in turn.items() if key not in known and value is not None}


def _parse_tools(value: Any) -> list[dict[str, Any]] | None:
    """Tool definitions: a list of objects, or that list as a JSON string (glaive, LLaMA-Factory); else None."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(tool, Mapping) for tool in value):
        return [dict(tool) for tool in value]
    return None


def _check_trainable(messages: list[Message]) -> None:
    if not any(message.role == "assistant" for message in messages):
        roles = ", ".join(message.role for message in messages) or "none"
        raise _RowProblem(
            "no_assistant_turn", f"no assistant turn (roles: {roles}), so nothing would be trained on this row"
        )
    first = next((message for message in messages if message.role != "system"), None)
    if first is not None and first.role == "assistant":
        raise _RowProblem(
            "assistant_first",
            "the conversation opens with an assistant turn: there is no prompt for it to answer (start with a user "
            "turn, or drop the opening assistant message)",
        )
    for index, message in enumerate(messages):
        if message.role == "assistant" and not message.content.strip() and not message.extra.get("tool_calls"):
            raise _RowProblem(
                "empty_response", f"assistant message {index} is empty: the model would learn to answer with nothing"
            )


# ---------------------------------------------------------------- field access


def _require(row: Mapping[str, Any], field: str, fmt: str) -> Any:
    if not _has(row, field):
        found = ", ".join(map(str, row)) or "none"
        raise _RowProblem(
            "missing_field",
            f"format '{fmt}' needs the field '{field}', which this row lacks (columns found: {found}); "
            f"rename your column or map it with data.columns, e.g. {{{field}: <your column>}}",
        )
    return row[field]


def _require_string(row: Mapping[str, Any], field: str, fmt: str) -> str:
    return _check_string(_require(row, field, fmt), f"'{field}'")


def _optional_string(row: Mapping[str, Any], field: str) -> str:
    value = row.get(field)
    return "" if value is None else _check_string(value, f"'{field}'")


def _check_string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _RowProblem("wrong_type", f"{what} must be a string, got {_describe(value)}")
    return value


def _require_turn_list_key(row: Mapping[str, Any], fmt: str, shape: str) -> str:
    key = _turn_list_key(row)
    if key is None:
        found = ", ".join(map(str, row)) or "none"
        raise _RowProblem(
            "missing_field",
            f"format '{fmt}' needs the field 'messages' or 'conversations' ({shape}), which this row lacks "
            f"(columns found: {found}); rename your column or map it with data.columns, e.g. {{messages: dialog}}",
        )
    return key


def _require_turn_list(value: Any, key: str) -> list[Any]:
    turns = _decode_json_list(value)
    if not isinstance(turns, list):
        raise _RowProblem("wrong_type", f"'{key}' must be a list of messages, got {_describe(value)}")
    return turns


def _decode_json_list(value: Any) -> Any:
    """A CSV cell can only hold a list as JSON text: decode it, leave anything else as it is."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _describe(value: Any) -> str:
    preview = repr(value)
    return f"{type(value).__name__} {preview[:60]}{'...' if len(preview) > 60 else ''}"


# ---------------------------------------------------------------- whole files


def read_conversations(
    spec: str, data_config: DataConfig
) -> tuple[list[Conversation], list[Rejection], dict[str, int]]:
    """Read `spec` and convert every row: (kept, rejected, rows per detected format); kept + rejected == rows."""
    rows = read_rows(spec, data_config.split)[: data_config.max_rows]
    kept: list[Conversation] = []
    rejected: list[Rejection] = []
    formats: Counter[str] = Counter()
    for source, row in rows:
        fmt = _row_format(source, row, data_config)
        if isinstance(fmt, Rejection):
            if not kept and not rejected:  # the first row: the whole file is most likely in an unknown format
                raise DataError(f"{source}: {fmt.detail}")
            formats["unknown"] += 1
            rejected.append(fmt)
            continue
        formats[fmt] += 1
        result = to_conversation(row, fmt, source, data_config.columns or None, data_config.system_prompt)
        if isinstance(result, Rejection):
            rejected.append(result)
        else:
            kept.append(result)
    _check_forced_format_fits(spec, data_config.format, rejected, len(rows))
    return kept, rejected, dict(formats)


def _row_format(source: str, row: Any, data_config: DataConfig) -> str | Rejection:
    if data_config.format != "auto":
        return data_config.format
    try:
        return detect_format(row, data_config.columns or None)
    except (DataError, TypeError, ValueError, RecursionError) as error:
        return Rejection(source, "unknown_format", str(error), row)


def _check_forced_format_fits(spec: str, fmt: str, rejected: list[Rejection], num_rows: int) -> None:
    missing = [rejection for rejection in rejected if rejection.reason == "missing_field"]
    if fmt != "auto" and len(missing) == num_rows:
        raise DataError(
            f"data.format is '{fmt}', but none of the {num_rows} rows of '{spec}' has its fields "
            f"(first: {missing[0].source}: {missing[0].detail}). Set data.format to auto, or map your columns "
            "with data.columns"
        )


def split_validation(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Hold out round(len * fraction) items (at least 1 when fraction > 0 and len >= 2), chosen by a seeded shuffle.

    Both parts keep the original order; the same seed always holds out the same items.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}: e.g. 0.05 holds out 5% of rows")
    if fraction == 0.0 or len(items) < 2:
        return list(items), []
    num_validation = min(len(items) - 1, max(1, round(len(items) * fraction)))
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:num_validation])
    train = [item for index, item in enumerate(items) if index not in held_out]
    validation = [item for index, item in enumerate(items) if index in held_out]
    return train, validation
