"""A run's tokenizer (with its chat template installed) and its model, prepared for the configured method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sftune.config import Config
from sftune.data.templates import ChatTemplate, install_template, resolve_template
from sftune.model.attention import ATTENTION
from sftune.model.blocks import compile_blocks
from sftune.model.frozen_base import cast_frozen_base, frozen_base_dtype
from sftune.model.lean_activations import is_used as is_lean
from sftune.model.lean_activations import make_activations_lean
from sftune.model.load import load_model, load_tokenizer, resolve_model_path
from sftune.model.lora import prepare_model
from sftune.model.start import continue_adapter


def setup_tokenizer(config: Config, tokenizer: Any = None) -> tuple[Any, ChatTemplate]:
    """The model's tokenizer (or the one given, e.g. an SFT adapter's) with the run's chat template set on it (so
    it is saved with the model)."""
    if tokenizer is None:
        model_path = resolve_model_path(config.model.name_or_path)
        tokenizer = load_tokenizer(model_path, config.model.trust_remote_code, config.model.revision)
    template = resolve_template(config.template.name, tokenizer)
    install_template(template, tokenizer)
    if tokenizer.pad_token_id is None:
        # Safe even though pad == eos then: padding is masked by position, never by token id.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, template


def setup_model(
    config: Config,
    tokenizer: Any,
    device: torch.device,
    precision: str,
    adapter_dir: Path | None = None,
    strategy: str = "single",
) -> Any:
    """Load the model, grow its embeddings for tokens the template added, and prepare it for full/LoRA/QLoRA
    (or, given `adapter_dir`, put that saved adapter on it to train further). Under LoRA the frozen base linears
    are then stored in lora.base_dtype (model/frozen_base.py), and with train.compile the decoder blocks are
    compiled (model/blocks.py); `strategy` is the run's (single, ddp, fsdp2)."""
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    # Padding-free rows need attention that stays within each example: the segment attention does it without a mask.
    attention = ATTENTION if config.train.padding_free else "sdpa"
    model: Any = load_model(
        resolve_model_path(config.model.name_or_path),
        dtype,
        device,
        config.model.trust_remote_code,
        config.model.revision,
        attention,
        config.model.allow_pickle,
    )
    base_vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > base_vocab:
        model.resize_token_embeddings(len(tokenizer))  # the template added special tokens
    if config.train.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        print(f"activation checkpointing on (train.gradient_checkpointing={config.train.gradient_checkpointing})")
    model.config.use_cache = False
    if adapter_dir is not None:  # an SFT adapter trained further (dpo.adapter=continue)
        model = continue_adapter(model, adapter_dir, config.train.method)
    else:  # full / lora / qlora: which parameters train, whether the base is 4-bit; added tokens' rows always train
        model = prepare_model(model, config, added_token_ids=list(range(base_vocab, len(tokenizer))))
    base_dtype = frozen_base_dtype(config, precision)
    if base_dtype is not None:
        cast = cast_frozen_base(model, base_dtype)
        print(f"LoRA: {cast} frozen base linears stored in {str(base_dtype).removeprefix('torch.')} (lora.base_dtype)")
    if config.train.compile:
        print(f"torch.compile: {compile_blocks(model)} decoder blocks, compiled at their first micro-batches")
    elif is_lean(config.train):
        blocks = make_activations_lean(model)
        print(
            f"lean activations: {blocks} decoder blocks keep their matrix products and attention for backward and "
            "recompute their element-wise work (selective activation checkpointing, train.lean_activations)"
        )
    return model
