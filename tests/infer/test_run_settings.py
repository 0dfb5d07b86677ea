"""The model folder carries what inference needs: RUN, RUN/model and a copy of RUN/model elsewhere read the same
prompt settings (format, columns, system prompt) and eval section, so they give the same prompt ids."""

from __future__ import annotations

import json
import shutil

import pytest

import sftune
from sftune.config import ConfigError, GenerateConfig
from sftune.infer.generate import load_for_inference, prompt_ids
from sftune.infer.prompts import read_prompt_rows
from sftune.infer.run_settings import INFERENCE_FILE, read_run_settings
from sftune.recipes.evaluate import resolve_eval_settings
from sftune.recipes.generate import generate

pytestmark = pytest.mark.integration  # trains a tiny run once

SYSTEM = "Answer with one word."
COLUMNS = {"instruction": "question", "output": "reply"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("run-settings")
    rows = [{"question": f"Repeat {i}", "reply": f"Value {i}"} for i in range(8)]
    (root / "data.json").write_text(json.dumps(rows))
    config = {
        "model": {"name_or_path": str(tiny_model_dir), "dtype": "fp32"},
        "data": {"train": str(root / "data.json"), "format": "alpaca", "columns": COLUMNS, "system_prompt": SYSTEM},
        "train": {"max_steps": 1, "micro_batch_size": 2, "progress": False, "precision": "fp32"},
        "eval": {"extractor": "last_line", "metrics": ["exact_match"]},
        "output": {"dir": str(root / "run")},
    }
    sftune.train(config)
    return root / "run"


@pytest.fixture
def prompts_file(tmp_path):
    """Rows in the run's own columns: only its data settings make prompts of them."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "question": f"Repeat {i}"}) + "\n" for i in range(3)))
    return path


def prompt_ids_of(model_path: str, prompts_file) -> list[list[int]]:
    rows, rejected = read_prompt_rows(str(prompts_file), settings=read_run_settings(model_path).prompts)
    assert not rejected
    _, tokenizer = load_for_inference(model_path, "cpu", "fp32")
    return [prompt_ids(tokenizer, row.prompt) for row in rows]


def test_run_and_its_model_folder_and_a_copy_of_it_give_the_same_prompt_ids(run_dir, prompts_file, tmp_path):
    saved = json.loads((run_dir / "model" / INFERENCE_FILE).read_text())
    assert saved["data"] == {"format": "alpaca", "columns": COLUMNS, "system_prompt": SYSTEM}
    copy = shutil.copytree(run_dir / "model", tmp_path / "elsewhere" / "my-model")

    expected = prompt_ids_of(str(run_dir), prompts_file)
    for path in (run_dir / "model", copy):
        assert prompt_ids_of(str(path), prompts_file) == expected
    _, tokenizer = load_for_inference(str(copy), "cpu", "fp32")
    assert SYSTEM in tokenizer.decode(expected[0])  # the run's system prompt, not the template's default


def test_a_typed_prompt_is_a_user_turn_whatever_format_the_run_trained_on(run_dir, monkeypatch):
    seen = []
    monkeypatch.setattr(
        "sftune.recipes.generate.generate_replies", lambda m, t, prompts, *a: seen.extend(prompts) or []
    )
    with pytest.raises(IndexError):  # no reply from the stand-in: the prompt is what is checked
        generate(str(run_dir), GenerateConfig(), prompt="Repeat 3")
    (prompt,) = seen
    assert prompt.messages[-1] == {"role": "user", "content": "Repeat 3"}
    assert prompt.messages[0] == {"role": "system", "content": SYSTEM}  # the run's alpaca rows had this system prompt


def test_a_run_saved_before_the_file_existed_reads_its_run_folder_config(run_dir, tmp_path):
    old_run = shutil.copytree(run_dir, tmp_path / "old-run")
    (old_run / "model" / INFERENCE_FILE).unlink()
    for path in (old_run, old_run / "model"):
        settings = read_run_settings(path)
        assert (settings.prompts.format, settings.prompts.columns) == ("alpaca", COLUMNS)
        assert settings.prompts.system_prompt == SYSTEM
    assert read_run_settings(old_run / "model", "Be verbose.").prompts.system_prompt == "Be verbose."


def test_eval_of_the_model_folder_uses_the_runs_eval_section_and_folder(run_dir, tmp_path):
    from_run = resolve_eval_settings(str(run_dir), None, [], None)
    from_model = resolve_eval_settings(str(run_dir / "model"), None, [], None)
    assert from_run == from_model and from_run[0].extractor == "last_line" and from_run[2] == run_dir
    copy = shutil.copytree(run_dir / "model", tmp_path / "my-model")
    settings, out, folder = resolve_eval_settings(str(copy), None, ["eval.max_rows=2"], str(tmp_path / "out"))
    assert (settings.extractor, settings.metrics, settings.max_rows, folder) == ("last_line", ["exact_match"], 2, None)


def test_a_damaged_settings_file_is_an_error_not_a_silent_default(run_dir, tmp_path):
    copy = shutil.copytree(run_dir / "model", tmp_path / "damaged")
    (copy / INFERENCE_FILE).write_text('{"data": {"format": "alpaca", "colums": {}}}')
    with pytest.raises(ConfigError, match="colums"):
        read_run_settings(copy)
    (copy / INFERENCE_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match=INFERENCE_FILE):
        read_run_settings(copy)
