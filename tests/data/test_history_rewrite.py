"""Templates that rewrite history (reasoning templates dropping earlier <think> blocks, an end token appended after
the last turn only) are trained turn by turn, each turn exactly as inference renders it."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from sftune.data.check import check_conversations
from sftune.data.dataset import build_examples
from sftune.data.masking import HISTORY_REWRITTEN, TEXT_APPENDED_AFTER_LAST_TURN
from sftune.data.prompt import prompt_for, prompt_ids
from sftune.data.templates import ChatTemplate
from sftune.data.types import IGNORE_INDEX, Conversation, Message
from tests.conftest import shared_path

# Like Qwen3's: earlier assistant turns lose their <think> block; the turn being written keeps it.
REASONING = ChatTemplate(
    "reasoning",
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' and not loop.last -%}"
    "{{ '<|im_start|>assistant\\n' + m.content.split('</think>')[-1].lstrip() + '<|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}",
)
# ChatML that appends the end-of-text token after the whole conversation (pad == eos style training texts).
APPENDS_EOS = ChatTemplate(
    "appends-eos",
    "{%- for m in messages -%}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- else -%}{{ '<|endoftext|>' }}{%- endif -%}",
)
THINKING = Conversation(
    [
        Message("system", "Think, then answer."),
        Message("user", "2+2?"),
        Message("assistant", "<think>two and two</think>4"),
        Message("user", "times 3?"),
        Message("assistant", "<think>4 times 3</think>12"),
        Message("user", "minus 5?"),
        Message("assistant", "<think>12 minus 5</think>7"),
    ],
    source="think:1",
)


def supervised_text(tokenizer, example) -> str:
    return tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    )


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(shared_path("tokenizers", "qwen2.5"))


def test_every_turn_of_a_reasoning_conversation_is_trained_as_inference_renders_it(tokenizer):
    built = build_examples([THINKING], tokenizer, REASONING)
    assert not built.rejections and built.rows_kept == 1 and built.expanded_rows == 1
    assert built.prefix_failures == {HISTORY_REWRITTEN: 1}
    turns = [i for i, m in enumerate(THINKING.messages) if m.role == "assistant"]
    assert [e.turn for e in built.examples] == turns
    for example, turn in zip(built.examples, turns, strict=True):
        # Exactly this turn's content (its <think> block included) and its end token are supervised.
        assert supervised_text(tokenizer, example) == THINKING.messages[turn].content + "<|im_end|>"
        assert example.expanded_because == HISTORY_REWRITTEN
        # The prompt before it is what generate renders for that history (earlier <think> blocks dropped).
        sent = prompt_ids(tokenizer, REASONING, prompt_for(THINKING, turn))
        start = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
        assert example.input_ids[:start] == sent
        assert "two and two" not in tokenizer.decode(sent) or turn == turns[0]
    assert built.expansion_extra_tokens == sum(len(e.input_ids) for e in built.examples[:-1])
    _, _, checks = check_conversations([THINKING], tokenizer, REASONING)
    assert all(c.passed for c in checks), checks


def test_history_rewrite_policies(tokenizer):
    last = build_examples([THINKING], tokenizer, REASONING, history_rewrite="last_assistant")
    assert (
        len(last.examples) == 1
        and supervised_text(tokenizer, last.examples[0]) == "<think>12 minus 5</think>7<|im_end|>"
    )
    rejected = build_examples([THINKING], tokenizer, REASONING, history_rewrite="reject")
    assert not rejected.examples and rejected.rejections[0].reason == "template_error"
    assert HISTORY_REWRITTEN in rejected.rejections[0].detail


def test_end_token_appended_after_the_last_turn_is_found_structurally(tokenizer):
    conversation = Conversation(THINKING.messages[:5], source="eos:1")
    built = build_examples([conversation], tokenizer, APPENDS_EOS)
    assert built.prefix_failures == {TEXT_APPENDED_AFTER_LAST_TURN: 1} and len(built.examples) == 2
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for example in built.examples:
        # The end of the turn is <|im_end|>, not the <|endoftext|> the template appends after everything.
        assert example.end_token_ids == (im_end,)
        assert supervised_text(tokenizer, example).endswith("<|im_end|>")
        assert tokenizer.decode(example.input_ids).endswith("<|endoftext|>")
