"""A model's repeated decoder blocks: what FSDP2 shards one by one and what `train.compile` compiles.

Compiling block by block (regional compilation) rather than the whole model: every block runs the same code, so
one compiled graph serves them all and start-up pays for one block, not for the depth of the model; the embedding,
the LM head and the chunked loss (training/loss.py) stay eager. Shapes are marked dynamic from the start because a
padding-free row's length changes with every micro-batch.
"""

from __future__ import annotations

from typing import Any

import torch

from sftune.config import UserError


def unwrapped_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of the classes the model names in `_no_split_modules` (empty when it names none)."""
    names = set(getattr(unwrapped_model(model), "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_blocks(model: torch.nn.Module) -> int:
    """torch.compile each decoder block in place (compiled at its first call); returns how many. Refuses
    (UserError) a model that names no block class."""
    layers = decoder_layers(model)
    if not layers:
        raise UserError(
            f"{type(model).__name__} names no decoder layer class (_no_split_modules) to compile: set "
            "train.compile=false for this model"
        )
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
