"""`sftune eval` and `sftune generate --input` on a tiny model: metrics, ids, the report, training-time samples."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from sftune.cli import main
from sftune.config import EvalConfig
from sftune.infer.generate import load_for_inference, prompt_ids
from sftune.recipes.evaluate import evaluate
from tests.conftest import REPO

ALPACA = REPO / "examples" / "data" / "alpaca_tiny.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train_tiny_run(tmp_path, model_dir):
    config = {
        # fp32 throughout (not auto = bf16 on CPUs that have it): the eval loss must reproduce the validation loss
        "model": {"name_or_path": str(model_dir), "dtype": "fp32"},
        "data": {"train": str(ALPACA), "validation": str(ALPACA)},
        "train": {
            "max_steps": 4,
            "micro_batch_size": 4,
            "learning_rate": 3e-3,
            "eval_every": 2,
            "progress": False,
            "precision": "fp32",
        },
        "eval": {"sample_prompts": 2, "sample_max_new_tokens": 5},
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    return tmp_path / "run"


def test_eval_beside_baseline_writes_results_generations_and_report(tmp_path, tiny_model_dir):
    run = train_tiny_run(tmp_path, tiny_model_dir)
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["index"]) for s in samples] == [(2, 0), (2, 1), (4, 0), (4, 1)]  # each evaluation
    assert samples[0]["prompt"] == "Give the capital of France."

    settings = EvalConfig(
        max_new_tokens=6, batch_size=3, report_samples=3, metrics=["exact_match", "stop_rate"], dtype="fp32"
    )
    results = evaluate(str(run), str(ALPACA), settings, run / "eval", baseline=str(tiny_model_dir), run_dir=run)

    rows = len(json.loads(ALPACA.read_text()))
    assert list(results["models"]) == ["baseline", "model"] and results["rows"] == rows
    # The loss on reference tokens is the training's validation loss: same rows, template, mask and weights.
    final_val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert math.isclose(results["models"]["model"]["loss"], final_val[-1]["val_loss"], rel_tol=1e-5)
    assert results["models"]["baseline"]["loss"] != results["models"]["model"]["loss"]
    for label in ("baseline", "model"):
        metrics = results["models"][label]
        assert 0.0 <= metrics["exact_match"] <= 1.0 and 0.0 <= metrics["stop_rate"] <= 1.0
        assert math.isclose(metrics["perplexity"], math.exp(metrics["loss"]), rel_tol=1e-9)

    lines = [json.loads(line) for line in (run / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == rows and lines[0]["id"].endswith("alpaca_tiny.json[0]")
    for line in lines:
        for label in ("baseline", "model"):
            assert line[label]["num_tokens"] <= 6
            assert line[label]["finished"] == line[label]["stop_rate"]

    report_md = (run / "eval" / "report.md").read_text()
    assert "| metric | baseline | model | change |" in report_md and "![loss](loss.png)" in report_md
    assert "Generations during training" in report_md and "Give the capital of France." in report_md
    html = (run / "eval" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "<table>" in html and 'src="http' not in html
    for image in ("loss.png", "validation.png"):
        assert (run / "eval" / image).read_bytes().startswith(PNG_MAGIC)


def test_cli_generate_from_a_file_keeps_ids_and_order_and_eval_needs_an_output_folder(tmp_path, tiny_model_dir, capsys):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"Count to {i}"} for i in (3, 1, 2)] + [{"nothing": "here"}]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out.jsonl"
    args = ["generate", str(tiny_model_dir), "--input", str(prompts), "--output", str(out), "--batch-size", "2"]
    assert main([*args, "--max-new-tokens", "3"]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["id"] for w in written] == ["q3", "q1", "q2"]
    assert all(w["num_tokens"] <= 3 and isinstance(w["finished"], bool) for w in written)
    captured = capsys.readouterr()
    assert "1 rows rejected" in captured.out and "prompts.jsonl:4" in captured.err

    assert main(["eval", str(tiny_model_dir), "--data", str(ALPACA)]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["eval", str(tiny_model_dir), "--data", str(ALPACA), "--out", str(tmp_path / "e"),
                 "--extractor", "regex"]) == 2  # fmt: skip
    assert "answer_pattern" in capsys.readouterr().err
    assert main(["eval", str(tiny_model_dir), "--data", str(ALPACA), "--out", str(tmp_path / "e"),
                 "--metrics", "exact_match,stop_rate", "--max-new-tokens", "2", "--max-rows", "3"]) == 0  # fmt: skip
    results = json.loads((tmp_path / "e" / "eval_results.json").read_text())
    assert results["rows"] == 3 and set(results["models"]["model"]) >= {"exact_match", "stop_rate", "loss"}
    assert "json_valid" not in results["models"]["model"]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapter_folder_generates_the_same_tokens_as_the_merged_model(tmp_path, tiny_model_dir, method):
    config = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(ALPACA)},
        "train": {"method": method, "max_steps": 3, "micro_batch_size": 4, "learning_rate": 1e-2, "progress": False},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "output": {"dir": str(tmp_path / "run")},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    assert main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 0

    messages = [{"role": "user", "content": "Give the capital of France."}]
    generated = []
    for folder in (tmp_path / "run", tmp_path / "merged"):
        model, tokenizer = load_for_inference(str(folder))
        ids = torch.tensor([prompt_ids(tokenizer, messages)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        generated.append(out[0, ids.shape[1] :])
    assert len(generated[0]) > 0 and torch.equal(generated[0], generated[1])  # greedy: the very same tokens
