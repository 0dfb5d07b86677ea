"""Conversations -> training examples, with every rejection counted by reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sftune.config import DataConfig, TemplateConfig
from sftune.data.masking import build_example
from sftune.data.templates import ChatTemplate
from sftune.data.types import Conversation, Example, Rejection


@dataclass
class PreparedData:
    """What will be trained and evaluated on, and everything that will not, with the reason."""

    train: list[Example]
    validation: list[Example]
    rejections: list[Rejection]
    rows_in: int
    formats: dict[str, int] = field(default_factory=dict)
    validation_prompts: list[list[dict[str, Any]]] = field(default_factory=list)  # for sample generations

    def end_token_ids(self) -> list[int]:
        """The end-of-turn token ids that close the supervised turns: where generation must stop."""
        return sorted({i for e in self.train for i in e.end_token_ids})

    def rejected_by_reason(self) -> dict[str, int]:
        return dict(Counter(r.reason for r in self.rejections))

    def counts(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in,
            "rows_trained": len(self.train),
            "rows_validation": len(self.validation),
            "rows_rejected": len(self.rejections),
            "rejected_by_reason": self.rejected_by_reason(),
            "formats": self.formats,
            "supervised_tokens": sum(e.num_supervised for e in self.train),
            "tokens": sum(len(e.input_ids) for e in self.train),
            "rows_truncated": sum(e.truncated for e in self.train),
        }


def build_examples(
    conversations: list[Conversation], tokenizer: Any, template: ChatTemplate, data: DataConfig, mask: TemplateConfig
) -> tuple[list[Example], list[Rejection]]:
    examples: list[Example] = []
    rejections: list[Rejection] = []
    for conversation in conversations:
        result = build_example(tokenizer, template, conversation, mask.mask, data.max_length, data.truncation)
        (rejections if isinstance(result, Rejection) else examples).append(result)  # type: ignore[arg-type]
    return examples, rejections
