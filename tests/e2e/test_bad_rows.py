"""No row crashes a run: bad rows are counted under their reason, in the check and in training (LoRA, micro-batch
2), validation rows included; a reasoning template that rewrites history trains every turn."""

from __future__ import annotations

import json

import yaml
from transformers import AutoTokenizer

from sftune.cli import main
from sftune.config import load_config
from sftune.recipes.sft import train

# ChatML that raises on a row (as real templates do: "roles must alternate", "system not supported"), ignores
# tool_calls, and drops <think> blocks of earlier assistant turns (a reasoning template).
TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m.content == 'BOOM' -%}{{ raise_exception('this template does not accept BOOM') }}{%- endif -%}"
    "{%- if m.role == 'assistant' and not loop.last -%}"
    "{{ '<|im_start|>assistant\\n' + m.content.split('</think>')[-1] + '<|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def chat(*turns, **extra):
    roles = ("user", "assistant")
    return {"messages": [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)], **extra}


GOOD = [
    chat("Say 1", "1"),
    chat("Say 2", "<think>easy</think>2", "And 3?", "<think>next</think>3", "And 4?", "<think>again</think>4"),
    chat("Hello", "Hi there"),
]
ASSISTANT_FIRST = {"messages": [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Hey"},
                                {"role": "assistant", "content": "How can I help?"}]}  # fmt: skip
TEMPLATE_RAISES = chat("BOOM", "ok")
DROPPED_TOOL_CALL = {
    "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "w"}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]
}
BAD = {
    "assistant_first": ASSISTANT_FIRST,
    "template_raised": TEMPLATE_RAISES,
    "tool_calls_not_rendered": DROPPED_TOOL_CALL,
}


def write_run(tmp_path, model_dir, **train_settings):
    rows = [GOOD[0], ASSISTANT_FIRST, GOOD[1], TEMPLATE_RAISES, DROPPED_TOOL_CALL, GOOD[2]]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "val.jsonl").write_text(json.dumps(GOOD[2]) + "\n" + json.dumps(TEMPLATE_RAISES) + "\n")
    (tmp_path / "reasoning.jinja").write_text(TEMPLATE)
    config = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": "train.jsonl", "validation": "val.jsonl"},
        "template": {"name": str(tmp_path / "reasoning.jinja")},
        "train": {"max_steps": 2, "micro_batch_size": 2, "progress": False, "precision": "fp32", **train_settings},
        "lora": {"r": 4, "dropout": 0.0},
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_data_check_counts_each_bad_row_under_its_reason(tmp_path, tiny_model_dir, capsys):
    config = write_run(tmp_path, tiny_model_dir)
    report_path = tmp_path / "report.json"
    assert main(["data", "check", str(config), "--json", str(report_path), "--rejects", str(tmp_path / "r.jsonl")]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    report = json.loads(report_path.read_text())
    assert report["rows_in"] == 6 == report["rows_kept"] + sum(report["rejected_by_reason"].values())
    assert report["rows_kept"] == 3 and report["rejected_by_reason"] == dict.fromkeys(BAD, 1)
    assert not [c for c in report["checks"] if not c["passed"] and not c["warning"]]
    assert (
        report["history_rewrite"]["rows_expanded"] == 1
        and report["history_rewrite"]["examples_from_expanded_rows"] == 3
    )
    rejected = {
        json.loads(line)["reason"]: json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()
    }
    assert rejected["template_raised"]["source"] == "train.jsonl:4" and "BOOM" in rejected["template_raised"]["detail"]
    assert rejected["assistant_first"]["source"] == "train.jsonl:2"
    assert "rows expanded" in captured.out


def test_lora_run_with_bad_rows_and_a_rewriting_template_trains_every_turn(tmp_path, tiny_model_dir):
    config = load_config(write_run(tmp_path, tiny_model_dir, method="lora", learning_rate=1e-3))
    result = train(config)
    counts = result.counts
    # Rows: 6 train (3 kept, 3 rejected) + 2 validation (1 kept, 1 rejected: the template raises on it).
    assert counts["rows_in"] == 8 == counts["rows_train"] + counts["rows_validation"] + counts["rows_rejected"]
    assert (counts["rows_train"], counts["rows_validation"], counts["rows_rejected"]) == (3, 1, 4)
    assert counts["examples_train"] == 5  # the 3-turn reasoning row became 3 examples
    assert counts["rejected_by_reason"] == {**dict.fromkeys(BAD, 1), "template_raised": 2}
    report = json.loads((result.run_dir / "data_report.json").read_text())
    assert report["validation"]["rejected_by_reason"] == {"template_raised": 1}
    assert result.global_step == 2 and result.val_loss is not None
    # The end-of-turn token the mask trained is where generation stops.
    generation = json.loads((result.model_dir / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    assert main(["generate", str(result.run_dir), "--prompt", "Say 2", "--max-new-tokens", "3"]) == 0
