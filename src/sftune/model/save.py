"""Save a trained model as a plain Hugging Face folder that loads with AutoModelForCausalLM anywhere."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from sftune.host.files import staged_folder


def generation_eos_ids(tokenizer: Any, seen_end_ids: set[int]) -> list[int]:
    """EOS plus every end-of-turn token the training mask closed a turn with: generation must stop on each."""
    ids = set(seen_end_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def normal_permissions(folder: Path) -> None:
    """Files get the permissions the umask gives any new file: safetensors writes its files 0600, which a team
    sharing a run folder (or a server reading it as another user) cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~mask)


def save_model_folder(model: Any, tokenizer: Any, out_dir: Path, dtype: torch.dtype, eos_ids: list[int]) -> Path:
    """Weights (safetensors), config, generation_config with every end-of-turn id, tokenizer + chat template.

    Written to a temporary sibling, then renamed, so a half-written folder never looks finished (host/files.py).
    """
    original_dtype = next(model.parameters()).dtype
    model.to(dtype)
    generation = model.generation_config
    generation.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    generation.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = generation.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = True
    try:
        with staged_folder(out_dir) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            normal_permissions(tmp)
    finally:
        model.to(original_dtype)
    return out_dir
