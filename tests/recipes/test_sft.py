"""The SFT recipe on a tiny model: resume == uninterrupted, counts add up, outputs load with plain transformers."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sftune.data.dataset import build_examples
from sftune.data.formats import read_conversations, split_validation
from sftune.model.setup import setup_tokenizer
from sftune.recipes.sft import train
from sftune.training.data import publish_data, setup_data
from sftune.training.run import RunError
from tests.helpers import tiny_config, write_alpaca


def test_counts_add_up_and_outputs_are_complete(tmp_path, tiny_model_dir):
    result = train(tiny_config(tmp_path, tiny_model_dir))
    counts = result.counts
    assert counts["rows_in"] == 15
    assert counts["rows_in"] == counts["rows_train"] + counts["rows_validation"] + counts["rows_rejected"]
    assert counts["rejected_by_reason"] == {"empty_response": 1}
    run = result.run_dir
    for name in ("manifest.json", "metrics.jsonl", "loss.png", "config.yaml", "rejected.jsonl", "model/config.json"):
        assert (run / name).is_file(), name
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["counts"]["rows_rejected"] == 1 and manifest["data_sha256"]["train"]
    assert len((run / "rejected.jsonl").read_text().splitlines()) == 1
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, 7))


def test_trains_the_examples_the_data_report_built_once(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir)
    tokenizer, template = setup_tokenizer(config)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data = setup_data(config, tokenizer, template)
    publish_data(data, config, run_dir, memory=None)

    conversations, _, _ = read_conversations(config.data.train, config.data)
    train_rows, _ = split_validation(conversations, config.data.validation_fraction, config.train.seed)
    expected = build_examples(train_rows, tokenizer, template, config.template.mask, config.data.max_length).examples
    assert expected and data.train == expected  # what the report built is exactly what build_examples builds
    report = json.loads((run_dir / "data_report.json").read_text())
    summary = json.loads((run_dir / "data_summary.json").read_text())
    assert "examples" not in report and "rejections" not in report
    assert report["rows_kept"] == summary["rows_train"] == len(expected)  # the report is on the trained rows
    assert report["tokens"] == summary["tokens"] and report["supervised_tokens"] == summary["supervised_tokens"]
    assert report["rows_in"] == summary["rows_in"] - summary["rows_validation"] == 15 - summary["rows_validation"]
    assert summary["rejected_by_reason"] == report["rejected_by_reason"] == {"empty_response": 1}  # counted once
    assert len((run_dir / "rejected.jsonl").read_text().splitlines()) == summary["rows_rejected"] == 1
    assert f"{summary['rows_validation']} of them held out for validation" in (run_dir / "data_report.txt").read_text()


def test_rows_dropped_on_reading_and_on_building_are_each_counted_once(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir)
    long_row = {"instruction": "word " * 200, "output": "too long"}  # rejected when built: too_long
    rows = json.loads(Path(config.data.train).read_text()) + [long_row]  # 14 good + 1 empty + 1 too long
    Path(config.data.train).write_text(json.dumps(rows))
    validation = write_alpaca(tmp_path / "validation.json", count=3)  # 3 good + 1 empty
    config.data.validation, config.data.max_length = str(validation), 128
    tokenizer, template = setup_tokenizer(config)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data = setup_data(config, tokenizer, template)
    publish_data(data, config, run_dir, memory=None)
    counts = data.counts()

    assert counts["rows_in"] == 16 + 4
    assert (counts["rows_train"], counts["rows_validation"], counts["rows_rejected"]) == (14, 3, 3)
    assert counts["rejected_by_reason"] == {"empty_response": 2, "too_long": 1}
    report = json.loads((run_dir / "data_report.json").read_text())
    assert (report["rows_in"], report["rows_kept"]) == (16, 14)
    assert report["rejected_by_reason"] == {"empty_response": 1, "too_long": 1}
    assert len((run_dir / "rejected.jsonl").read_text().splitlines()) == 3


def test_resume_equals_uninterrupted(tmp_path, tiny_model_dir):
    uninterrupted = train(tiny_config(tmp_path / "a", tiny_model_dir))

    # Simulate a crash right after the step-3 checkpoint: drop everything written later.
    crashed = tmp_path / "b"
    shutil.copytree(tmp_path / "a", crashed)
    shutil.rmtree(crashed / "run" / "model")
    for checkpoint in (crashed / "run" / "checkpoints").iterdir():
        if checkpoint.name != "step-00000003":
            shutil.rmtree(checkpoint)
    config = tiny_config(crashed, tiny_model_dir)
    resumed = train(config, resume="auto")

    assert resumed.global_step == uninterrupted.global_step == 6
    a = load_file(str(uninterrupted.model_dir / "model.safetensors"))
    b = load_file(str(resumed.model_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(a[n], base[n]) for n in base)  # training did change the weights
    records = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))  # no step logged twice


def test_bf16_true_with_checkpointing_learns_a_repeated_example(tmp_path, tiny_model_dir):
    """bf16-true (every weight in bf16, no fp32 copy: tests/model/test_setup.py) with activation checkpointing still
    learns: on one example repeated, every step's loss is finite and lower than the step's before."""
    config = tiny_config(
        tmp_path, tiny_model_dir, max_steps=8, checkpoint_every=None, warmup_steps=0, learning_rate=1e-2,
        precision="bf16-true", gradient_checkpointing=True,
    )  # fmt: skip
    Path(config.data.train).write_text(json.dumps([{"instruction": "Repeat 7", "output": "Value 7 done"}] * 10))
    result = train(config)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 8 and all(math.isfinite(loss) for loss in losses)
    # each step lower: the bf16 weights' updates are not lost to rounding
    assert all(after < before for before, after in zip(losses, losses[1:], strict=False))
    assert losses[-1] < 0.7 * losses[0]  # here 6.00 -> 3.66
    used = yaml.safe_load((result.run_dir / "config.yaml").read_text())["train"]
    assert (used["precision"], used["gradient_checkpointing"]) == ("bf16-true", True)


def test_existing_output_is_never_overwritten_silently(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, max_steps=1, checkpoint_every=None)
    train(config)
    with pytest.raises(RunError, match="--overwrite"):
        train(config)
    config.output.overwrite = True
    assert train(config).global_step == 1


def test_saved_model_loads_and_stops_at_end_of_turn(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    result = train(tiny_config(tmp_path, tiny_model_dir, max_steps=2, checkpoint_every=None))
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    generation = GenerationConfig.from_pretrained(result.model_dir)
    end_ids = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in end_ids
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Repeat 3"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_lora_resume_equals_uninterrupted_and_base_is_untouched(tmp_path, tiny_model_dir):
    uninterrupted = train(tiny_config(tmp_path / "a", tiny_model_dir, method="lora"))
    crashed = tmp_path / "b"
    shutil.copytree(tmp_path / "a", crashed)
    shutil.rmtree(crashed / "run" / "model")
    for checkpoint in (crashed / "run" / "checkpoints").iterdir():
        if checkpoint.name != "step-00000003":
            shutil.rmtree(checkpoint)
    resumed = train(tiny_config(crashed, tiny_model_dir, method="lora"), resume="auto")

    checkpoint = load_file(str(crashed / "run" / "checkpoints" / "step-00000003" / "trainable.safetensors"))
    assert checkpoint and all(".lora_A." in n or ".lora_B." in n for n in checkpoint)  # adapters only
    a = load_file(str(uninterrupted.model_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.model_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(n.endswith("lora_B.weight") and t.abs().sum() > 0 for n, t in a.items())  # training moved B off 0
    assert not (uninterrupted.model_dir / "model.safetensors").exists()  # an adapter, not a copy of the base


def test_qlora_run_merges_and_generates_like_the_adapter(tmp_path, tiny_model_dir, capsys):
    from sftune.cli import main

    result = train(tiny_config(tmp_path, tiny_model_dir, method="qlora", max_steps=2, checkpoint_every=None))
    assert json.loads((result.model_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    merged = tmp_path / "merged"
    assert main(["merge", str(result.run_dir), "--out", str(merged)]) == 0
    assert (merged / "config.json").is_file() and (merged / "generation_config.json").is_file()
    capsys.readouterr()
    replies = []
    for folder in (result.run_dir, merged):
        assert main(["generate", str(folder), "--prompt", "Repeat 3", "--max-new-tokens", "6"]) == 0
        replies.append(capsys.readouterr().out)
    assert replies[0] == replies[1]  # generate on the adapter run == generate on the merged folder


def test_lora_trains_and_saves_the_rows_of_tokens_the_template_added(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftune.model.lora import merge_adapter

    config = tiny_config(tmp_path, tiny_model_dir, method="lora", max_steps=2, checkpoint_every=None)
    config.template.name = "llama3"  # its header / end-of-turn tokens are not in the tiny tokenizer
    result = train(config)
    base_vocab = load_file(str(tiny_model_dir / "model.safetensors"))["model.embed_tokens.weight"].shape[0]
    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    added = len(tokenizer) - base_vocab
    assert added > 0 and tokenizer.convert_tokens_to_ids("<|eot_id|>") >= base_vocab
    adapter = load_file(str(result.model_dir / "adapter_model.safetensors"))
    rows = next(t for n, t in adapter.items() if "trainable_tokens_delta" in n)  # [added, hidden]
    assert rows.shape[0] == added

    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(result.model_dir, tmp_path / "merged"))
    assert merged.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert torch.equal(merged.get_input_embeddings().weight[base_vocab:], rows)
