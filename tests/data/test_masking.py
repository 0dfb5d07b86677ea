"""Mask properties on real templates: supervised tokens are exactly the assistant contents + their end tokens."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from sftune.data.masking import build_example
from sftune.data.templates import ChatTemplate, TemplateError, resolve_template
from sftune.data.types import IGNORE_INDEX, Conversation, Example, Message, Rejection
from tests.conftest import shared_path
from tests.data.helpers import ASSISTANT, CONVERSATION, llama2_template


def supervised_segments(tokenizer, example: Example) -> list[str]:
    """Decoded runs of consecutive supervised tokens."""
    segments, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            segments.append(tokenizer.decode(current))
            current = []
    if current:
        segments.append(tokenizer.decode(current))
    return segments


def assert_label_invariants(example: Example) -> None:
    assert len(example.labels) == len(example.input_ids)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(example.input_ids, example.labels, strict=True))


def test_chatml_with_pad_equal_eos_trains_the_end_token(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # the trap this test is about
    example = build_example(tok, resolve_template("auto", tok), CONVERSATION)
    assert isinstance(example, Example)
    assert_label_invariants(example)
    assert supervised_segments(tok, example) == [content + "<|im_end|>" for content in ASSISTANT]
    supervised_ids = [label for label in example.labels if label != IGNORE_INDEX]
    assert supervised_ids.count(tok.eos_token_id) == 2  # EOS trained once per assistant turn
    assert example.end_token_ids == (tok.eos_token_id, tok.eos_token_id)


def test_builtin_alpaca_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    example = build_example(tok, resolve_template("alpaca", tok), CONVERSATION)
    assert isinstance(example, Example)
    text = tok.decode(example.input_ids)
    assert "### Instruction:\nHi there, who are you?" in text and "### Response:\n" in text
    assert supervised_segments(tok, example) == [content + tok.eos_token for content in ASSISTANT]


def test_alpaca_input_field_rendered_as_its_own_section(smollm2_tokenizer):
    tok = smollm2_tokenizer
    user = Message("user", "Translate\n\nbonjour", {"instruction": "Translate", "input": "bonjour"})
    conversation = Conversation([user, Message("assistant", "hello")])
    example = build_example(tok, resolve_template("alpaca", tok), conversation)
    assert "### Instruction:\nTranslate\n\n### Input:\nbonjour\n\n### Response:\n" in tok.decode(example.input_ids)
    assert supervised_segments(tok, example) == ["hello" + tok.eos_token]


def test_llama2_template_with_bos_has_exactly_one_bos():
    tok = AutoTokenizer.from_pretrained(shared_path("tokenizers", "llama2"))
    example = build_example(tok, llama2_template(), CONVERSATION)
    assert isinstance(example, Example)
    assert_label_invariants(example)
    assert example.input_ids[0] == tok.bos_token_id and example.input_ids[1] != tok.bos_token_id
    segments = supervised_segments(tok, example)
    assert [s.strip().removesuffix(tok.eos_token).strip() for s in segments] == ASSISTANT
    assert all(s.strip().endswith(tok.eos_token) for s in segments)
    # No system or user text is ever supervised.
    assert not any("[INST]" in s or "briefly" in s or "2+2?" in s for s in segments)


@pytest.mark.parametrize("name", ["chatml", "llama3", "mistral", "alpaca"])
def test_every_builtin_supervises_only_assistant_content(name, smollm2_tokenizer):
    from sftune.data.templates import install_template

    tok = AutoTokenizer.from_pretrained(shared_path("tokenizers", "smollm2"))
    template = resolve_template(name, tok)
    install_template(template, tok)
    example = build_example(tok, template, CONVERSATION)
    assert isinstance(example, Example)
    segments = supervised_segments(tok, example)
    assert len(segments) == 2
    for segment, content in zip(segments, ASSISTANT, strict=True):
        assert segment.strip().startswith(content)
        end = segment.strip()[len(content) :]
        assert tok.convert_tokens_to_ids(end) in tok.all_special_ids or end == tok.eos_token


def test_last_assistant_and_all_modes(smollm2_tokenizer):
    tok = smollm2_tokenizer
    template = resolve_template("auto", tok)
    last = build_example(tok, template, CONVERSATION, mode="last_assistant")
    assert supervised_segments(tok, last) == [ASSISTANT[-1] + "<|im_end|>"]
    everything = build_example(tok, template, CONVERSATION, mode="all")
    assert everything.labels == everything.input_ids


def test_literal_bos_in_text_is_a_double_bos_error():
    tok = AutoTokenizer.from_pretrained(shared_path("tokenizers", "llama2"))
    template = ChatTemplate(
        "bos-twice", "{{ bos_token }}{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
    )
    with pytest.raises(TemplateError, match="two BOS"):
        build_example(tok, template, CONVERSATION)


def test_template_that_rewrites_history_is_refused(smollm2_tokenizer):
    # Renders only the last message: earlier turns vanish, so no prefix relation holds.
    template = ChatTemplate("last-only", "{{ messages[-1].content }}{{ eos_token }}")
    with pytest.raises(TemplateError, match="prefix-consistent"):
        build_example(smollm2_tokenizer, template, CONVERSATION)


def test_truncation_policies(smollm2_tokenizer):
    tok = smollm2_tokenizer
    template = resolve_template("auto", tok)
    full = build_example(tok, template, CONVERSATION)
    dropped = build_example(tok, template, CONVERSATION, max_length=20, truncation="drop")
    assert isinstance(dropped, Rejection) and dropped.reason == "too_long"
    cut = build_example(tok, template, CONVERSATION, max_length=len(full.input_ids) - 3, truncation="truncate")
    assert isinstance(cut, Example) and cut.truncated and len(cut.input_ids) == len(full.input_ids) - 3
    nothing = build_example(tok, template, CONVERSATION, max_length=20, truncation="truncate")
    assert isinstance(nothing, Rejection) and nothing.reason == "no_supervised_tokens"


def test_template_without_end_token_is_reported(smollm2_tokenizer):
    template = ChatTemplate(
        "no-eos",
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}",
    )
    example = build_example(smollm2_tokenizer, template, CONVERSATION)
    assert isinstance(example, Example) and example.turns_without_end_token == 2
