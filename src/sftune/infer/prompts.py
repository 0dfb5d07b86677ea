"""Rows to generate from: a prompt (messages up to the reply) with its id and, where the row has one, a reference.

Accepts the training formats (messages / sharegpt turn lists, alpaca, prompt/completion) with or without the
answer, plus `question`/`answer` rows (GSM8K style). A final assistant turn, `output`, `completion` or `answer`
is the reference. Rows keep their `id` field, or get their file:line as id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sftune.data.formats import DataError, parse_turns
from sftune.data.sources import read_rows
from sftune.data.types import Message, Rejection

PROMPT_FIELDS = ("prompt", "question", "instruction")
REFERENCE_FIELDS = ("reference", "completion", "answer", "output", "response")


@dataclass(frozen=True)
class PromptRow:
    id: str
    messages: list[dict[str, Any]]  # the conversation up to the reply to generate; ends with a user turn
    reference: str | None

    @property
    def prompt_text(self) -> str:
        return str(self.messages[-1]["content"])


def read_prompt_rows(
    spec: str, max_rows: int | None = None, system_prompt: str | None = None
) -> tuple[list[PromptRow], list[Rejection]]:
    """Every row becomes a PromptRow or a Rejection with its reason; the first row must be readable."""
    kept: list[PromptRow] = []
    rejected: list[Rejection] = []
    for source, row in read_rows(spec)[:max_rows]:
        result = to_prompt_row(row, source, system_prompt)
        if isinstance(result, Rejection) and not kept and not rejected:
            raise DataError(f"{source}: {result.detail}")
        (rejected if isinstance(result, Rejection) else kept).append(result)  # type: ignore[arg-type]
    return kept, rejected


def to_prompt_row(row: Any, source: str, system_prompt: str | None = None) -> PromptRow | Rejection:
    if not isinstance(row, dict):
        return Rejection(source, "wrong_type", f"a row must be an object, got a {type(row).__name__}", row)
    messages = prompt_messages(row, source)
    if isinstance(messages, Rejection):
        return messages
    reference = None
    if messages[-1].role == "assistant":
        reference = messages.pop().content
    else:
        reference = next((str(row[f]) for f in REFERENCE_FIELDS if isinstance(row.get(f), str | int | float)), None)
    if not messages or messages[-1].role != "user":
        roles = ", ".join(m.role for m in messages) or "none"
        return Rejection(source, "no_prompt", f"the conversation must end with a user turn to answer (roles: {roles})")
    # As in training: the row's own system message, else the default one, never both.
    system = row["system"] if isinstance(row.get("system"), str) and row["system"] else system_prompt
    if system and messages[0].role != "system":
        messages.insert(0, Message(role="system", content=system))
    return PromptRow(str(row.get("id", source)), [m.as_dict() for m in messages], reference)


def prompt_messages(row: dict[str, Any], source: str) -> list[Message] | Rejection:
    if "messages" in row or "conversations" in row:
        return parse_turns(row, source)
    field = next((f for f in PROMPT_FIELDS if isinstance(row.get(f), str) and row[f].strip()), None)
    if field is None:
        found = ", ".join(map(str, row)) or "none"
        return Rejection(
            source,
            "missing_field",
            f"no prompt: expected 'messages', 'conversations', 'prompt', 'question' or 'instruction' (found: {found})",
            row,
        )
    content = row[field]
    if field == "instruction" and isinstance(row.get("input"), str) and row["input"].strip():
        content = f"{content}\n\n{row['input']}"  # as the alpaca converter joins them for training
    return [Message(role="user", content=content)]
