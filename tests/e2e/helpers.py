"""Helpers of the end-to-end tests: a run's YAML for the CLI, a template with no end-of-turn token, and how far a
run's metrics file has got."""

from __future__ import annotations

from pathlib import Path

import yaml

# A template that closes no turn: nothing teaches the model to stop (the data check flags it).
NO_END_TOKEN = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def write_config(tmp_path: Path, model_dir: Path, train_file: Path, **train) -> Path:
    config = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(train_file)},
        "train": {"max_steps": 3, "micro_batch_size": 2, "learning_rate": 1e-3, "progress": False, **train},
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def metric_lines(path: Path) -> int:
    """Lines in a run's metrics.jsonl so far (0 before it exists)."""
    return path.read_text().count("\n") if path.exists() else 0
