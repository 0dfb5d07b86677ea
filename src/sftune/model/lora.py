"""Which parameters train, and how the result is saved: full, LoRA, or QLoRA (LoRA on a 4-bit NF4 base).

The recipe calls `prepare_model` once after loading and `save_trained` once at the end; these two are the
only places where the three methods differ. Adapters are saved in PEFT's format, so
`peft.PeftModel.from_pretrained(base, folder)` loads them; `merge_adapter` folds them into an fp32 copy of
the base (never into 4-bit weights) and writes a plain Hugging Face folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import peft
import torch
from transformers import AutoTokenizer, GenerationConfig

from sftune.config import Config, LoraConfig, UserError
from sftune.host.files import staged_folder
from sftune.model.load import load_model, resolve_model_path
from sftune.model.save import normal_permissions, save_model_folder

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_METHOD = "sftune_adapter.json"  # beside PEFT's files: whether the adapter was trained on an NF4 base
NF4_BLOCK_SIZE = 64  # weights per 4-bit block, as in QLoRA
NF4_MAX_SCALER_BLOCK_SIZE = 256  # block scales per double-quantization group, as in QLoRA


class AdapterError(UserError, ValueError):
    """An adapter folder or QLoRA base that cannot be used; the message says how to fix it."""


# --------------------------------------------------------------------------------------------- prepare


def prepare_model(model: Any, config: Config, added_token_ids: list[int] | None = None) -> Any:
    """full: unchanged; lora: frozen base + trainable adapters; qlora: the same with the base quantized to NF4.

    `added_token_ids`: embedding rows the template added (random until trained); with adapters they train
    too and are saved in the adapter, or the model could never read or write its own end-of-turn token.
    """
    method = config.train.method
    if method == "qlora":
        quantize_base_to_nf4(model)
    if method in ("lora", "qlora"):
        model = apply_lora(model, config.lora, added_token_ids or [])
    print(describe_parameters(model, method))
    return model


def apply_lora(model: Any, lora: LoraConfig, added_token_ids: list[int]) -> Any:
    """Wrap the target linears with PEFT's LoRA layers; PEFT freezes every other parameter."""
    return peft.get_peft_model(model, build_peft_config(lora, added_token_ids))


def build_peft_config(lora: LoraConfig, added_token_ids: list[int]) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        trainable_token_indices=added_token_ids or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def quantize_base_to_nf4(model: torch.nn.Module) -> None:
    """Replace the weight of every linear in the transformer blocks by a frozen NF4 tensor (not the output layer).

    torchao's NF4Tensor implements F.linear, so nn.Linear (and PEFT's LoRA wrapper around it) run unchanged:
    the 4-bit weight is dequantized block by block in forward and backward and never receives a gradient.
    """
    output_layer = model.get_output_embeddings()  # type: ignore[operator]
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not output_layer:
            module.weight = torch.nn.Parameter(to_nf4_weight(module.weight.detach(), name), requires_grad=False)


def to_nf4_weight(weight: torch.Tensor, name: str) -> torch.Tensor:
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    if weight.numel() % NF4_BLOCK_SIZE:
        raise AdapterError(
            f"cannot quantize '{name}' to NF4: its {weight.numel()} weights are not a multiple of the block size "
            f"{NF4_BLOCK_SIZE}. Use train.method=lora for this model"
        )
    return to_nf4(weight.contiguous(), NF4_BLOCK_SIZE, nf4_scaler_block_size(weight.numel() // NF4_BLOCK_SIZE))


def nf4_scaler_block_size(num_blocks: int) -> int:
    """Largest divisor of num_blocks up to 256: torchao needs it to divide the block count exactly
    (e.g. SmolLM2's k_proj has 1728 blocks, which 256 does not divide)."""
    return max(d for d in range(1, min(num_blocks, NF4_MAX_SCALER_BLOCK_SIZE) + 1) if num_blocks % d == 0)


def dequantize_base(model: torch.nn.Module) -> None:
    """Turn NF4 weights back into dense fp32 ones in place: the dense twin of a QLoRA model (for tests, merging)."""
    for module in model.modules():
        weight: Any = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and type(weight).__name__ == "NF4Tensor":
            dense = weight.get_original_weight().to(torch.float32)
            module.weight = torch.nn.Parameter(dense, requires_grad=False)


def count_trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total); an NF4 weight counts as its original number of weights."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def describe_parameters(model: torch.nn.Module, method: str) -> str:
    trainable, total = count_trainable_parameters(model)
    line = f"model ({method}): {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)"
    memory = nf4_weight_memory(model)
    if memory["nf4_weights"]:
        line += (
            f"; 4-bit base: {memory['nf4_bytes'] / 2**20:.1f} MiB for {memory['nf4_weights']:,} weights "
            f"({memory['nf4_bytes'] / memory['bf16_bytes']:.2f}x their bf16 size)"
        )
    return line


def nf4_weight_memory(model: torch.nn.Module) -> dict[str, int]:
    """Bytes actually held by the NF4 weights (packed 4-bit codes, quantized scales and their factors, the
    lookup table), and what the same weights take in bf16."""
    nf4_bytes, nf4_weights = 0, 0
    for parameter in model.parameters():
        if type(parameter).__name__ == "NF4Tensor":
            inner_names, _ = parameter.__tensor_flatten__()  # type: ignore[attr-defined]
            nf4_bytes += sum(getattr(parameter, name).nbytes for name in inner_names)
            nf4_weights += parameter.numel()
    return {"nf4_bytes": nf4_bytes, "nf4_weights": nf4_weights, "bf16_bytes": 2 * nf4_weights}


# ------------------------------------------------------------------------------------------------ save


def save_trained(
    model: Any, tokenizer: Any, out_dir: Path, method: str, dtype: torch.dtype, eos_ids: list[int], base_path: str
) -> Path:
    """full: a whole HF model folder in `dtype`; lora/qlora: a PEFT adapter folder that names its base."""
    if method == "full":
        return save_model_folder(model, tokenizer, out_dir, dtype, eos_ids)
    return save_adapter_folder(model, tokenizer, out_dir, eos_ids, base_path, method)


def save_adapter_folder(
    model: Any, tokenizer: Any, out_dir: Path, eos_ids: list[int], base_path: str, method: str
) -> Path:
    """adapter_config.json + adapter_model.safetensors (PEFT key names), tokenizer with the chat template,
    generation_config.json that stops at every end-of-turn id. Written to a temporary sibling, then renamed."""
    for adapter_config in model.peft_config.values():
        adapter_config.base_model_name_or_path = base_path
    generation = GenerationConfig.from_dict(model.generation_config.to_dict())
    generation.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    generation.pad_token_id = tokenizer.pad_token_id
    with staged_folder(out_dir) as tmp:
        # Rows of tokens the template added are in the adapter (trainable tokens); the base's other rows never
        # changed, so the whole resized embedding matrix is not copied into it.
        model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
        tokenizer.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        (tmp / ADAPTER_METHOD).write_text(json.dumps({"method": method, "nf4_block_size": NF4_BLOCK_SIZE}, indent=2))
        normal_permissions(tmp)
    return out_dir


# ----------------------------------------------------------------------------------------- load, merge


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base_path(adapter_dir: Path) -> str:
    base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise AdapterError(
            f"{adapter_dir / ADAPTER_CONFIG} names no base_model_name_or_path: set it to the folder or hub id of "
            "the model the adapter was trained on"
        )
    return base


def adapter_method(adapter_dir: Path) -> str:
    """'lora' or 'qlora'; adapters from other tools (no sftune_adapter.json) count as lora."""
    path = adapter_dir / ADAPTER_METHOD
    return str(json.loads(path.read_text())["method"]) if path.is_file() else "lora"


def load_merged(adapter_dir: str | Path, dtype: torch.dtype, device: str | torch.device) -> tuple[Any, Any]:
    """Base model in fp32 (never 4-bit) + adapter, merged into plain weights, then cast to `dtype`; tokenizer
    and generation config from the adapter folder (they carry the training template and end-of-turn ids).

    A QLoRA adapter is merged into the NF4 round trip of the base (quantized, then dequantized to fp32): the
    weights it was trained against, so the merged model computes what the trained model computed.
    """
    adapter_dir = Path(adapter_dir)
    base: Any = load_model(resolve_model_path(adapter_base_path(adapter_dir)), torch.float32, device)
    # An adapter folder has no config.json, so not load_tokenizer/resolve_model_path: its tokenizer is read directly.
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tokenizer))  # rows the template added; the adapter holds their values
    if adapter_method(adapter_dir) == "qlora":
        quantize_base_to_nf4(base)
        dequantize_base(base)
    model = peft.PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    model.generation_config = GenerationConfig.from_pretrained(adapter_dir)
    return model.to(dtype), tokenizer


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """`sftune merge`: an fp32 HF folder (weights, tokenizer + template, generation config) ready for generate."""
    model, tokenizer = load_merged(adapter_dir, torch.float32, "cpu")
    eos = model.generation_config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, list) else [eos]
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_model_folder(model, tokenizer, out, torch.float32, eos_ids)
