"""Conversations -> training examples, with every rejection counted by reason.

`build_examples` is the one place where examples are built: training and validation rows, the data check
(`sftune data check`, `sftune data inspect`) and `sftune eval`'s loss all call it, so what is checked, shown
and measured is exactly what is trained.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sftune.data.masking import MaskMode, TruncationPolicy, build_example
from sftune.data.templates import ChatTemplate, TemplateError
from sftune.data.types import Conversation, Example, Rejection

DOUBLE_BOS = "double_bos"
TEMPLATE_ERROR = "template_error"


@dataclass
class BuiltExamples:
    """What `build_examples` made of a list of conversations: each one is an example or a rejection."""

    examples: list[Example]
    rejections: list[Rejection]
    conversations: list[Conversation]  # aligned with `examples`: the conversation each one was built from


def build_examples(
    conversations: list[Conversation],
    tokenizer: Any,
    template: ChatTemplate,
    mask: MaskMode = "assistant",
    max_length: int | None = None,
    truncation: TruncationPolicy = "drop",
    limit: int | None = None,
) -> BuiltExamples:
    """Render, tokenize and mask each conversation; stop once `limit` examples are built (None: all).

    A row the template cannot render correctly (two BOS tokens, a template that rewrites earlier turns, a
    template's own exception) becomes a Rejection with its source and the reason, never an exception that
    stops the whole set.
    """
    built = BuiltExamples([], [], [])
    for conversation in conversations:
        if limit is not None and len(built.examples) >= limit:
            break
        try:
            result = build_example(tokenizer, template, conversation, mask, max_length, truncation)
        except TemplateError as error:
            reason = DOUBLE_BOS if "two BOS" in str(error) else TEMPLATE_ERROR
            built.rejections.append(Rejection(conversation.source, reason, str(error)))
            continue
        if isinstance(result, Rejection):
            built.rejections.append(result)
        else:
            built.examples.append(result)
            built.conversations.append(conversation)
    return built


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
