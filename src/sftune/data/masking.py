"""Render a conversation and build its loss mask in one pass.

The mask comes from incremental prefix rendering: for assistant turn i, the text the template produces for
messages[:i] with the generation prompt is a prefix of the text for messages[:i + 1]; the characters between
the two are what the model must learn to write. We never search the text for marker strings. Within that span,
supervision runs up to and including the end-of-turn token, found structurally: the first special token after
the turn's content that the next turn's generation prompt does not open with. Whatever the template writes after
it (a newline, an end-of-text token appended to the whole conversation) belongs to the scaffolding. Padding is
handled by position (in collate), never by token id, so a tokenizer whose pad == eos still trains its EOS.

Templates that rewrite history (drop `<think>` blocks of earlier turns, move the system message, append an end
token only after the last turn) break the prefix property for the whole conversation. Such a row is expanded
(the default) into one example per assistant turn, each rendered exactly as inference renders the conversation
at that turn, with only that turn supervised: train = inference by construction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from sftune.data.templates import ChatTemplate, TemplateError, render
from sftune.data.types import IGNORE_INDEX, Conversation, Example, Rejection

MaskMode = Literal["assistant", "last_assistant", "all"]
TruncationPolicy = Literal["drop", "truncate"]
HistoryRewrite = Literal["expand", "last_assistant", "reject"]

# Causes of a prefix failure, named in the report.
HISTORY_REWRITTEN = "history_rewritten"
GENERATION_PROMPT_NOT_PREFIX = "generation_prompt_not_prefix"
TEXT_APPENDED_AFTER_LAST_TURN = "text_appended_after_last_turn"
PREFIX_CAUSES = {
    HISTORY_REWRITTEN: "the template renders earlier turns differently once a later turn is added",
    GENERATION_PROMPT_NOT_PREFIX: "the generation prompt is not how the template opens the assistant turn",
    TEXT_APPENDED_AFTER_LAST_TURN: "the template appends text after the last turn only",
}


class PrefixError(TemplateError):
    """The prefix property fails for a conversation; `cause` is one of PREFIX_CAUSES."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


def special_token_ids(tokenizer: Any) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def special_token_texts(tokenizer: Any) -> tuple[str, ...]:
    """The literal texts the tokenizer reads as special (control) tokens: BOS, EOS, pad, unk and every added special
    token (e.g. '<|im_end|>', '</s>'), longest first."""
    texts = {str(token) for token in tokenizer.all_special_tokens}
    texts.update(token.content for token in tokenizer.added_tokens_decoder.values() if token.special)
    return tuple(sorted((text for text in texts if text), key=lambda text: (-len(text), text)))


def find_special_text(conversation: Conversation, special_texts: tuple[str, ...]) -> str | None:
    """Where a message (its content, or a string in its extras such as tool-call arguments) or the tools hold the
    text of a special token: 'assistant message 3 contains '</s>'' (None where nothing does). The tokenizer would
    read that text as the control token itself, mid-turn, not as the characters written."""
    places: list[tuple[str, list[Any]]] = [
        (f"{m.role} message {k}", [m.content, m.extra]) for k, m in enumerate(conversation.messages)
    ]
    places.append(("the tools", [conversation.tools]))
    for place, values in places:
        for text in _strings(values):
            found = next((special for special in special_texts if special in text), None)
            if found is not None:
                return f"{place} contains {found!r}"
    return None


def _strings(value: Any) -> list[str]:
    """Every string inside nested lists and dicts (keys included)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in (*_strings(key), *_strings(item))]
    if isinstance(value, list | tuple):
        return [s for item in value for s in _strings(item)]
    return []


def adds_bos(tokenizer: Any) -> bool:
    """Does the tokenizer put a BOS in front of plain text? Then rendered text needs one too (once)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


# ------------------------------------------------------------------------------------ spans of the text


@dataclass(frozen=True)
class TurnSpan:
    """The characters [start, end) that assistant message `index` adds to the rendered text."""

    index: int
    start: int
    end: int
    header_supervised: bool = False  # the template has no generation prompt: the span starts with the role header


def assistant_char_spans(
    tokenizer: Any, template: ChatTemplate, conversation: Conversation, mode: MaskMode
) -> tuple[str, list[TurnSpan]]:
    """Full rendered text and the span of each supervised assistant turn; a PrefixError naming the cause when
    the template does not render the conversation incrementally."""
    messages = [m.as_dict() for m in conversation.messages]
    full = render(tokenizer, template, messages, add_generation_prompt=False, tools=conversation.tools)
    turns = assistant_turns(conversation, mode)
    spans = []
    for i in turns:
        prompt, upto = turn_texts(tokenizer, template, conversation, i)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            cause = prefix_failure_cause(tokenizer, template, conversation, i, prompt, upto, full)
            raise PrefixError(
                f"{conversation.source}: template '{template.name}' is not prefix-consistent at message {i}: "
                f"{PREFIX_CAUSES[cause]} ({cause}), so one mask for the whole conversation cannot be derived",
                cause,
            )
        spans.append(turn_span(tokenizer, template, conversation, i, prompt, upto))
    return full, spans


def assistant_turns(conversation: Conversation, mode: MaskMode) -> list[int]:
    turns = [i for i, m in enumerate(conversation.messages) if m.role == "assistant"]
    return turns[-1:] if mode == "last_assistant" else turns


def turn_texts(tokenizer: Any, template: ChatTemplate, conversation: Conversation, i: int) -> tuple[str, str]:
    """(the inference prompt before assistant turn i, the text up to and including turn i)."""
    messages = [m.as_dict() for m in conversation.messages[: i + 1]]
    tools = conversation.tools
    prompt = render(tokenizer, template, messages[:i], add_generation_prompt=True, tools=tools)
    upto = render(tokenizer, template, messages, add_generation_prompt=False, tools=tools)
    return prompt, upto


def turn_span(
    tokenizer: Any, template: ChatTemplate, conversation: Conversation, i: int, prompt: str, upto: str
) -> TurnSpan:
    """The span turn i adds; it starts with the role header when the generation prompt adds nothing."""
    messages = [m.as_dict() for m in conversation.messages[:i]]
    no_generation_prompt = prompt == render(tokenizer, template, messages, False, conversation.tools)
    specials = special_token_texts(tokenizer)
    content = content_range(upto, len(prompt), len(upto), conversation.messages[i].content, specials)
    header = no_generation_prompt and content is not None and upto[len(prompt) : content[0]].strip() != ""
    return TurnSpan(i, len(prompt), len(upto), header)


def content_range(
    text: str, start: int, end: int, content: str, special_texts: tuple[str, ...] = ()
) -> tuple[int, int] | None:
    """[start, end) of the turn's content within text[start:end], or None where it is not shown verbatim.

    Its last occurrence (what follows the content is scaffolding, what precedes it may be a role header that
    contains it) among those that cut through no special token's text: a reply 'd' or 'end' also occurs inside
    '<|end|>', and found there it would hide the end token that follows the real reply."""
    specials = special_text_ranges(text, start, end, special_texts)
    for candidate in (content, content.strip()):
        stop = end
        while candidate and (found := text.rfind(candidate, start, stop)) >= 0:
            if not cuts_special(found, found + len(candidate), specials):
                return found, found + len(candidate)
            stop = found + len(candidate) - 1  # the next occurrence to the left
    return None


def special_text_ranges(text: str, start: int, end: int, special_texts: tuple[str, ...]) -> list[tuple[int, int]]:
    """[start, end) of every occurrence of a special token's text within text[start:end]."""
    ranges = []
    for special in special_texts:
        found = text.find(special, start, end)
        while found >= 0:
            ranges.append((found, found + len(special)))
            found = text.find(special, found + 1, end)
    return ranges


def cuts_special(start: int, end: int, specials: list[tuple[int, int]]) -> bool:
    """Does [start, end) overlap a special token's text without holding all of it (a match inside '<|im_end|>')?"""
    return any(s < end and start < e and not (start <= s and e <= end) for s, e in specials)


def prefix_failure_cause(
    tokenizer: Any, template: ChatTemplate, conversation: Conversation, i: int, prompt: str, upto: str, full: str
) -> str:
    """Which of PREFIX_CAUSES breaks the prefix property at assistant turn i."""
    if not upto.startswith(prompt):
        messages = [m.as_dict() for m in conversation.messages[:i]]
        plain = render(tokenizer, template, messages, add_generation_prompt=False, tools=conversation.tools)
        return GENERATION_PROMPT_NOT_PREFIX if upto.startswith(plain) else HISTORY_REWRITTEN
    tail = upto[len(os.path.commonprefix([upto, full])) :]
    return TEXT_APPENDED_AFTER_LAST_TURN if tail and full.endswith(tail) else HISTORY_REWRITTEN


# ------------------------------------------------------------------------------------- tokens and labels


def tokenize_rendered(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of rendered text, with exactly one BOS where the tokenizer wants one."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    if adds_bos(tokenizer) and (not ids or ids[0] != tokenizer.bos_token_id):
        ids, offsets = [tokenizer.bos_token_id, *ids], [(0, 0), *offsets]
    if has_double_bos(ids, tokenizer):
        raise TemplateError(
            "the rendered example starts with two BOS tokens (the template writes one and the text holds another): "
            "remove the literal BOS from your data or template"
        )
    return ids, offsets


def has_double_bos(ids: list[int], tokenizer: Any) -> bool:
    """A BOS, then (after nothing but whitespace tokens) another BOS."""
    bos = tokenizer.bos_token_id
    if bos is None or not ids or ids[0] != bos:
        return False
    following = next((t for t in ids[1:] if t == bos or tokenizer.decode([t]).strip()), None)
    return following == bos


@dataclass(frozen=True)
class Labels:
    labels: list[int]
    end_ids: list[int]  # the end-of-turn token of each supervised turn that has one
    turns_without_end: int
    empty_turns: list[int]  # message indices of turns with nothing but their end token supervised


def label_spans(
    ids: list[int],
    offsets: list[tuple[int, int]],
    spans: list[TurnSpan],
    specials: set[int],
    text: str,
    conversation: Conversation,
    opening_specials: set[int] | None = None,
    special_texts: tuple[str, ...] = (),
) -> Labels:
    """Labels for each token: each span's tokens up to and including its end-of-turn token."""
    labels = [IGNORE_INDEX] * len(ids)
    end_ids: list[int] = []
    without_end, empty = 0, []
    for span in spans:
        in_span = [k for k in range(len(ids)) if _in(k, offsets, span.start, span.end)]
        if not in_span:
            continue
        content = content_range(text, span.start, span.end, conversation.messages[span.index].content, special_texts)
        end = end_of_turn(ids, offsets, in_span, specials - (opening_specials or set()), content)
        if end is None:
            without_end += 1
        else:
            end_ids.append(ids[end])
        supervised = [k for k in in_span if k <= (in_span[-1] if end is None else end)]
        written = [k for k in supervised if k != end and ids[k] not in specials]
        if not any(text[offsets[k][0] : offsets[k][1]].strip() for k in written):
            empty.append(span.index)
        for k in supervised:
            labels[k] = ids[k]
    return Labels(labels, end_ids, without_end, empty)


def end_of_turn(
    ids: list[int],
    offsets: list[tuple[int, int]],
    in_span: list[int],
    end_candidates: set[int],
    content: tuple[int, int] | None,
) -> int | None:
    """The turn's end token: the first special token after its content (a literal '</s>' written inside the
    content is content, not the end). Where the content is not shown verbatim (tool calls rendered as JSON), the
    last special token of the span."""
    candidates = [k for k in in_span if ids[k] in end_candidates]
    if content is None:
        return candidates[-1] if candidates else None
    return next((k for k in candidates if offsets[k][0] >= content[1]), None)


def _in(k: int, offsets: list[tuple[int, int]], start: int, end: int) -> bool:
    """Token k starts inside [start, end) and covers text (a BOS we inserted covers none)."""
    token_start, token_end = offsets[k]
    return start <= token_start < end and token_end > token_start


def opening_special_ids(tokenizer: Any, template: ChatTemplate, conversation: Conversation) -> set[int]:
    """Special tokens the generation prompt opens a turn with (e.g. <|im_start|>): never an end-of-turn token."""
    messages = [m.as_dict() for m in conversation.messages]
    plain = render(tokenizer, template, messages, add_generation_prompt=False, tools=conversation.tools)
    prompted = render(tokenizer, template, messages, add_generation_prompt=True, tools=conversation.tools)
    if not prompted.startswith(plain) or prompted == plain:
        return set()
    suffix = tokenizer(prompted[len(plain) :], add_special_tokens=False)["input_ids"]
    return set(suffix) & special_token_ids(tokenizer)


# -------------------------------------------------------------------------------------------- examples


def build_example(
    tokenizer: Any,
    template: ChatTemplate,
    conversation: Conversation,
    mode: MaskMode = "assistant",
    max_length: int | None = None,
    truncation: TruncationPolicy = "drop",
    history_rewrite: HistoryRewrite = "expand",
) -> Example | Rejection | list[Example]:
    """Conversation -> token ids + labels (aligned, unshifted), or a Rejection saying why it can't be trained.

    A conversation whose template rewrites history gives one example per assistant turn (a list), only its last
    turn (`last_assistant`), or a rejection naming the cause (`reject`): template.history_rewrite.
    """
    if conversation.text is not None:
        ids, _ = tokenize_rendered(tokenizer, conversation.text)
        ids = ids + [tokenizer.eos_token_id]
        example = Example(ids, list(ids), conversation.source, end_token_ids=(tokenizer.eos_token_id,))
        return apply_truncation(example, max_length, truncation)
    try:
        text, spans = assistant_char_spans(tokenizer, template, conversation, mode)
    except PrefixError as error:
        if history_rewrite == "reject" or mode == "all":
            raise
        turns = assistant_turns(conversation, "last_assistant" if history_rewrite == "last_assistant" else mode)
        return expand_turns(tokenizer, template, conversation, turns, mode, max_length, truncation, error)
    return example_from_spans(tokenizer, template, conversation, text, spans, mode, max_length, truncation)


def example_from_spans(
    tokenizer: Any,
    template: ChatTemplate,
    conversation: Conversation,
    text: str,
    spans: list[TurnSpan],
    mode: MaskMode,
    max_length: int | None,
    truncation: TruncationPolicy,
) -> Example | Rejection:
    ids, offsets = tokenize_rendered(tokenizer, text)
    opening = opening_special_ids(tokenizer, template, conversation)
    specials, texts = special_token_ids(tokenizer), special_token_texts(tokenizer)
    result = label_spans(ids, offsets, spans, specials, text, conversation, opening, texts)
    if result.empty_turns:
        return empty_turn_rejection(conversation, result.empty_turns[0])
    labels = list(ids) if mode == "all" else result.labels
    example = Example(
        ids,
        labels,
        conversation.source,
        tuple(result.end_ids),
        result.turns_without_end,
        turn=spans[-1].index if spans else None,
        header_supervised=any(span.header_supervised for span in spans),
    )
    return apply_truncation(example, max_length, truncation)


def expand_turns(
    tokenizer: Any,
    template: ChatTemplate,
    conversation: Conversation,
    turns: list[int],
    mode: MaskMode,
    max_length: int | None,
    truncation: TruncationPolicy,
    error: PrefixError,
) -> list[Example] | Rejection:
    """One example per assistant turn in `turns`: the conversation up to that turn, rendered as inference renders
    it at that point, with only that turn supervised."""
    examples: list[Example] = []
    for i in turns:
        prompt, upto = turn_texts(tokenizer, template, conversation, i)
        if not upto.startswith(prompt):  # even one turn at a time the prompt is not a prefix: cannot be trained
            raise PrefixError(f"{error} and not even turn by turn", error.cause)
        span = turn_span(tokenizer, template, conversation, i, prompt, upto)
        result = example_from_spans(tokenizer, template, conversation, upto, [span], mode, max_length, truncation)
        if isinstance(result, Rejection):
            return result
        result.expanded_because = error.cause
        examples.append(result)
    return examples


def empty_turn_rejection(conversation: Conversation, index: int) -> Rejection:
    message = conversation.messages[index]
    if message.extra.get("tool_calls") or message.extra.get("function_call"):
        return Rejection(
            conversation.source,
            "tool_calls_not_rendered",
            f"assistant message {index} has tool_calls, but the template renders none of them: only its end token "
            "would be trained, teaching the model to stop right after the question. Use a template that renders "
            "tool calls (e.g. the tokenizer's own, or its tool_use template) or drop these rows",
        )
    return Rejection(
        conversation.source,
        "empty_turn",
        f"assistant message {index} renders to nothing but its end token: the template drops its content",
    )


def apply_truncation(example: Example, max_length: int | None, policy: TruncationPolicy) -> Example | Rejection:
    if example.num_supervised == 0:
        return Rejection(example.source, "no_supervised_tokens", "the rendered example has nothing to train on")
    if max_length is None or len(example.input_ids) <= max_length:
        return example
    if policy == "drop":
        return Rejection(
            example.source,
            "too_long",
            f"{len(example.input_ids)} tokens > data.max_length={max_length} (data.truncation=drop)",
        )
    example.input_ids, example.labels = example.input_ids[:max_length], example.labels[:max_length]
    example.truncated = True
    if example.num_supervised == 0:
        return Rejection(
            example.source,
            "no_supervised_tokens",
            f"nothing supervised left after truncation to data.max_length={max_length}",
        )
    return example
