"""Where a second training stage (DPO) starts: a model, or the output of an SFT run, full or adapter.

`model.name_or_path` may be an SFT run's model folder or adapter folder (the recipe turns a run folder into its
model/). A full model loads like any model. An adapter is either merged into its base once, into the new run's
folder (`start_model/`), so that a new adapter or full fine-tuning starts from the SFT model (dpo.adapter=merge),
or loaded as it was saved and trained further (dpo.adapter=continue, with the method SFT used). The tokenizer,
with the chat template SFT trained with, always comes from the SFT output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import peft
from transformers import AutoTokenizer

from sftune.model.load import resolve_model_path
from sftune.model.lora import (
    AdapterError,
    adapter_base_path,
    adapter_method,
    describe_parameters,
    is_adapter_folder,
    merge_adapter,
    quantize_base_to_nf4,
)

START_MODEL = "start_model"  # in the run folder: the SFT adapter merged into its base


@dataclass(frozen=True)
class StartingPoint:
    model_path: str  # the folder (or hub id) the weights and tokenizer load from: the base when continuing an adapter
    adapter_dir: Path | None = None  # the adapter to train further (dpo.adapter=continue)


def find_starting_point(
    model_folder: str, adapter: Literal["merge", "continue"], method: str, run_dir: Path
) -> StartingPoint:
    """A model folder (or named model, hub id) as it is; an adapter folder merged into run_dir/start_model (once: a
    resume reuses it), or continued with the method it was trained with."""
    folder = Path(model_folder).expanduser()
    if folder.is_dir():  # absolute: the adapter this run saves names its base, and must find it from anywhere
        folder = folder.resolve()
    if not is_adapter_folder(folder):
        return StartingPoint(resolve_model_path(str(folder) if folder.is_dir() else model_folder))
    if adapter == "merge":
        merged = run_dir / START_MODEL
        if not (merged / "config.json").is_file():  # written to a temporary folder, then renamed: whole or absent
            print(f"merging the SFT adapter {folder} into its base: {merged}")
            merge_adapter(folder, merged)
        return StartingPoint(str(merged))
    trained_with = adapter_method(folder)
    if method != trained_with:
        raise AdapterError(
            f"dpo.adapter=continue trains the adapter in '{folder}' further, and it was trained with "
            f"train.method={trained_with}: set train.method={trained_with}, or dpo.adapter=merge to train with "
            f"train.method={method} on the SFT model merged"
        )
    return StartingPoint(resolve_model_path(adapter_base_path(folder)), folder)


def adapter_tokenizer(folder: str | Path | None) -> Any:
    """An adapter folder's own tokenizer (the template and any tokens SFT added); None for anything else, whose
    tokenizer loads from its model folder."""
    if folder is None or not is_adapter_folder(folder):
        return None
    return AutoTokenizer.from_pretrained(folder)  # an adapter folder has no config.json to resolve


def continue_adapter(model: Any, adapter_dir: Path, method: str) -> Any:
    """The base with the saved adapter on it, trainable: its own rank, target modules and trained token rows."""
    if method == "qlora":
        quantize_base_to_nf4(model)
    model = peft.PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    print(describe_parameters(model, method) + f"; continuing the adapter in {adapter_dir}")
    return model
