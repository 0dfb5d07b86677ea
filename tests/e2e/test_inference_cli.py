"""`sftune generate`, `chat` and `eval` as a user types them: --template for a base model, RUN and RUN/model alike,
and one clear message (exit 2, no traceback) for a missing model path, a bad --input, before any model loads."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from sftune.cli import build_parser, main
from sftune.data.templates import BUILTIN_TEMPLATES
from tests.conftest import REPO
from tests.infer.helpers import build_base_model

ALPACA = REPO / "examples" / "data" / "alpaca_tiny.json"


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory):
    return build_base_model(tmp_path_factory.mktemp("base"))


def refused(capsys, argv: list[str]) -> str:
    """The one message of a command that must stop with exit 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("path", ["./missing", "runs/missing-run", "runs/missing-run/model", "a/b/model", ".hidden"])
@pytest.mark.parametrize("command", ["generate", "chat", "eval"])
def test_a_model_path_that_does_not_exist_is_no_such_folder(tmp_path, monkeypatch, capsys, command, path):
    monkeypatch.chdir(tmp_path)  # no runs/ folder here
    extra = {"generate": ["--prompt", "hi"], "chat": [], "eval": ["--data", str(ALPACA)]}[command]
    err = refused(capsys, [command, path, *extra])
    assert f"no such folder: {path}" in err
    assert "not a run folder" not in err and "hub id '" not in err


def test_a_missing_gguf_file_is_no_such_file_and_a_hub_id_is_still_a_hub_id(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert "no such file: models/x.gguf" in refused(capsys, ["generate", "models/x.gguf", "--prompt", "hi"])
    err = refused(capsys, ["generate", "someorg/somemodel", "--prompt", "hi"])
    assert "no such folder" not in err and "as a hub id" in err  # offline: the hub is not asked
    (tmp_path / "someorg").mkdir()  # a local folder of that name: the user meant a path under it
    assert "no such folder: someorg/somemodel" in refused(capsys, ["generate", "someorg/somemodel", "--prompt", "hi"])


def test_generate_checks_its_input_and_output_before_loading_the_model(tmp_path, tiny_model_dir, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr("sftune.recipes.generate.load_for_inference", no_model)
    out = str(tmp_path / "out.jsonl")
    generate = ["generate", str(tiny_model_dir), "--output", out, "--input"]
    missing = tmp_path / "missing.jsonl"
    assert f"--input file '{missing}' does not exist" in refused(capsys, [*generate, str(missing)])
    assert "is a folder, not a file" in refused(capsys, [*generate, str(tmp_path)])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "fine"}\n{"prompt": \n')
    assert "broken.jsonl" in (err := refused(capsys, [*generate, str(broken)])) and "line 2" in err
    no_prompt = tmp_path / "no_prompt.jsonl"
    no_prompt.write_text('{"text": "nothing to answer"}\n')
    assert "no_prompt.jsonl:1" in refused(capsys, [*generate, str(no_prompt)])
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "fine"}\n')
    err = refused(capsys, ["generate", str(tiny_model_dir), "--input", str(good), "--output", "no/such/dir/o.jsonl"])
    assert "does not exist" in err and not (tmp_path / "out.jsonl").exists()


def documented_output_fields() -> list[str]:
    """The fields `sftune generate --help` promises for each line of --output."""
    generate = build_parser()._subparsers._group_actions[0].choices["generate"]  # type: ignore[union-attr]
    help_text = next(a.help for a in generate._actions if "--output" in a.option_strings)
    return [name.strip() for name in re.search(r"\{([^}]*)\}", help_text).group(1).split(",")]  # type: ignore[union-attr]


def test_generate_writes_exactly_the_fields_its_help_promises(tmp_path, tiny_model_dir, capsys):
    rows = [{"id": "with", "prompt": "Name a prime", "completion": "7"}, {"id": "without", "question": "2+2?"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out.jsonl"
    argv = ["generate", str(tiny_model_dir), "--input", str(prompts), "--output", str(out), "--max-new-tokens", "2"]
    assert main(argv) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    documented = set(documented_output_fields())
    assert "prompt" in documented
    assert set(written[0]) == documented  # a row with a reference
    assert set(written[1]) == documented - {"reference"}
    assert [w["prompt"] for w in written] == ["Name a prime", "2+2?"]
    assert all(w["messages"][-1] == {"role": "user", "content": w["prompt"]} for w in written)
    assert written[0]["reference"] == "7"


def test_template_option_prompts_a_base_model_and_its_absence_is_one_message(tmp_path, base_model_dir, capsys):
    base = str(base_model_dir)
    for argv in (["generate", base, "--prompt", "hi"], ["chat", base]):
        err = refused(capsys, argv)
        assert "--template" in err and all(name in err for name in BUILTIN_TEMPLATES)
    assert "does not exist" in refused(capsys, ["chat", base, "--template", str(tmp_path / "none.jinja")])

    assert main(["generate", base, "--prompt", "hi", "--template", "chatml", "--max-new-tokens", "3"]) == 0
    out = tmp_path / "eval"
    argv = ["eval", base, "--data", str(ALPACA), "--out", str(out), "--template", "alpaca", "--max-rows", "2"]
    assert main([*argv, "--max-new-tokens", "2", "--metrics", "stop_rate"]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert results["models"]["model"]["template"] == "--template alpaca" and results["rows"] == 2


def test_run_and_run_model_generate_the_same_lines(tmp_path, tiny_model_dir, capsys):
    config = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(ALPACA), "system_prompt": "Be brief."},
        "train": {"max_steps": 1, "micro_batch_size": 2, "progress": False},
        "output": {"dir": str(tmp_path / "run")},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {i}"}) + "\n" for i in range(3)))
    lines = []
    for model in (tmp_path / "run", tmp_path / "run" / "model"):
        out = tmp_path / f"{model.name}.jsonl"
        argv = ["generate", str(model), "--input", str(prompts), "--output", str(out), "--max-new-tokens", "4"]
        assert main([*argv, "--dtype", "fp32"]) == 0
        lines.append(
            [{k: v for k, v in json.loads(line).items() if k != "id"} for line in out.read_text().splitlines()]
        )
    assert lines[0] == lines[1]
    assert all(line["messages"][0] == {"role": "system", "content": "Be brief."} for line in lines[1])
