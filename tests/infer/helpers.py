"""Helpers of the inference tests: a base model (a tokenizer with no chat template), and training's own rendering
of a conversation, to compare inference's prompt ids against."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from sftune.config import load_config
from sftune.data.masking import build_example
from sftune.data.types import IGNORE_INDEX, Conversation, Example, Message
from sftune.model.setup import setup_tokenizer
from tests.conftest import build_tiny_model, build_tiny_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "Seven."},
]


def build_base_model(root: Path) -> Path:
    """A tiny model whose tokenizer has no chat template, as a base model on the hub ships."""
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_tokenizer(root / "tokenizer"))
    tokenizer.chat_template = None
    tokenizer.save_pretrained(root / "base-tokenizer")
    model_dir = build_tiny_model(root / "base", root / "base-tokenizer")
    assert not AutoTokenizer.from_pretrained(model_dir).chat_template
    return model_dir


def training_example(model_dir: Path, template: str, messages: list[dict[str, str]]) -> tuple[Example, int]:
    """The example training builds for `messages` with template.name=`template` on `model_dir`, and the position
    of its first supervised token (where the reply starts: everything before it is the prompt)."""
    config = load_config({"model": {"name_or_path": str(model_dir)}, "data": {"train": "unused.json"}})
    config.template.name = template
    tokenizer, chat_template = setup_tokenizer(config)
    conversation = Conversation([Message(m["role"], m["content"]) for m in messages], source="test")  # type: ignore[arg-type]
    example = build_example(tokenizer, chat_template, conversation)
    assert isinstance(example, Example), example
    return example, next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
