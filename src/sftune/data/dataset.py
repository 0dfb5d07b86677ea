"""Conversations -> training examples, with every rejection counted by reason.

`build_examples` is the one place where examples are built: training and validation rows, the data check
(`sftune data check`, `sftune data inspect`) and `sftune eval`'s loss all call it, so what is checked, shown
and measured is exactly what is trained.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sftune.data.masking import (
    HistoryRewrite,
    MaskMode,
    PrefixError,
    TruncationPolicy,
    build_example,
    find_special_text,
    special_token_texts,
)
from sftune.data.templates import ChatTemplate, TemplateError, TemplateRenderError
from sftune.data.types import Conversation, Example, Prompt, Rejection

DOUBLE_BOS = "double_bos"
TEMPLATE_ERROR = "template_error"  # the template cannot render this row incrementally, not even turn by turn
TEMPLATE_RAISED = "template_raised"  # the template's own code raised on this row (e.g. "roles must alternate")
ROW_ERROR = "row_error"  # the tokenizer or anything else failed on this row
SPECIAL_TOKEN_IN_CONTENT = "special_token_in_content"  # a message holds the text of a special token, e.g. '</s>'


@dataclass
class BuiltExamples:
    """What `build_examples` made of a list of conversations: each one is an example (or, for a row whose template
    rewrites history, one example per assistant turn) or a rejection."""

    examples: list[Example]
    rejections: list[Rejection]
    conversations: list[Conversation]  # aligned with `examples`: the conversation each one was built from
    rows_kept: int = 0  # conversations that gave at least one example
    expanded_rows: int = 0  # rows expanded into one example per assistant turn
    expansion_extra_tokens: int = 0  # tokens those rows cost beyond one example each
    prefix_failures: dict[str, int] = field(default_factory=dict)  # cause -> rows (expanded or rejected)


def build_examples(
    conversations: list[Conversation],
    tokenizer: Any,
    template: ChatTemplate,
    mask: MaskMode = "assistant",
    max_length: int | None = None,
    truncation: TruncationPolicy = "drop",
    limit: int | None = None,
    history_rewrite: HistoryRewrite = "expand",
) -> BuiltExamples:
    """Render, tokenize and mask each conversation; stop once `limit` examples are built (None: all).

    A row that cannot be built (two BOS tokens, a template that raises on it or cannot render it incrementally,
    a tokenizer error, a message holding a special token's text) becomes a Rejection with its source and the
    reason, never an exception that stops the set.
    """
    built = BuiltExamples([], [], [])
    causes: Counter[str] = Counter()
    special_texts = special_token_texts(tokenizer)
    for conversation in rows_progress(conversations, limit):
        if limit is not None and len(built.examples) >= limit:
            break
        found = None if conversation.text is not None else find_special_text(conversation, special_texts)
        if found is not None:
            built.rejections.append(special_token_rejection(conversation, found))
            continue
        result = build_one(tokenizer, template, conversation, mask, max_length, truncation, history_rewrite, causes)
        if isinstance(result, Rejection):
            built.rejections.append(result)
            continue
        examples = result if isinstance(result, list) else [result]
        built.examples += examples
        built.conversations += [conversation] * len(examples)
        built.rows_kept += 1
        if isinstance(result, list):
            built.expanded_rows += 1
            built.expansion_extra_tokens += sum(len(e.input_ids) for e in examples[:-1])
    built.prefix_failures = dict(causes)
    return built


# From this many rows on, rendering and masking every row takes long enough (seconds to minutes) to show a bar.
PROGRESS_FROM_ROWS = 2000


def rows_progress(conversations: list[Conversation], limit: int | None) -> Iterable[Conversation]:
    """The conversations, behind a progress bar on stderr when there are many to build (and it is a terminal)."""
    if limit is not None or len(conversations) < PROGRESS_FROM_ROWS:
        return conversations
    from tqdm.auto import tqdm

    return tqdm(conversations, desc="checking rows", unit="row", leave=False, mininterval=1.0, disable=None)


def build_one(
    tokenizer: Any,
    template: ChatTemplate,
    conversation: Conversation,
    mask: MaskMode,
    max_length: int | None,
    truncation: TruncationPolicy,
    history_rewrite: HistoryRewrite,
    causes: Counter[str],
) -> Example | list[Example] | Rejection:
    """One conversation through `build_example`, every failure turned into a Rejection with its reason."""
    source = conversation.source
    try:
        result = build_example(tokenizer, template, conversation, mask, max_length, truncation, history_rewrite)
    except PrefixError as error:
        causes[error.cause] += 1
        return Rejection(source, TEMPLATE_ERROR, str(error))
    except TemplateRenderError as error:
        return Rejection(source, TEMPLATE_RAISED, f"{source}: {error}")
    except TemplateError as error:
        reason = DOUBLE_BOS if "two BOS" in str(error) else TEMPLATE_ERROR
        return Rejection(source, reason, str(error))
    except Exception as error:  # a tokenizer failing on one row's text must not stop the others
        return Rejection(source, ROW_ERROR, f"{source}: {type(error).__name__}: {error}")
    if isinstance(result, list) and result:
        causes[result[0].expanded_because] += 1
    return result


def special_token_rejection(conversation: Conversation, found: str) -> Rejection:
    return Rejection(
        conversation.source,
        SPECIAL_TOKEN_IN_CONTENT,
        f"{conversation.source}: {found}, the text of a special token: the tokenizer reads it as that control token, "
        "not as the characters written, so the model would see (and, in a reply, learn to write) the token mid-turn. "
        "Remove or rewrite that text in the data (e.g. '< /s>')",
    )


@dataclass
class PreparedData:
    """What will be trained and evaluated on, and everything that will not, with the reason."""

    train: list[Example]
    validation: list[Example]
    rejections: list[Rejection]
    rows_in: int
    formats: dict[str, int] = field(default_factory=dict)
    validation_prompts: list[Prompt] = field(default_factory=list)  # for sample generations
    report: Any = None  # the DataReport of these very examples (data/check.py)
    train_rows: int | None = None  # rows behind `train` (fewer than examples where rows were expanded per turn)
    validation_rows: int | None = None

    def end_token_ids(self) -> list[int]:
        """The end-of-turn token ids that close the supervised turns: where generation must stop."""
        return sorted({i for e in self.train for i in e.end_token_ids})

    def rejected_by_reason(self) -> dict[str, int]:
        return dict(Counter(r.reason for r in self.rejections))

    def counts(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in,
            "rows_train": len(self.train) if self.train_rows is None else self.train_rows,
            "rows_validation": len(self.validation) if self.validation_rows is None else self.validation_rows,
            "examples_train": len(self.train),
            "examples_validation": len(self.validation),
            "rows_rejected": len(self.rejections),
            "rejected_by_reason": self.rejected_by_reason(),
            "formats": self.formats,
            "supervised_tokens": sum(e.num_supervised for e in self.train),
            "tokens": sum(len(e.input_ids) for e in self.train),
            "rows_truncated": sum(e.truncated for e in self.train),
        }
