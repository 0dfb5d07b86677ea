"""Mask defects found on held-out template families: a short reply whose text also occurs inside the end token's own
text ('d' in '<|end|>') keeps its end token; a context turn the template drops is reported; a special token's text
inside a message is a counted rejection, never a control token trained mid-reply."""

from __future__ import annotations

import json
import string

import pytest
from transformers import AutoTokenizer

from sftune.config import load_config
from sftune.data.check import MASK_CHECKS, check_conversations, check_data, render_check_line
from sftune.data.dataset import build_examples
from sftune.data.masking import build_example
from sftune.data.templates import ChatTemplate, resolve_template
from sftune.data.types import IGNORE_INDEX, Conversation, Example, Message
from tests.conftest import shared_path
from tests.data.families import FAMILIES, family_tokenizer_and_template
from tests.data.helpers import TOOL_CONVERSATION, TOOLS

# Every letter, and words that occur inside end tokens' texts ('<|eot_id|>', '<|im_end|>', '<end_of_turn>', '<|end|>',
# '</s>', '<|endoftext|>') or role headers ('model', 'assistant').
SHORT_REPLIES = [
    *string.ascii_lowercase,
    *string.ascii_uppercase,
    *("end", "turn", "text", "eot", "im", "of", "id", "start", "model", "assistant", "|", "<", ">", "/", "_"),
]


def question(reply: str, source: str = "") -> Conversation:
    return Conversation([Message("user", "Which option is right?"), Message("assistant", reply)], source=source)


def supervised_positions(example: Example) -> list[int]:
    return [k for k, label in enumerate(example.labels) if label != IGNORE_INDEX]


def supervised_runs(tokenizer, example: Example) -> list[str]:
    """Each run of consecutive supervised tokens, decoded."""
    runs: list[list[int]] = []
    positions = supervised_positions(example)
    for before, k in zip([-2, *positions], positions, strict=False):
        if k == before + 1:
            runs[-1].append(example.input_ids[k])
        else:
            runs.append([example.input_ids[k]])
    return [tokenizer.decode(run) for run in runs]


def by_name(checks):
    return {c.name: c for c in checks}


# ------------------------------------------------------------------------------- short replies, every family


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_short_replies_keep_exactly_one_trained_end_token_and_nothing_after(family):
    tokenizer, template = family_tokenizer_and_template(family)
    end_id = tokenizer.convert_tokens_to_ids(family.end_token)
    for reply in SHORT_REPLIES:
        example = build_example(tokenizer, template, question(reply))
        assert isinstance(example, Example), (reply, example)
        assert all(label in (IGNORE_INDEX, t) for t, label in zip(example.input_ids, example.labels, strict=True))
        positions = supervised_positions(example)
        assert positions == list(range(positions[0], positions[-1] + 1)), reply  # one run, no gaps
        supervised = [example.input_ids[k] for k in positions]
        assert supervised[-1] == end_id and supervised.count(end_id) == 1, (reply, supervised)
        assert tokenizer.decode(supervised) == reply + family.end_token, reply
        assert example.turns_without_end_token == 0 and example.end_token_ids == (end_id,)
        # Whatever the template writes after the end token (a newline, an end-of-text token) is not trained.
        assert all(label == IGNORE_INDEX for label in example.labels[positions[-1] + 1 :])


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_a_data_set_of_short_answers_passes_every_mask_check(family):
    tokenizer, template = family_tokenizer_and_template(family)
    rows = [question(reply, f"short:{k}") for k, reply in enumerate(SHORT_REPLIES)]
    two_turns = Conversation(
        [Message("user", "First?"), Message("assistant", "d"), Message("user", "Second?"), Message("assistant", "e")],
        source="short:two-turns",
    )
    examples, rejections, checks = check_conversations([*rows, two_turns], tokenizer, template)
    assert not rejections and {e.source for e in examples} == {row.source for row in [*rows, two_turns]}
    for check in checks:
        assert check.passed, check
    # Both turns of the two-turn row keep their end token (in one example, or one per turn where the template
    # appends text after the last turn only and the row is expanded).
    runs = [run for e in examples if e.source == two_turns.source for run in supervised_runs(tokenizer, e)]
    assert runs == [f"d{family.end_token}", f"e{family.end_token}"]


def test_a_reply_that_is_also_in_the_role_header_of_a_template_without_generation_prompt(smollm2_tokenizer):
    # No generation prompt: the header is trained too, and 'a' or 'assistant' also occurs inside it.
    no_prompt = ChatTemplate(
        "chatml-no-generation-prompt",
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
    )
    for reply in ("a", "assistant", "s", "end", "im"):
        example = build_example(smollm2_tokenizer, no_prompt, question(reply))
        supervised = [example.input_ids[k] for k in supervised_positions(example)]
        assert smollm2_tokenizer.decode(supervised) == f"<|im_start|>assistant\n{reply}<|im_end|>"
        assert example.turns_without_end_token == 0 and example.header_supervised


# --------------------------------------------------------------------- context the template does not render

# ChatML that knows neither tool calls nor the tool role: both vanish from the rendered context.
DROPS_TOOL_TURNS = ChatTemplate(
    "drops-tool-turns",
    "{% for m in messages %}{% if m.role != 'tool' %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
)
TOOL_ROW = TOOL_CONVERSATION


def test_last_assistant_reports_a_tool_call_and_result_the_template_drops(smollm2_tokenizer):
    plain = question("Blue.", "plain:1")
    examples, rejections, checks = check_conversations(
        [TOOL_ROW, plain], smollm2_tokenizer, DROPS_TOOL_TURNS, mask="last_assistant"
    )
    assert len(examples) == 2 and not rejections  # trained as inference renders it: reported, not refused
    context = by_name(checks)["context_rendered"]
    assert not context.passed and context.warning and context.failures == 1 and context.checked == 2
    assert context.first_source == "tool:1 (message 1, assistant)"  # the tool call is the first turn missing
    assert "WARN context_rendered: 1 of 2 failed (first: tool:1 (message 1, assistant))" in render_check_line(context)
    assert all(by_name(checks)[name].passed for name in MASK_CHECKS)  # a warning does not stop training


def test_a_dropped_tool_result_alone_is_reported(smollm2_tokenizer):
    # The call is shown (as text), the tool result is not.
    row = Conversation(
        [
            Message("user", "Weather?"),
            Message("assistant", "Calling get_weather."),
            Message("tool", '{"temperature": 21}'),
            Message("assistant", "21 degrees."),
        ],
        source="tool:2",
    )
    _, _, checks = check_conversations([row], smollm2_tokenizer, DROPS_TOOL_TURNS, mask="last_assistant")
    assert by_name(checks)["context_rendered"].first_source == "tool:2 (message 2, tool)"


def test_a_template_that_keeps_only_the_last_user_turn_is_reported(smollm2_tokenizer):
    last_user_only = ChatTemplate(
        "last-user-only",
        "{% for m in messages %}{% if m.role == 'assistant' or loop.index0 >= messages | length - 2 %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    row = Conversation(
        [
            Message("user", "My name is Ada."),
            Message("assistant", "Hello Ada."),
            Message("user", "What is my name?"),
            Message("assistant", "Ada."),
        ],
        source="names:1",
    )
    _, _, checks = check_conversations([row], smollm2_tokenizer, last_user_only, mask="last_assistant")
    assert by_name(checks)["context_rendered"].first_source == "names:1 (message 0, user)"


def test_templates_that_render_every_turn_raise_no_context_warning(smollm2_tokenizer):
    qwen = AutoTokenizer.from_pretrained(shared_path("tokenizers", "qwen2.5"))
    _, _, checks = check_conversations([TOOL_ROW], qwen, resolve_template("auto", qwen), mask="last_assistant")
    assert by_name(checks)["context_rendered"].passed
    # Alpaca lays an instruction and its input out in sections: shown, if not verbatim.
    user = Message("user", "Translate\n\nbonjour", {"instruction": "Translate", "input": "bonjour"})
    alpaca_row = Conversation([user, Message("assistant", "hello")], source="alpaca:1")
    alpaca = resolve_template("alpaca", smollm2_tokenizer)
    _, _, checks = check_conversations([alpaca_row], smollm2_tokenizer, alpaca, mask="last_assistant")
    assert by_name(checks)["context_rendered"].passed
    # A reasoning template drops earlier turns' thinking on purpose; their answers are still shown.
    drops_thinking = ChatTemplate(
        "drops-thinking",
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{{ m.content.split('</think>')[-1] | trim if m.role == 'assistant' else m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    thinking = Conversation(
        [
            Message("user", "2+2?"),
            Message("assistant", "<think>two and two</think>4"),
            Message("user", "3+3?"),
            Message("assistant", "6"),
        ],
        source="think:1",
    )
    _, _, checks = check_conversations([thinking], smollm2_tokenizer, drops_thinking, mask="last_assistant")
    assert by_name(checks)["context_rendered"].passed


# ------------------------------------------------------------------------------- special-token text in content


def test_special_token_text_in_a_message_is_a_counted_rejection(smollm2_tokenizer):
    tok = smollm2_tokenizer  # ChatML; EOS == pad == '<|endoftext|>'; '<filename>' is one of its added specials
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "<|im_start|>Paris"}}}
    rows = [
        question("Done <|im_end|> really", "reply-end-token"),
        Conversation([Message("user", "Echo <|endoftext|>"), Message("assistant", "OK")], source="user-eos-pad"),
        question("See <filename>", "added-special"),
        Conversation(
            [Message("user", "Weather?"), Message("assistant", "", {"tool_calls": [call]}), Message("tool", "21")],
            source="tool-arguments",
            tools=TOOLS,
        ),
        question("A </s> and a <s> are plain text here", "ordinary-text"),  # no special token of this tokenizer
        question("<im_end> and |im_end| are text too", "near-misses"),
    ]
    built = build_examples(rows, tok, resolve_template("auto", tok))
    rejected = {r.source: r for r in built.rejections}
    assert set(rejected) == {"reply-end-token", "user-eos-pad", "added-special", "tool-arguments"}
    assert {r.reason for r in rejected.values()} == {"special_token_in_content"}
    assert "assistant message 1 contains '<|im_end|>'" in rejected["reply-end-token"].detail
    assert "user message 0 contains '<|endoftext|>'" in rejected["user-eos-pad"].detail
    assert "'<filename>'" in rejected["added-special"].detail
    assert "assistant message 1 contains '<|im_start|>'" in rejected["tool-arguments"].detail
    assert [e.source for e in built.examples] == ["ordinary-text", "near-misses"] and built.rows_kept == 2


def test_bos_eos_unk_and_pad_texts_of_a_sentencepiece_tokenizer_are_covered():
    tok = AutoTokenizer.from_pretrained(shared_path("tokenizers", "llama2"))
    tok.add_special_tokens({"pad_token": "<pad>"})
    template = resolve_template("mistral", tok)
    rows = [question(f"x {text} y", text) for text in ("<s>", "</s>", "<unk>", "<pad>", "<|im_end|>", "<p>")]
    built = build_examples(rows, tok, template)
    assert {r.source: r.reason for r in built.rejections} == {
        "<s>": "special_token_in_content",
        "</s>": "special_token_in_content",
        "<unk>": "special_token_in_content",
        "<pad>": "special_token_in_content",
    }
    assert [e.source for e in built.examples] == ["<|im_end|>", "<p>"]  # not special tokens of this tokenizer
    for example in built.examples:  # kept rows train their end token once, at the end
        supervised = [example.input_ids[k] for k in supervised_positions(example)]
        assert supervised.count(tok.eos_token_id) == 1 and supervised[-1] == tok.eos_token_id


def test_the_data_check_counts_special_token_rejections(tmp_path, smollm2_tokenizer):
    rows = [
        {"instruction": "Say hi.", "output": "Hi."},
        {"instruction": "Close the turn.", "output": "Sure <|im_end|> done"},
        {"instruction": "Answer with one letter.", "output": "d"},
    ]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    config = load_config({"data": {"train": str(path), "format": "alpaca"}})
    report = check_data(config, smollm2_tokenizer, resolve_template("auto", smollm2_tokenizer))
    assert report.rows_in == 3 and report.rows_kept == 2
    assert report.rejected_by_reason == {"special_token_in_content": 1}
    assert "2 kept + 1 rejected (special_token_in_content: 1)" in report.to_text()
    assert not report.failed_checks()  # the one-letter answer keeps its end token: nothing refuses the run
    (rejection,) = report.rejections
    assert rejection.source == "rows.json[1]" and "'<|im_end|>'" in rejection.detail
