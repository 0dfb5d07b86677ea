"""Helpers shared by the tests of more than one area (a helper of one area lives in tests/<area>/helpers.py): tiny
SFT and DPO run configs on a tiny model, and token-id examples of uneven lengths."""

from __future__ import annotations

import json
import random
from pathlib import Path

from sftune.config import load_config
from sftune.data.types import IGNORE_INDEX, Example

QUESTIONS = ["Say yes.", "Say ok.", "Agree?", "Confirm.", "Yes or no?", "Fine?", "Ready?", "Go?"]


def write_alpaca(path: Path, count: int = 14) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": f"Repeat {i}", "input": "x" * (i % 4), "output": f"Value {i} done"} for i in range(count)]
    rows.append({"instruction": "Empty answer", "input": "", "output": "  "})  # rejected: empty_response
    path.write_text(json.dumps(rows))
    return path


def tiny_config(tmp_path: Path, model_dir: Path, **train_overrides):
    """An SFT run of 6 steps (micro-batch 2 x accumulation 2, a checkpoint every 3) on write_alpaca's rows."""
    train = {
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 6,
        "learning_rate": 1e-3,
        "warmup_steps": 2,
        "progress": False,
        "checkpoint_every": 3,
        "keep_checkpoints": 3,
        **train_overrides,
    }
    return load_config(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"train": str(write_alpaca(tmp_path / "data.json")), "validation_fraction": 0.2},
            "train": train,
            "output": {"dir": str(tmp_path / "run")},
        }
    )


def write_pairs(path, count=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": q, "chosen": "Yes, done.", "rejected": "No!"} for q in (QUESTIONS * 4)[:count]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dpo_config(tmp_path, model_dir, **train):
    """A LoRA DPO run of 12 steps on 16 pairs that all prefer the same answer."""
    return load_config(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"train": str(write_pairs(tmp_path / "pairs.jsonl", 16)), "validation_fraction": 0.25},
            "template": {"name": "chatml"},
            "train": {"method": "lora", "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 12,
                      "learning_rate": 5e-3, "warmup_steps": 0, "progress": False, "precision": "fp32", **train},
            "lora": {"r": 8, "dropout": 0.0},
            "dpo": {"beta": 0.5},
            "output": {"dir": str(tmp_path / "run")},
        }
    )  # fmt: skip


def make_examples(vocab: int, count: int = 8, seed: int = 0) -> list[Example]:
    """Examples of very different lengths and supervised fractions: where a mean of means goes wrong."""
    rng = random.Random(seed)
    examples = []
    for i in range(count):
        length = rng.randint(5, 40)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        prompt = rng.randint(1, length - 2)
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        examples.append(Example(ids, labels, source=f"ex{i}"))
    return examples
