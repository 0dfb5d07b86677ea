"""Render a conversation and build its loss mask in one pass.

The mask comes from incremental prefix rendering: for assistant turn i, the text the template produces for
messages[:i] with the generation prompt is a prefix of the text for messages[:i + 1]; the characters between
the two are what the model must learn to write. We never search the text for marker strings. Within that span,
supervision runs up to and including the last special token (the end-of-turn / EOS token): whitespace the
template puts after it belongs to the next turn's scaffolding. Padding is handled by position (in collate),
never by token id, so a tokenizer whose pad == eos still trains its EOS.
"""

from __future__ import annotations

from typing import Any, Literal

from sftune.data.templates import ChatTemplate, TemplateError, render
from sftune.data.types import IGNORE_INDEX, Conversation, Example, Rejection

MaskMode = Literal["assistant", "last_assistant", "all"]
TruncationPolicy = Literal["drop", "truncate"]


def special_token_ids(tokenizer: Any) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def adds_bos(tokenizer: Any) -> bool:
    """Does the tokenizer put a BOS in front of plain text? Then rendered text needs one too (once)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def assistant_char_spans(
    tokenizer: Any, template: ChatTemplate, conversation: Conversation, mode: MaskMode
) -> tuple[str, list[tuple[int, int]]]:
    """Full rendered text and the [start, end) character span of each supervised assistant turn."""
    messages = [m.as_dict() for m in conversation.messages]
    full = render(tokenizer, template, messages, add_generation_prompt=False, tools=conversation.tools)
    turns = [i for i, m in enumerate(conversation.messages) if m.role == "assistant"]
    if mode == "last_assistant":
        turns = turns[-1:]
    spans = []
    for i in turns:
        prompt = render(tokenizer, template, messages[:i], add_generation_prompt=True, tools=conversation.tools)
        upto = render(tokenizer, template, messages[: i + 1], add_generation_prompt=False, tools=conversation.tools)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise TemplateError(
                f"{conversation.source}: template '{template.name}' is not prefix-consistent at message {i}: "
                "rendering the conversation up to an assistant turn does not start with the rendering of the "
                "prompt before it (the template rewrites earlier turns), so the mask cannot be derived. "
                "Use template.mask=last_assistant or another template."
            )
        spans.append((len(prompt), len(upto)))
    return full, spans


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
    bos = tokenizer.bos_token_id
    return bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos


def label_spans(
    ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]], specials: set[int]
) -> tuple[list[int], list[int], int]:
    """Labels for each token; returns (labels, end token ids, turns that had no special end token)."""
    labels = [IGNORE_INDEX] * len(ids)
    end_ids: list[int] = []
    without_end = 0
    for start, end in spans:
        in_span = [k for k in range(len(ids)) if _in(k, offsets, start, end)]
        if not in_span:
            continue
        ends = [k for k in in_span if ids[k] in specials]
        last = ends[-1] if ends else in_span[-1]
        if ends:
            end_ids.append(ids[last])
        else:
            without_end += 1
        for k in in_span:
            if k <= last:
                labels[k] = ids[k]
    return labels, end_ids, without_end


def _in(k: int, offsets: list[tuple[int, int]], start: int, end: int) -> bool:
    """Token k starts inside [start, end) and covers text (a BOS we inserted covers none)."""
    token_start, token_end = offsets[k]
    return start <= token_start < end and token_end > token_start


def build_example(
    tokenizer: Any,
    template: ChatTemplate,
    conversation: Conversation,
    mode: MaskMode = "assistant",
    max_length: int | None = None,
    truncation: TruncationPolicy = "drop",
) -> Example | Rejection:
    """Conversation -> token ids + labels (aligned, unshifted), or a Rejection saying why it can't be trained."""
    specials = special_token_ids(tokenizer)
    if conversation.text is not None:
        ids, _ = tokenize_rendered(tokenizer, conversation.text)
        ids = ids + [tokenizer.eos_token_id]
        example = Example(ids, list(ids), conversation.source, end_token_ids=(tokenizer.eos_token_id,))
    else:
        text, spans = assistant_char_spans(tokenizer, template, conversation, mode)
        ids, offsets = tokenize_rendered(tokenizer, text)
        labels, end_ids, without_end = label_spans(ids, offsets, spans, specials)
        if mode == "all":
            labels = list(ids)
        example = Example(ids, labels, conversation.source, tuple(end_ids), without_end)
    return apply_truncation(example, max_length, truncation)


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
