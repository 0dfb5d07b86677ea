"""What inference needs from the run that trained a model, saved inside the model folder itself.

`sftune train` writes `sftune_inference.json` next to the weights (or the adapter): the data settings that turn a
row into a prompt (format, columns, system prompt), the template it trained with, and the run's eval section. So
`sftune generate`, `chat` and `eval` build the same prompt ids whether they are given RUN, RUN/model or a copy of
that folder elsewhere. (The template's text itself travels on the tokenizer, as its chat_template.) A model folder
without the file, from a run saved before it existed, falls back to the config.yaml of the run folder around it;
anything else (a base model, a .gguf file, a hub id) gets the defaults.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftune.config import Config, ConfigError, DataConfig, load_config, validate_section
from sftune.data.templates import ChatTemplate
from sftune.host.files import write_text_atomic
from sftune.infer.prompts import PromptSettings
from sftune.model.lora import is_adapter_folder

INFERENCE_FILE = "sftune_inference.json"
FILE_VERSION = 1
# A run's data settings that decide how a row becomes a prompt; every other data field only matters in training.
PROMPT_FIELDS = ("format", "columns", "system_prompt")


@dataclass(frozen=True)
class RunSettings:
    """The trained run's prompt settings and eval section, and where they were read from."""

    prompts: PromptSettings = field(default_factory=PromptSettings)
    eval: dict[str, Any] = field(default_factory=dict)  # the run's eval section; empty: the defaults
    source: str | None = None  # the file they came from; None for a model no sftune run trained

    def with_system_prompt(self, system_prompt: str | None) -> RunSettings:
        """A system prompt given at inference replaces the run's; None keeps it."""
        if not system_prompt:
            return self
        prompts = PromptSettings(self.prompts.format, dict(self.prompts.columns), system_prompt)
        return RunSettings(prompts, self.eval, self.source)


def inference_settings(config: Config, template: ChatTemplate) -> dict[str, Any]:
    """What `sftune_inference.json` holds for a run of `config` that trained with `template`."""
    return {
        "version": FILE_VERSION,
        "data": {name: getattr(config.data, name) for name in PROMPT_FIELDS},
        "template": {"name": config.template.name, "resolved": template.name},
        "eval": config.eval.model_dump(mode="json"),
    }


def write_inference_settings(model_dir: Path, config: Config, template: ChatTemplate) -> Path:
    """Write the file into a saved model (or adapter) folder, whole or not at all."""
    path = Path(model_dir) / INFERENCE_FILE
    write_text_atomic(path, json.dumps(inference_settings(config, template), indent=2) + "\n")
    return path


def model_folder(path: str | Path) -> Path | None:
    """The folder holding the weights or the adapter: RUN/model for a run folder, the folder itself for a model
    folder; None for a .gguf file, a named model or a hub id."""
    candidate = Path(path) / "model"
    if (candidate / "config.json").is_file() or is_adapter_folder(candidate):
        return candidate
    return Path(path) if Path(path).is_dir() else None


def run_folder_of(path: str | Path) -> Path | None:
    """The run folder `path` is, or whose model/ it is (the folder with the run's config.yaml); else None."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        return path
    if path.name == "model" and (path.parent / "config.yaml").is_file():
        return path.parent
    return None


def read_run_settings(path: str | Path, system_prompt: str | None = None) -> RunSettings:
    """The settings of the run that trained the model at `path` (RUN, RUN/model or a copy of it), from its
    sftune_inference.json, else its run's config.yaml, else the defaults; `system_prompt` replaces the run's."""
    folder = model_folder(path)
    saved = folder / INFERENCE_FILE if folder is not None else None
    if saved is not None and saved.is_file():
        settings = read_saved_settings(saved)
    else:
        run_dir = run_folder_of(folder if folder is not None else path)
        settings = read_run_config(run_dir / "config.yaml") if run_dir is not None else RunSettings()
    return settings.with_system_prompt(system_prompt)


def read_saved_settings(path: Path) -> RunSettings:
    """An sftune_inference.json, checked: a damaged file is an error, never a silent fall back to the defaults
    (that would prompt the model without the system prompt and columns it was trained with)."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}): restore it from the run folder, or delete it") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("data"), dict):
        raise ConfigError(f"{path} is not an sftune inference settings file (no 'data' mapping): delete it")
    data = validate_section(DataConfig, {"train": "unused", **saved["data"]}, str(path))
    eval_section = saved["eval"] if isinstance(saved.get("eval"), dict) else {}
    return RunSettings(PromptSettings(data.format, dict(data.columns), data.system_prompt), eval_section, str(path))


def read_run_config(config_file: Path) -> RunSettings:
    """The settings in a run folder's config.yaml (a run saved before sftune_inference.json existed)."""
    try:
        config = load_config(config_file)
    except (ConfigError, OSError) as exc:
        print(f"warning: {config_file} cannot be read, so its data settings are not used: {exc}", file=sys.stderr)
        return RunSettings()
    data = config.data
    prompts = PromptSettings(data.format, dict(data.columns), data.system_prompt)
    return RunSettings(prompts, config.eval.model_dump(mode="json"), str(config_file))
