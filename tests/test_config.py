"""The one config schema: YAML, dotted overrides and Python agree; mistakes name the key and suggest a fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from sftune.config import Config, ConfigError, load_config
from tests.conftest import REPO

EXAMPLES = sorted((REPO / "examples").glob("*.yaml")) + [REPO / "src" / "sftune" / "demo" / "demo.yaml"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_yaml_validates(path: Path):
    config = load_config(path)
    assert isinstance(config, Config)
    train_path = Path(config.data.train)
    if "path/to" not in config.model.name_or_path:
        assert train_path.is_file(), f"{path.name}: data.train {train_path} does not exist"


def test_overrides_are_typed_and_dotted(tmp_path):
    config = load_config(
        {"data": {"train": "x.json"}},
        ["train.learning_rate=1e-4", "train.max_steps=7", "template.mask=last_assistant", "train.max_grad_norm=null"],
    )
    assert config.train.learning_rate == 1e-4 and config.train.max_steps == 7
    assert config.template.mask == "last_assistant" and config.train.max_grad_norm is None


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError) as err:
        load_config({"data": {"train": "x.json"}}, ["train.learning_rat=1e-4"])
    assert "train.learning_rat" in str(err.value) and "did you mean 'train.learning_rate'" in str(err.value)


def test_unknown_section_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_config({"data": {"train": "x.json"}, "trian": {}})


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="'train.micro_batch_size'"):
        load_config({"data": {"train": "x.json"}}, ["train.micro_batch_size=many"])


def test_missing_required_key():
    with pytest.raises(ConfigError, match="missing required key 'data'"):
        load_config({})


def test_yaml_paths_resolve_relative_to_the_file(tmp_path):
    (tmp_path / "rows.jsonl").write_text("")
    (tmp_path / "run.yaml").write_text("data:\n  train: rows.jsonl\n")
    assert load_config(tmp_path / "run.yaml").data.train == str(tmp_path / "rows.jsonl")


@pytest.mark.integration
def test_python_api_accepts_the_same_config(tiny_model_dir, tmp_path):
    import sftune

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "completion": "b"}\n' * 3)
    result = sftune.train(
        {
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": str(rows)},
            "output": {"dir": str(tmp_path / "run")},
        },
        overrides=["train.max_steps=1", "train.progress=false"],
    )
    assert result.global_step == 1
