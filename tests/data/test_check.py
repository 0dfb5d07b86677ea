"""The data check: passes on real templates, and flags each deliberately broken mask, template or dataset."""

from __future__ import annotations

import json

from transformers import AutoTokenizer

from sftune.config import load_config
from sftune.data.check import (
    MASK_CHECKS,
    build_report,
    check_conversations,
    check_data,
    check_examples,
    percentiles,
)
from sftune.data.dataset import build_examples
from sftune.data.formats import read_conversations
from sftune.data.masking import build_example
from sftune.data.templates import ChatTemplate, resolve_template
from sftune.data.types import IGNORE_INDEX, Example
from tests.conftest import shared_path
from tests.data.helpers import CONVERSATION, TOOL_CONVERSATION, llama2_template


def checks_by_name(checks):
    return {c.name: c for c in checks}


def assert_all_pass(checks, count):
    for check in checks:
        assert check.passed, check
        assert check.checked == count


def data_config(path, **data):
    return load_config({"data": {"train": str(path), **data}}).data


# ------------------------------------------------------------------------------ passes on real templates


def test_smollm2_chatml_passes_on_real_alpaca_rows(smollm2_tokenizer):
    config = load_config({"data": {"train": str(shared_path("data", "alpaca_en_demo.json")), "max_rows": 60}})
    report = check_data(config, smollm2_tokenizer, resolve_template("auto", smollm2_tokenizer))
    assert report.rows_in == 60 == report.rows_kept + sum(report.rejected_by_reason.values())
    assert report.formats == {"alpaca": 60}
    assert_all_pass(report.checks, 60)
    assert report.template["masking"] == "incremental prefix rendering"
    assert report.template["has_generation_markers"] is False
    assert 0 < report.supervised_tokens < report.tokens
    assert report.lengths["example"]["max"] >= report.lengths["example"]["p99"] >= report.lengths["example"]["p50"]
    json.loads(report.to_json())  # serialisable
    assert "PASS end_token_supervised" in report.to_text()


def test_qwen_chatml_passes_with_tool_call_turns():
    tok = AutoTokenizer.from_pretrained(shared_path("tokenizers", "qwen2.5"))
    template = resolve_template("auto", tok)
    glaive, rejected, formats = read_conversations(
        str(shared_path("data", "glaive_toolcall_en_demo.json")),
        data_config(shared_path("data", "glaive_toolcall_en_demo.json"), max_rows=30),
    )
    assert formats == {"sharegpt": 30} and not rejected
    assert any(m.extra.get("function_call") for c in glaive for m in c.messages)  # tool-call turns are in there
    conversations = [*glaive, TOOL_CONVERSATION]
    examples, rejections, checks = check_conversations(conversations, tok, template, max_length=4096)
    assert not rejections and len(examples) == 31
    assert_all_pass(checks, 31)
    # The hand-written tool call is rendered by Qwen's own template and trained with its end token.
    tool_example = examples[-1]
    assert "<tool_call>" in tok.decode(tool_example.input_ids)
    supervised = tok.decode(
        [t for t, label in zip(tool_example.input_ids, tool_example.labels, strict=True) if label != IGNORE_INDEX]
    )
    assert "get_weather" in supervised and supervised.count("<|im_end|>") == 2


def test_llama2_template_with_bos_passes():
    tok = AutoTokenizer.from_pretrained(shared_path("tokenizers", "llama2"))
    _, _, checks = check_conversations([CONVERSATION], tok, llama2_template())
    assert_all_pass(checks, 1)


def test_builtin_alpaca_passes(smollm2_tokenizer):
    _, _, checks = check_conversations([CONVERSATION], smollm2_tokenizer, resolve_template("alpaca", smollm2_tokenizer))
    assert_all_pass(checks, 1)


# ----------------------------------------------------------------------------- each broken case flagged


def test_template_that_drops_the_end_token_is_flagged(smollm2_tokenizer):
    template = ChatTemplate(
        "no-eos",
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}",
    )
    _, _, checks = check_conversations([CONVERSATION, CONVERSATION], smollm2_tokenizer, template)
    end = checks_by_name(checks)["end_token_supervised"]
    assert not end.passed and end.failures == 2 and end.first_source == "test:1"


def test_template_that_adds_a_second_bos_is_flagged_not_raised():
    tok = AutoTokenizer.from_pretrained(shared_path("tokenizers", "llama2"))
    template = ChatTemplate(
        "bos-twice",
        "{{ bos_token }}{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}",
    )
    examples, rejections, checks = check_conversations([CONVERSATION], tok, template)
    bos = checks_by_name(checks)["single_bos"]
    assert not bos.passed and bos.failures == 1 and bos.first_source == "test:1"
    assert not examples and [r.reason for r in rejections] == ["double_bos"]


def test_naive_collator_masking_pad_equal_eos_is_flagged(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.pad_token_id == tok.eos_token_id
    good = build_example(tok, resolve_template("auto", tok), CONVERSATION)
    assert isinstance(good, Example)
    # What a naive collator does: "ignore the padding" by token id, which also ignores every EOS.
    naive_labels = [
        IGNORE_INDEX if token == tok.pad_token_id else label
        for token, label in zip(good.input_ids, good.labels, strict=True)
    ]
    naive = Example(good.input_ids, naive_labels, source="naive:1")
    assert_all_pass(check_examples([good], tok), 1)
    end = checks_by_name(check_examples([naive], tok))["end_token_supervised"]
    assert not end.passed and end.failures == 1 and end.first_source == "naive:1"


def test_template_whose_inference_render_differs_is_flagged(smollm2_tokenizer):
    # Training renders "assistant:\n", inference prompts with "assistant\n": not even a text prefix.
    differs = ChatTemplate(
        "differs",
        "{% for m in messages %}<|im_start|>{{ m.role }}{% if m.role == 'assistant' %}:{% endif %}\n"
        "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    _, rejections, checks = check_conversations([CONVERSATION], smollm2_tokenizer, differs)
    parity = checks_by_name(checks)["inference_parity"]
    assert not parity.passed and parity.failures == 1 and rejections[0].reason == "template_error"


def test_generation_prompt_that_splits_a_token_is_flagged(smollm2_tokenizer):
    # A text prefix, but "assist" alone tokenizes differently from "assistant" inside the training text.
    split = ChatTemplate(
        "split",
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assist{% endif %}",
    )
    examples, _, checks = check_conversations([CONVERSATION], smollm2_tokenizer, split)
    assert len(examples) == 1  # the mask itself could be built
    parity = checks_by_name(checks)["inference_parity"]
    assert not parity.passed and parity.failures == 1


def test_truncation_that_leaves_nothing_to_train_is_flagged(tmp_path, smollm2_tokenizer):
    rows = [{"instruction": "word " * 80, "output": "short"}] * 3 + [{"instruction": "hi", "output": "hello"}]
    path = tmp_path / "long_prompts.json"
    path.write_text(json.dumps(rows))
    config = load_config({"data": {"train": str(path), "max_length": 40, "truncation": "truncate"}})
    report = check_data(config, smollm2_tokenizer, resolve_template("auto", smollm2_tokenizer))
    assert report.rows_in == 4 and report.rows_kept == 1 and report.rows_zero_supervised == 3
    assert report.rejected_by_reason == {"no_supervised_tokens": 3}
    check = checks_by_name(report.checks)["rows_have_supervised_tokens"]
    assert not check.passed and check.failures == 3 and check.first_source == "long_prompts.json[0]"
    assert not report.failed_checks(MASK_CHECKS)  # the mask itself is fine: training drops those rows


def test_report_keeps_the_examples_build_examples_would_build(tmp_path, smollm2_tokenizer):
    rows = [{"instruction": f"Say {i}", "output": "ok " * (i * 10)} for i in range(1, 6)]
    rows.append({"instruction": "Empty", "output": " "})  # dropped on reading: empty_response
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    config = load_config({"data": {"train": str(path), "max_length": 60}})  # the longest rows are too_long
    template = resolve_template("auto", smollm2_tokenizer)
    conversations, rejections, formats = read_conversations(str(path), config.data)
    built = build_examples(conversations, smollm2_tokenizer, template, config.template.mask, config.data.max_length)
    expected, expected_rejections = built.examples, built.rejections

    report = check_data(config, smollm2_tokenizer, template)
    assert report.examples == expected and report.rows_kept == len(expected) < 5
    assert report.rejections == rejections + expected_rejections  # read, then built: each row once
    assert report.rows_in == 6 == report.rows_kept + len(report.rejections)
    assert "examples" not in report.to_dict() and "rejections" not in report.to_dict()
    assert "held out" not in report.to_text()
    built_part = build_examples(conversations[:3], smollm2_tokenizer, template, max_length=config.data.max_length)
    train_part = build_report(built_part, rejections, formats, config, smollm2_tokenizer, template)
    assert train_part.examples == expected[: len(train_part.examples)] and train_part.rows_in == 4
    # formats count all 6 rows read; the 2 rows training holds out for validation are named in the text
    assert "(alpaca: 6; 2 of them held out for validation)" in train_part.to_text()


# ---------------------------------------------------------------------------------- numbers in the report


def test_percentiles_nearest_rank():
    assert percentiles(list(range(1, 101))) == {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    assert percentiles([]) == {"p50": 0, "p90": 0, "p99": 0, "max": 0}
