"""Guards against silent mis-training: dropped tool calls, spaced double BOS, a literal EOS inside an answer, a
template with no generation prompt, and tokenizers that ship named templates."""

from __future__ import annotations

from transformers import AutoTokenizer

from sftune.data.check import check_conversations
from sftune.data.dataset import build_examples
from sftune.data.masking import build_example
from sftune.data.templates import ChatTemplate, install_template, render, resolve_template
from sftune.data.types import Conversation, Example, Message
from tests.conftest import shared_path
from tests.data.helpers import CONVERSATION

TOOL_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
# ChatML that knows nothing of tool_calls: a tool-call turn renders as an empty reply.
IGNORES_TOOL_CALLS = ChatTemplate(
    "ignores-tool-calls",
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
)


def by_name(checks):
    return {c.name: c for c in checks}


def test_a_tool_call_the_template_drops_is_rejected_not_trained_as_an_empty_reply(smollm2_tokenizer):
    conversation = Conversation(
        [
            Message("user", "Weather in Paris?"),
            Message("assistant", "", {"tool_calls": [TOOL_CALL]}),
            Message("tool", '{"temperature": 21}'),
            Message("assistant", "21 degrees."),
        ],
        source="tool:1",
    )
    result = build_example(smollm2_tokenizer, IGNORES_TOOL_CALLS, conversation)
    assert result.reason == "tool_calls_not_rendered" and "tool_calls" in result.detail
    # Qwen's own template renders the call: the same row trains.
    qwen = AutoTokenizer.from_pretrained(shared_path("tokenizers", "qwen2.5"))
    assert isinstance(build_example(qwen, resolve_template("auto", qwen), conversation), Example)


def test_two_bos_tokens_separated_by_whitespace_are_a_double_bos():
    tok = AutoTokenizer.from_pretrained(shared_path("tokenizers", "llama2"))
    spaced = ChatTemplate(
        "bos-space-bos",
        "{{ bos_token }} {{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}",
    )
    examples, rejections, checks = check_conversations([CONVERSATION], tok, spaced)
    assert not examples and [r.reason for r in rejections] == ["double_bos"]
    assert not by_name(checks)["single_bos"].passed


def test_a_literal_eos_inside_an_answer_is_not_taken_for_the_end_token():
    tok = AutoTokenizer.from_pretrained(shared_path("tokenizers", "llama2"))
    no_end = ChatTemplate(
        "no-end-token",
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}",
    )
    tricky = Conversation([Message("user", "Say it."), Message("assistant", "Done </s> really")], source="eos:1")
    example = build_example(tok, no_end, tricky)
    assert isinstance(example, Example)
    assert tok.eos_token_id in example.input_ids  # the text '</s>' is the EOS token inside the content
    assert example.turns_without_end_token == 1  # but the turn has no end token after its content: refused


def test_a_template_without_generation_prompt_is_reported(smollm2_tokenizer):
    no_prompt = ChatTemplate(
        "no-generation-prompt",
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
    )
    examples, _, checks = check_conversations([CONVERSATION], smollm2_tokenizer, no_prompt)
    assert examples[0].header_supervised
    header = by_name(checks)["role_header_not_supervised"]
    assert not header.passed and header.warning and header.failures == 1
    assert by_name(checks)["inference_parity"].passed  # consistent: at inference it writes the header itself


def test_named_templates_are_selected_by_name_and_by_tools(smollm2_tokenizer):
    tok = AutoTokenizer.from_pretrained(shared_path("tokenizers", "smollm2"))
    default = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}" + (
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tool_use = (
        "<|im_start|>system\nTools: {{ tools | map(attribute='function.name') | join(',') }}<|im_end|>\n" + default
    )
    tok.chat_template = {"default": default, "tool_use": tool_use}
    auto = resolve_template("auto", tok)
    assert auto.tools_jinja == tool_use and auto.jinja == default and "tool_use" in auto.describe()
    messages = [{"role": "user", "content": "Hi"}]
    assert "Tools: get_weather" in render(tok, auto, messages, True, tools=TOOLS)
    assert "Tools" not in render(tok, auto, messages, True)
    assert resolve_template("tool_use", tok).jinja == tool_use
    # Saved with both names, so inference picks the same one per prompt.
    install_template(auto, tok)
    assert tok.chat_template == {"default": default, "tool_use": tool_use}
    with_tools = Conversation([Message("user", "Hi"), Message("assistant", "Hello")], "named:1", tools=TOOLS)
    built = build_examples([with_tools], tok, auto)
    assert "Tools: get_weather" in tok.decode(built.examples[0].input_ids)
