"""Train = inference: the prompt `sftune generate` sends is the training text up to the supervised reply.

Each case reads one row from a file twice, as training reads it (read_conversations -> build_examples) and as
generate/eval read it (read_prompt_rows with the run's data settings -> the saved template), and compares the ids.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from sftune.config import load_config
from sftune.data.check import check_conversations
from sftune.data.dataset import build_examples
from sftune.data.formats import read_conversations
from sftune.data.templates import ChatTemplate, install_template, resolve_template
from sftune.data.types import IGNORE_INDEX
from sftune.infer.generate import prompt_ids
from sftune.infer.prompts import PromptSettings, read_prompt_rows
from tests.conftest import shared_path
from tests.data.helpers import TOOL_CALL, TOOLS


def qwen():
    return AutoTokenizer.from_pretrained(shared_path("tokenizers", "qwen2.5"))


def smollm2():
    return AutoTokenizer.from_pretrained(shared_path("tokenizers", "smollm2"))


def last_turn_start(labels: list[int]) -> int:
    """Index of the first supervised token of the last supervised run."""
    start = None
    for index, label in enumerate(labels):
        if label != IGNORE_INDEX and (index == 0 or labels[index - 1] == IGNORE_INDEX):
            start = index
    assert start is not None
    return start


def training_and_inference_ids(tmp_path, tokenizer, template_name: str, row: dict, **data):
    """(training example ids, the ids `sftune generate` sends for the same row) with the run's data settings."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    config = load_config({"data": {"train": str(path), **data}, "template": {"name": template_name}})
    template = resolve_template(template_name, tokenizer)
    install_template(template, tokenizer)  # what the saved model folder carries
    conversations, rejected, _ = read_conversations(str(path), config.data)
    assert not rejected, rejected
    built = build_examples(conversations, tokenizer, template, max_length=4096)
    assert not built.rejections, built.rejections
    example = built.examples[-1]
    settings = PromptSettings(config.data.format, dict(config.data.columns), config.data.system_prompt)
    rows, rejected_prompts = read_prompt_rows(str(path), settings=settings)
    assert not rejected_prompts and len(rows) == 1
    return example, prompt_ids(tokenizer, rows[0].prompt)


CASES = {
    "a_tools": (
        qwen,
        "auto",
        {
            "messages": [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "Sunny."}],
            "tools": TOOLS,
        },
        {},
    ),
    "b_system_prompt": (
        smollm2,
        "auto",
        {"instruction": "Name a colour.", "output": "Blue."},
        {"system_prompt": "You answer in one word."},
    ),
    "c_alpaca_input": (
        smollm2,
        "alpaca",
        {"instruction": "Translate to English.", "input": "bonjour", "output": "hello"},
        {},
    ),
    "d_alpaca_history": (
        smollm2,
        "auto",
        {"instruction": "And 3+3?", "output": "6", "history": [["What is 2+2?", "4"]]},
        {},
    ),
    "e_reply_after_tool_result": (
        qwen,
        "auto",
        {
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
                {"role": "tool", "content": '{"temperature": 21}'},
                {"role": "assistant", "content": "It is 21 degrees."},
            ],
            "tools": TOOLS,
        },
        {},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_generate_sends_the_training_ids_up_to_the_last_reply(case, tmp_path):
    load_tokenizer, template_name, row, data = CASES[case]
    tokenizer = load_tokenizer()
    example, sent = training_and_inference_ids(tmp_path, tokenizer, template_name, row, **data)
    assert sent == example.input_ids[: last_turn_start(example.labels)]
    text = tokenizer.decode(sent)
    expected_in_prompt = {
        "a_tools": "get_weather",
        "b_system_prompt": "You answer in one word.",
        "c_alpaca_input": "### Input:\nbonjour",
        "d_alpaca_history": "What is 2+2?",
        "e_reply_after_tool_result": '{"temperature": 21}',
    }[case]
    assert expected_in_prompt in text


def test_the_check_fails_when_the_prompt_differs_from_training(smollm2_tokenizer):
    # The tool list is shown when training renders, but not in the prompt: the check compares real prompt ids.
    differs = ChatTemplate(
        "tools-only-in-training",
        "{% if tools and not add_generation_prompt %}<|im_start|>system\nTools: {{ tools | length }}<|im_end|>\n"
        "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    from sftune.data.types import Conversation, Message

    conversation = Conversation([Message("user", "Hi"), Message("assistant", "Hello")], "t:1", tools=TOOLS)
    _, _, checks = check_conversations([conversation], smollm2_tokenizer, differs)
    parity = {c.name: c for c in checks}["inference_parity"]
    assert not parity.passed and parity.failures == 1 and parity.first_source == "t:1"
    # Without tools the same template renders the same prompt both ways: the check passes.
    plain = Conversation([Message("user", "Hi"), Message("assistant", "Hello")], "t:2")
    _, _, checks = check_conversations([plain], smollm2_tokenizer, differs)
    assert {c.name: c for c in checks}["inference_parity"].passed
