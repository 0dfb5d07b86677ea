"""`sftune data check` / `sftune data inspect`, and the check that every training run starts with."""

from __future__ import annotations

import json

import pytest

from sftune.cli import main
from sftune.config import load_config
from sftune.recipes.sft import train
from sftune.training.run import RunError
from tests.conftest import REPO
from tests.e2e.helpers import NO_END_TOKEN, write_config


def test_data_check_prints_summary_and_writes_report_and_rejects(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "rows.jsonl"
    rows = [{"instruction": "Name a prime", "output": "7"}, {"instruction": "Say hi", "output": ""}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = write_config(tmp_path, tiny_model_dir, data)
    report_path, rejects = tmp_path / "report.json", tmp_path / "rejects.jsonl"
    assert main(["data", "check", str(config), "--json", str(report_path), "--rejects", str(rejects), "--strict"]) == 0
    out = capsys.readouterr().out
    assert "rows: 2 in (alpaca: 2) = 1 kept + 1 rejected" in out and "PASS inference_parity" in out
    assert "memory (estimate" in out
    report = json.loads(report_path.read_text())
    assert report["rows_in"] == 2 and report["rows_kept"] == 1 and all(c["passed"] for c in report["checks"])
    dropped = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(d["source"], d["reason"]) for d in dropped] == [("rows.jsonl:2", "empty_response")]


def test_data_check_strict_fails_on_a_broken_template(tmp_path, tiny_model_dir, capsys):
    template = tmp_path / "no_end.jinja"
    template.write_text(NO_END_TOKEN)
    config = write_config(tmp_path, tiny_model_dir, REPO / "examples" / "data" / "alpaca_tiny.json")
    assert main(["data", "check", str(config), f"template.name={template}"]) == 0
    assert "FAIL end_token_supervised: 8 of 8 failed" in capsys.readouterr().out
    assert main(["data", "check", str(config), f"template.name={template}", "--strict"]) == 1


def test_data_commands_report_user_mistakes_without_traceback(tmp_path, tiny_model_dir, capsys):
    assert main(["data", "check", str(tmp_path / "missing.yaml")]) == 2
    config = write_config(tmp_path, tiny_model_dir, tmp_path / "missing.json")
    assert main(["data", "inspect", str(config)]) == 2
    err = capsys.readouterr().err
    assert "missing.yaml" in err and "missing.json" in err and "Traceback" not in err


def test_data_inspect_terminal_and_html(tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir, REPO / "examples" / "data" / "alpaca_tiny.json")
    page = tmp_path / "inspect.html"
    assert main(["data", "inspect", str(config), "-n", "2", "--ids", "--html", str(page), "--color", "always"]) == 0
    out = capsys.readouterr().out
    assert "legend:" in out and out.count("── alpaca_tiny.json") == 2 and "\x1b[1;42;30m" in out
    assert page.read_text().count("<h2>") == 2


def test_data_inspect_into_a_file_has_no_colour_codes_and_brackets_the_trained_text(tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir, REPO / "examples" / "data" / "alpaca_tiny.json")
    assert main(["data", "inspect", str(config), "-n", "1"]) == 0  # captured: not a terminal
    out = capsys.readouterr().out
    assert "\x1b[" not in out and out.count("«") == out.count("»") >= 2  # the legend's pair and the reply's
    body = out.split("\n", 2)[2]
    trained = body[body.index("«") + 1 : body.index("»")]
    assert trained.endswith("<|im_end|>") and "<|im_start|>" not in trained  # the reply and its end token only


def test_training_writes_the_report_and_refuses_a_failed_mask_check(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, REPO / "examples" / "data" / "alpaca_tiny.json", max_steps=1)
    assert main(["train", str(config)]) == 0
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["rows_in"] == 8 and all(c["passed"] for c in report["checks"])
    assert "PASS end_token_supervised" in (tmp_path / "run" / "data_report.txt").read_text()

    template = tmp_path / "no_end.jinja"
    template.write_text(NO_END_TOKEN)
    broken = load_config(config, [f"template.name={template}", "output.overwrite=true"])
    with pytest.raises(RunError, match="end_token_supervised .*proceed_on_failed_checks"):
        train(broken)
    allowed = load_config(
        config, [f"template.name={template}", "output.overwrite=true", "data.proceed_on_failed_checks=true"]
    )
    assert train(allowed).global_step == 1
