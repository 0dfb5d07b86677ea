"""`sftune data check` and `sftune data inspect`: the training data as the sft (or dpo) recipe would see it, before
training. Rows of preference pairs (a first row with 'chosen' and 'rejected') are checked and shown branch by branch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from sftune.config import Config
from sftune.data.check import DataReport, build_configured
from sftune.data.formats import read_conversations
from sftune.data.inspect import (
    pair_branches,
    render_example_ansi,
    render_examples_html,
    render_legend_ansi,
    use_colour,
)
from sftune.data.pair_check import PairReport, check_pair_data
from sftune.data.preference import PairExample, build_pair_examples, is_preference_data, read_pairs
from sftune.data.templates import ChatTemplate
from sftune.data.types import Example
from sftune.infer.generate import resolve_model_dir
from sftune.model.setup import setup_tokenizer
from sftune.model.start import adapter_tokenizer
from sftune.training.data import check_training_data, write_rejections


def run_check(
    config: Config,
    rejects: str | Path | None = None,
    json_path: str | Path | None = None,
    world_size: int | None = None,
) -> DataReport | PairReport:
    """Build the data report; optionally write every dropped row (JSONL) and the report (JSON). `world_size`: the
    memory estimate per process of a run on that many processes (train.strategy)."""
    pairs = is_preference_data(config.data.train)
    tokenizer, template = data_tokenizer(config, pairs)
    if pairs:
        report: DataReport | PairReport = check_pair_data(config, tokenizer, template)
    else:
        report = check_training_data(config, tokenizer, template, world_size=world_size)
    if rejects:
        write_rejections(Path(rejects), report.rejections)
    if json_path:
        Path(json_path).write_text(report.to_json())
    return report


def inspect(
    config: Config,
    count: int,
    ids: bool = False,
    boundaries: bool = False,
    html: str | Path | None = None,
    color: str = "auto",
) -> int:
    """Print the first `count` trainable examples (pairs: both branches of each) with their supervised tokens
    highlighted (colour on a terminal, « » brackets elsewhere); optionally as HTML. Returns how many were shown."""
    pairs = is_preference_data(config.data.train)
    tokenizer, template = data_tokenizer(config, pairs)
    examples = (
        first_pair_branches(config, tokenizer, template, count)
        if pairs
        else first_examples(config, tokenizer, template, count)
    )
    colour = use_colour(color, sys.stdout)
    print(render_legend_ansi(colour))
    for example in examples:
        print(render_example_ansi(example, tokenizer, ids, boundaries, colour))
    if html:
        Path(html).write_text(render_examples_html(examples, tokenizer, ids, boundaries))
        print(f"wrote {html}")
    return len(examples)


def data_tokenizer(config: Config, pairs: bool) -> tuple[Any, ChatTemplate]:
    """The tokenizer and template training would use; preference data may start from an SFT run or adapter folder,
    as `sftune dpo` does."""
    if not pairs:
        return setup_tokenizer(config)
    folder = resolve_model_dir(config.model.name_or_path)
    model = config.model.model_copy(update={"name_or_path": folder})
    return setup_tokenizer(config.model_copy(update={"model": model}), adapter_tokenizer(folder))


def first_examples(config: Config, tokenizer: Any, template: ChatTemplate, count: int) -> list[Example]:
    conversations, _, _ = read_conversations(config.data.train, config.data)
    return build_configured(conversations, tokenizer, template, config, limit=count).examples


def first_pair_branches(config: Config, tokenizer: Any, template: ChatTemplate, count: int) -> list[Example]:
    """Chosen, then rejected, of the first `count` kept pairs, as `sftune dpo` trains them."""
    pairs, _ = read_pairs(config.data.train, config.data.system_prompt)
    kept: list[PairExample] = []
    for start in range(0, len(pairs), count):  # a chunk at a time, until `count` pairs are kept
        chunk = pairs[start : start + count]
        kept += build_pair_examples(chunk, tokenizer, template, config.data.max_length, config.data.truncation).pairs
        if len(kept) >= count:
            break
    return [example for pair in kept[:count] for example in pair_branches(pair)]
