"""Preference rows -> pairs of conversations that share a prompt: (prompt + chosen, prompt + rejected).

Formats (detected per row):

| shape | fields |
|---|---|
| strings | prompt, chosen, rejected (optional system) |
| messages | prompt: [{role, content}], chosen / rejected: a message or a list of messages |
| ShareGPT | conversations: [{from, value}], chosen / rejected: {from, value} or a list |
| full dialogues | chosen / rejected: whole conversations (lists, or HH transcripts "Human: ... Assistant: ...") |

Full dialogues must share everything before their last assistant turn.

Both conversations go through the SFT example builder (`build_examples`, mask `last_assistant`), so only the
response tokens and their end-of-turn token count in the log-probabilities. A pair whose branches are identical,
whose prompts differ, that has no response or that is too long is rejected with a reason, never dropped silently;
with data.truncation=truncate a long pair loses the oldest tokens of its prompt instead, never of its responses.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from sftune.data.dataset import BuiltExamples, build_examples
from sftune.data.formats import RowProblem, to_message
from sftune.data.masking import TruncationPolicy
from sftune.data.sources import read_rows
from sftune.data.templates import ChatTemplate
from sftune.data.types import IGNORE_INDEX, Conversation, Example, Message, Rejection

_TRANSCRIPT = re.compile(r"\n\n(Human|Assistant): ")


@dataclass(frozen=True)
class PreferencePair:
    chosen: Conversation
    rejected: Conversation


@dataclass
class PairExample:
    """Tokenized chosen and rejected branches of one pair; their labels cover the response (+ end token) only."""

    chosen: Example
    rejected: Example
    source: str


def read_pairs(spec: str, system_prompt: str | None = None) -> tuple[list[PreferencePair], list[Rejection]]:
    pairs: list[PreferencePair] = []
    rejected: list[Rejection] = []
    for source, row in read_rows(spec):
        result = to_pair(row, source, system_prompt)
        (rejected if isinstance(result, Rejection) else pairs).append(result)  # type: ignore[arg-type]
    return pairs, rejected


def to_pair(row: Any, source: str, system_prompt: str | None = None) -> PreferencePair | Rejection:
    if not isinstance(row, Mapping):
        return Rejection(source, "wrong_type", f"a row must be an object, got a {type(row).__name__}", row)
    try:
        prompt, chosen, rejected = _branches(row)
    except RowProblem as problem:
        return Rejection(source, problem.reason, problem.detail, row)
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        return Rejection(source, "malformed_row", f"{type(error).__name__}: {error}", row)
    system = row.get("system") if isinstance(row.get("system"), str) and row.get("system") else system_prompt
    if system and not any(m.role == "system" for m in prompt):
        prompt = [Message("system", system), *prompt]
    if not chosen or not rejected or chosen[-1].role != "assistant" or rejected[-1].role != "assistant":
        return Rejection(source, "no_response", "chosen and rejected must each end with an assistant turn", row)
    if [m.as_dict() for m in chosen] == [m.as_dict() for m in rejected]:
        return Rejection(source, "identical_pair", "chosen and rejected are the same: nothing to prefer", row)
    if not any(m.role == "user" for m in prompt):
        return Rejection(source, "no_prompt", "the pair has no user turn to answer", row)
    tools = row.get("tools") if isinstance(row.get("tools"), list) else None
    return PreferencePair(
        Conversation([*prompt, *chosen], source, tools), Conversation([*prompt, *rejected], source, tools)
    )


def _branches(row: Mapping[str, Any]) -> tuple[list[Message], list[Message], list[Message]]:
    """(prompt, chosen continuation, rejected continuation) of a row in any of the supported shapes."""
    if "chosen" not in row or "rejected" not in row:
        raise RowProblem("missing_field", f"a preference row needs 'chosen' and 'rejected' (found: {', '.join(row)})")
    if "prompt" in row or "conversations" in row or "messages" in row:
        prompt_value = row.get("prompt", row.get("conversations", row.get("messages")))
        prompt = _messages(prompt_value, "user")
        return prompt, _messages(row["chosen"], "assistant"), _messages(row["rejected"], "assistant")
    chosen, rejected = _messages(row["chosen"], "assistant"), _messages(row["rejected"], "assistant")
    shared = _shared_prefix_length(chosen, rejected)
    if shared != len(chosen) - 1 or shared != len(rejected) - 1:
        raise RowProblem(
            "prompt_differs",
            "chosen and rejected must be the same conversation up to their last assistant turn, which differs",
        )
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _messages(value: Any, default_role: str) -> list[Message]:
    """A string (plain text, or an HH transcript), one message, or a list of messages."""
    if isinstance(value, str):
        if _TRANSCRIPT.match(value) or value.startswith("Human: "):
            return _transcript(value)
        return [Message(default_role, value)]  # type: ignore[arg-type]
    if isinstance(value, Mapping):
        return [to_message(value, 0)]
    if isinstance(value, list):
        return [to_message(turn, index) for index, turn in enumerate(value)]
    raise RowProblem("wrong_type", f"expected text, a message or a list of messages, got {type(value).__name__}")


def _transcript(text: str) -> list[Message]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' (Anthropic HH) -> user/assistant messages."""
    parts = _TRANSCRIPT.split("\n\n" + text if not text.startswith("\n\n") else text)
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        messages.append(Message("user" if speaker == "Human" else "assistant", content.strip()))
    return messages


def _shared_prefix_length(first: list[Message], second: list[Message]) -> int:
    shared = 0
    for a, b in zip(first, second, strict=False):
        if a.as_dict() != b.as_dict():
            break
        shared += 1
    return shared


@dataclass
class BuiltPairs:
    """What `build_pair_examples` made of a list of pairs: the kept pairs, every rejection with its reason, and
    each branch as the example builder built it (before any prompt truncation), for the mask checks."""

    pairs: list[PairExample]
    rejections: list[Rejection]
    chosen: BuiltExamples
    rejected: BuiltExamples

    @property
    def prompts_truncated(self) -> int:
        return sum(pair.chosen.truncated for pair in self.pairs)


def build_pairs(
    pairs: list[PreferencePair],
    tokenizer: Any,
    template: ChatTemplate,
    max_length: int | None,
    truncation: TruncationPolicy = "drop",
) -> tuple[list[PairExample], list[Rejection]]:
    """The kept pairs and the rejections of `build_pair_examples`."""
    built = build_pair_examples(pairs, tokenizer, template, max_length, truncation)
    return built.pairs, built.rejections


def build_pair_examples(
    pairs: list[PreferencePair],
    tokenizer: Any,
    template: ChatTemplate,
    max_length: int | None,
    truncation: TruncationPolicy = "drop",
) -> BuiltPairs:
    """Both branches through the one example builder (last assistant turn supervised); a pair is kept only when
    both branches are, their prompts tokenize identically and their token ids differ. A pair longer than
    `max_length` is dropped (truncation=drop) or has its shared prompt cut from the left, keeping both responses
    whole (truncation=truncate; dropped where the responses alone leave no room for a prompt)."""

    def build(conversations: list[Conversation]) -> BuiltExamples:  # the pair is cut as one, below
        return build_examples(conversations, tokenizer, template, "last_assistant", max_length=None)

    chosen, rejected = build([p.chosen for p in pairs]), build([p.rejected for p in pairs])
    by_source = {e.source: e for e in rejected.examples}
    rejections = [*chosen.rejections, *rejected.rejections]
    dropped = {r.source for r in rejections}
    kept: list[PairExample] = []
    for example in chosen.examples:
        other = by_source.get(example.source)
        if other is None or example.source in dropped:
            continue
        result = fit_pair(example, other, max_length, truncation, tokenizer.bos_token_id)
        (rejections if isinstance(result, Rejection) else kept).append(result)  # type: ignore[arg-type]
    unique = {r.source: r for r in rejections}  # a pair rejected on both branches counts once
    return BuiltPairs(kept, list(unique.values()), chosen, rejected)


def fit_pair(
    chosen: Example, rejected: Example, max_length: int | None, truncation: TruncationPolicy, bos_id: int | None
) -> PairExample | Rejection:
    """The pair if its branches share their prompt tokens, differ, and fit in `max_length` (after cutting the
    prompt where allowed); else the rejection saying why."""
    source = chosen.source
    prompt = prompt_length(chosen)
    if chosen.input_ids[:prompt] != rejected.input_ids[: prompt_length(rejected)]:
        return Rejection(source, "prompt_differs", "the two branches tokenize different prompts")
    if chosen.input_ids == rejected.input_ids:
        return Rejection(source, "identical_pair", "chosen and rejected tokenize to the same ids: nothing to prefer")
    longest = max(len(chosen.input_ids), len(rejected.input_ids))
    if max_length is None or longest <= max_length:
        return PairExample(chosen, rejected, source)
    if truncation == "drop":
        return Rejection(
            source,
            "too_long",
            f"{longest} tokens > data.max_length={max_length} (data.truncation=drop; data.truncation=truncate cuts "
            "the prompt from the left and keeps both responses)",
        )
    # Keep a leading BOS and at least one prompt token after it: the first response token is predicted from it.
    first = 1 if bos_id is not None and chosen.input_ids[:1] == [bos_id] else 0
    excess = longest - max_length
    if prompt - excess < first + 1:
        return Rejection(
            source,
            "response_too_long",
            f"the longer response takes {longest - prompt} of data.max_length={max_length} tokens: no room is left "
            "for the prompt. Raise data.max_length or shorten the responses",
        )
    return PairExample(cut_prompt(chosen, first, excess), cut_prompt(rejected, first, excess), source)


def prompt_length(example: Example) -> int:
    """Tokens before the first supervised one: the prompt, up to and including the assistant header."""
    return next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)


def cut_prompt(example: Example, start: int, count: int) -> Example:
    """The example without `count` prompt tokens from position `start` on: the oldest context goes first."""
    ids = example.input_ids[:start] + example.input_ids[start + count :]
    labels = example.labels[:start] + example.labels[start + count :]
    return replace(example, input_ids=ids, labels=labels, truncated=True)


def is_preference_data(spec: str) -> bool:
    """Are these rows preference pairs? Their first row has 'chosen' and 'rejected' (any of the formats above)."""
    _, first = read_rows(spec)[0]
    return isinstance(first, Mapping) and "chosen" in first and "rejected" in first
