"""`sftune data check` and `sftune data inspect`: the training data as the sft recipe would see it, before training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sftune.config import Config
from sftune.data.check import DataReport, check_data, load_model_config
from sftune.data.formats import read_conversations
from sftune.data.masking import build_example
from sftune.data.types import Example
from sftune.model.load import resolve_model_path
from sftune.recipes.sft import setup_tokenizer, write_rejections


def run_check(config: Config, rejects: str | Path | None = None, json_path: str | Path | None = None) -> DataReport:
    """Build the data report; optionally write every dropped row (JSONL) and the report (JSON)."""
    tokenizer, template = setup_tokenizer(config)
    model_config = load_model_config(resolve_model_path(config.model.name_or_path))
    report = check_data(config, tokenizer, template, model_config)
    if rejects:
        write_rejections(Path(rejects), report.rejections)
    if json_path:
        Path(json_path).write_text(report.to_json())
    return report


def first_examples(config: Config, count: int) -> tuple[list[Example], Any]:
    """The first `count` trainable examples of config.data.train, and the tokenizer that made them."""
    tokenizer, template = setup_tokenizer(config)
    conversations, _, _ = read_conversations(config.data.train, config.data)
    examples: list[Example] = []
    for conversation in conversations:
        if len(examples) >= count:
            break
        result = build_example(
            tokenizer, template, conversation, config.template.mask, config.data.max_length, config.data.truncation
        )
        if isinstance(result, Example):
            examples.append(result)
    return examples, tokenizer
