"""Data types shared by every stage of the data pipeline: rows -> Conversation -> Example -> Batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

IGNORE_INDEX = -100  # label value that the loss skips; the one constant for "not supervised"

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. tool_calls, name: passed to the template as-is

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.content, **self.extra}


@dataclass(frozen=True)
class Conversation:
    """One training row in canonical form. `source` says where it came from, for error messages."""

    messages: list[Message]
    source: str = ""  # "file.jsonl:12"
    tools: list[dict[str, Any]] | None = None
    text: str | None = None  # plain-text rows (format "text") are trained on as-is, no template


@dataclass(frozen=True)
class Prompt:
    """What inference renders: the messages before the reply to generate (with the generation prompt) and the
    tools the template shows. Training's parity check and every generation path build it the same way."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Rejection:
    """A row that will not be trained on, and why. Every dropped row becomes one of these."""

    source: str
    reason: str  # short, stable key, e.g. "empty_response", "too_long", "no_supervised_tokens"
    detail: str = ""
    row: Any = None


@dataclass
class Example:
    """A rendered, tokenized example. labels[i] is IGNORE_INDEX or input_ids[i] (no shift here)."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""
    end_token_ids: tuple[int, ...] = ()  # the end-of-turn token closing each supervised turn
    turns_without_end_token: int = 0  # supervised turns the template closed with no special token
    truncated: bool = False
    turn: int | None = None  # message index of the last supervised assistant turn: its prompt is messages[:turn]
    expanded_because: str = ""  # one of the per-turn examples of a row whose template rewrites history: the cause
    header_supervised: bool = False  # the template has no generation prompt: the role header is trained too

    @property
    def num_supervised(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)
