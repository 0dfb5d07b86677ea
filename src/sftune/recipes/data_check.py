"""`sftune data check` and `sftune data inspect`: the training data as the sft recipe would see it, before training."""

from __future__ import annotations

from pathlib import Path

from sftune.config import Config
from sftune.data.check import DataReport, build_configured
from sftune.data.formats import read_conversations
from sftune.data.inspect import render_example_ansi, render_examples_html, render_legend_ansi
from sftune.model.setup import setup_tokenizer
from sftune.training.data import check_training_data, write_rejections


def run_check(config: Config, rejects: str | Path | None = None, json_path: str | Path | None = None) -> DataReport:
    """Build the data report; optionally write every dropped row (JSONL) and the report (JSON)."""
    tokenizer, template = setup_tokenizer(config)
    report = check_training_data(config, tokenizer, template)
    if rejects:
        write_rejections(Path(rejects), report.rejections)
    if json_path:
        Path(json_path).write_text(report.to_json())
    return report


def inspect(
    config: Config, count: int, ids: bool = False, boundaries: bool = False, html: str | Path | None = None
) -> int:
    """Print the first `count` trainable examples with their supervised tokens highlighted; optionally as HTML.
    Returns how many were shown."""
    tokenizer, template = setup_tokenizer(config)
    conversations, _, _ = read_conversations(config.data.train, config.data)
    built = build_configured(conversations, tokenizer, template, config, limit=count)
    print(render_legend_ansi())
    for example in built.examples:
        print(render_example_ansi(example, tokenizer, ids, boundaries))
    if html:
        Path(html).write_text(render_examples_html(built.examples, tokenizer, ids, boundaries))
        print(f"wrote {html}")
    return len(built.examples)
