"""sftune: supervised fine-tuning of causal language models, correct by default."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftune.config import Config, ConfigError, EvalConfig, GenerateConfig, UserError, load_config

if TYPE_CHECKING:
    from sftune.training.run import TrainResult

__all__ = [
    "Config",
    "ConfigError",
    "EvalConfig",
    "GenerateConfig",
    "UserError",
    "evaluate",
    "load_config",
    "train",
    "train_dpo",
]
__version__ = "0.1.0"


def train(
    config: Config | dict[str, Any] | str,
    overrides: list[str] | None = None,
    resume: str | None = None,
    resume_changed: bool = False,
) -> TrainResult:
    """Fine-tune as `sftune train` does: a Config, a dict or a YAML path, with optional dotted overrides."""
    from sftune.recipes.sft import train as run

    return run(_as_config(config, overrides), resume=resume, resume_changed=resume_changed)


def train_dpo(
    config: Config | dict[str, Any] | str,
    overrides: list[str] | None = None,
    resume: str | None = None,
    resume_changed: bool = False,
) -> TrainResult:
    """Preference optimisation as `sftune dpo` does: a Config, a dict or a YAML path, with optional overrides."""
    from sftune.recipes.dpo import train_dpo as run

    return run(_as_config(config, overrides), resume=resume, resume_changed=resume_changed)


def _as_config(config: Config | dict[str, Any] | str, overrides: list[str] | None) -> Config:
    if isinstance(config, Config) and not overrides:
        return config
    return load_config(config.model_dump() if isinstance(config, Config) else config, overrides)


def evaluate(
    model: str,
    data: str,
    config: EvalConfig | None = None,
    out_dir: str | Path | None = None,
    baseline: str | None = None,
    run_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score a model (and a baseline) on held-out rows as `sftune eval` does; results and report in `out_dir`
    (default: MODEL/eval for a run folder)."""
    from sftune.recipes.evaluate import evaluate as run

    if out_dir is None:
        out_dir = Path(model) / "eval"
    return run(model, data, config or EvalConfig(), out_dir, baseline, run_dir, progress)
