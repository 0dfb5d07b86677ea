"""sftune: supervised fine-tuning of causal language models, correct by default."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sftune.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from sftune.recipes.sft import TrainResult

__all__ = ["Config", "ConfigError", "load_config", "train"]
__version__ = "0.1.0"


def train(
    config: Config | dict[str, Any] | str, overrides: list[str] | None = None, resume: str | None = None
) -> TrainResult:
    """Fine-tune as `sftune train` does: a Config, a dict or a YAML path, with optional dotted overrides."""
    from sftune.recipes.sft import train as run

    if not isinstance(config, Config) or overrides:
        config = load_config(config.model_dump() if isinstance(config, Config) else config, overrides)
    return run(config, resume=resume)
