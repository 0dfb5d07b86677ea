"""Rows to generate from: a prompt (what inference renders) with its id and, where the row has one, a reference.

Rows are converted exactly as training converts them (`data.formats.to_conversation`, with the run's columns and
system prompt), then cut by the one prompt builder (`data.prompt.prompt_for`): an alpaca row keeps its input
section and history, a chat row its tools and tool turns. Accepts every training format with or without the
answer, plus `question`/`answer` rows (GSM8K style). A final assistant turn, `output`, `completion` or `answer`
is the reference. Rows keep their `id` field, or get their file:line as id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sftune.data.formats import DataError, detect_format, to_conversation
from sftune.data.prompt import can_be_answered, prompt_for
from sftune.data.sources import read_rows
from sftune.data.types import Prompt, Rejection

REFERENCE_FIELDS = ("reference", "completion", "answer", "output", "response")


@dataclass(frozen=True)
class PromptSettings:
    """How rows become prompts: the training run's data settings, so inference converts rows as training did."""

    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    system_prompt: str | None = None  # for rows with no system message of their own


@dataclass(frozen=True)
class PromptRow:
    id: str
    prompt: Prompt  # the conversation up to the reply to generate; ends with a user or tool turn
    reference: str | None

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.prompt.messages

    @property
    def prompt_text(self) -> str:
        return str(self.messages[-1]["content"])


def read_prompt_rows(
    spec: str, max_rows: int | None = None, system_prompt: str | None = None, settings: PromptSettings | None = None
) -> tuple[list[PromptRow], list[Rejection]]:
    """Every row becomes a PromptRow or a Rejection with its reason; the first row must be readable."""
    settings = settings or PromptSettings(system_prompt=system_prompt)
    if system_prompt:
        settings = PromptSettings(settings.format, settings.columns, system_prompt)
    kept: list[PromptRow] = []
    rejected: list[Rejection] = []
    for source, row in read_rows(spec)[:max_rows]:
        result = to_prompt_row(row, source, settings=settings)
        if isinstance(result, Rejection) and not kept and not rejected:
            raise DataError(f"{source}: {result.detail}")
        (rejected if isinstance(result, Rejection) else kept).append(result)  # type: ignore[arg-type]
    return kept, rejected


def to_prompt_row(
    row: Any, source: str, system_prompt: str | None = None, settings: PromptSettings | None = None
) -> PromptRow | Rejection:
    settings = settings or PromptSettings(system_prompt=system_prompt)
    if not isinstance(row, dict):
        return Rejection(source, "wrong_type", f"a row must be an object, got a {type(row).__name__}", row)
    fields = with_inference_aliases(row, settings.columns)
    try:
        fmt = settings.format if settings.format != "auto" else detect_format(fields, settings.columns, False)
    except DataError:
        return no_prompt_field(row, source)
    if fmt == "text":
        return no_prompt_field(row, source)
    conversation = to_conversation(fields, fmt, source, settings.columns, settings.system_prompt, require_answer=False)
    if isinstance(conversation, Rejection):
        return conversation
    messages = conversation.messages
    ends_with_reply = bool(messages) and messages[-1].role == "assistant"
    prompt = prompt_for(conversation) if ends_with_reply else prompt_for(conversation, len(messages))
    reference = messages[-1].content if ends_with_reply else reference_field(row)
    if not can_be_answered(prompt):
        roles = ", ".join(m["role"] for m in prompt.messages) or "none"
        return Rejection(
            source, "no_prompt", f"the conversation must end with a user or tool turn to answer (roles: {roles})"
        )
    return PromptRow(str(row.get("id", source)), prompt, reference)


def with_inference_aliases(row: dict[str, Any], columns: dict[str, str] | None = None) -> dict[str, Any]:
    """`question` is a prompt and `answer`/`reference`/`response` a completion (GSM8K style rows), unless the
    run's data.columns map that column to a field of their own (then the columns decide, as in training)."""
    fields = dict(row)
    mapped = set((columns or {}).values())
    question = fields.get("question") if "question" not in mapped else None
    if "prompt" not in fields and "instruction" not in fields and isinstance(question, str):
        fields["prompt"] = fields.pop("question")
    if isinstance(fields.get("prompt"), str) and "completion" not in fields:
        reference = reference_field({k: v for k, v in fields.items() if k not in mapped})
        if reference is not None:
            fields["completion"] = reference
    return fields


def reference_field(row: dict[str, Any]) -> str | None:
    return next((str(row[f]) for f in REFERENCE_FIELDS if isinstance(row.get(f), str | int | float)), None)


def no_prompt_field(row: dict[str, Any], source: str) -> Rejection:
    found = ", ".join(map(str, row)) or "none"
    return Rejection(
        source,
        "missing_field",
        f"no prompt: expected 'messages', 'conversations', 'prompt', 'question' or 'instruction' (found: {found})",
        row,
    )
