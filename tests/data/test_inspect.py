"""The inspect view highlights exactly the supervised tokens: assistant content + end-of-turn tokens."""

from __future__ import annotations

from sftune.data.inspect import (
    PROMPT_ANSI,
    RESET_ANSI,
    SUPERVISED_ANSI,
    render_example_ansi,
    render_examples_html,
    split_pieces,
    supervised_text,
)
from sftune.data.masking import build_example
from sftune.data.templates import resolve_template
from tests.data.helpers import ASSISTANT, CONVERSATION


def chatml_example(tokenizer):
    return build_example(tokenizer, resolve_template("auto", tokenizer), CONVERSATION)


def test_highlighted_text_is_exactly_assistant_content_and_end_tokens(smollm2_tokenizer):
    example = chatml_example(smollm2_tokenizer)
    assert supervised_text(example, smollm2_tokenizer) == [content + "<|im_end|>" for content in ASSISTANT]
    pieces = split_pieces(example, smollm2_tokenizer)
    assert "".join(p.text for p in pieces) == smollm2_tokenizer.decode(example.input_ids)
    assert [t for p in pieces for t in p.token_ids] == example.input_ids


def test_ansi_colours_supervised_runs_only(smollm2_tokenizer):
    example = chatml_example(smollm2_tokenizer)
    text = render_example_ansi(example, smollm2_tokenizer)
    for content in ASSISTANT:
        assert f"{SUPERVISED_ANSI}{content}<|im_end|>{RESET_ANSI}" in text
    assert f"{PROMPT_ANSI}<|im_start|>system" in text
    assert text.count(SUPERVISED_ANSI) == 2


def test_ids_and_boundaries(smollm2_tokenizer):
    example = chatml_example(smollm2_tokenizer)
    text = render_example_ansi(example, smollm2_tokenizer, ids=True, boundaries=True)
    assert text.count("|") >= len(example.input_ids)  # one boundary mark per token
    assert f"<|im_end|>[{smollm2_tokenizer.eos_token_id}]" in text
    per_token = split_pieces(example, smollm2_tokenizer, boundaries=True)
    assert len(per_token) == len(example.input_ids)


def test_html_page_is_self_contained_and_marks_the_same_tokens(smollm2_tokenizer):
    example = chatml_example(smollm2_tokenizer)
    page = render_examples_html([example], smollm2_tokenizer)
    assert page.startswith("<!doctype html>") and "http" not in page and "<script" not in page
    for content in ASSISTANT:
        assert '<span class="sup" ' in page and f"{content}&lt;|im_end|&gt;</span>" in page
    assert page.count('class="sup"') == 2 + 1  # two runs + the legend
