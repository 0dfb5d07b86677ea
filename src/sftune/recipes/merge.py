"""`sftune merge`: fold a LoRA/QLoRA adapter into its fp32 base and write a plain Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

from sftune.infer.generate import resolve_model_dir
from sftune.model.lora import merge_adapter


def merge(adapter: str, out_dir: str) -> Path:
    """`adapter` is an adapter folder or a run folder whose model/ holds one."""
    return merge_adapter(resolve_model_dir(adapter), out_dir)
