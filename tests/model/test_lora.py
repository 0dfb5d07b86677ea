"""LoRA and QLoRA on a tiny model: adapter reload == in-memory model, merged == base + adapter, QLoRA gradients ==
gradients on the dense dequantized twin, the base never changes."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftune.config import ConfigError
from sftune.model.load import load_model, load_tokenizer
from sftune.model.lora import (
    count_trainable_parameters,
    dequantize_base,
    load_merged,
    merge_adapter,
    nf4_scaler_block_size,
    quantize_base_to_nf4,
    save_trained,
)
from tests.model.helpers import batch, method_config, prepared

TOLERANCE = 1e-4


def train_steps(model, steps: int = 3) -> None:
    """A few AdamW steps, so LoRA B is no longer zero and the adapter changes the logits."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = batch(model.config.vocab_size)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@torch.no_grad()
def logits(model, seed: int = 1) -> torch.Tensor:
    model.eval()
    return model(input_ids=batch(model.config.vocab_size, seed)).logits


def dense_base(model_dir: Path, method: str):
    """The base the adapter was trained against, dense fp32: for QLoRA the NF4 round trip of the weights."""
    base = load_model(str(model_dir), torch.float32, "cpu")
    if method == "qlora":
        quantize_base_to_nf4(base)
        dequantize_base(base)
    return base


def base_snapshot(model) -> dict[str, torch.Tensor]:
    """Every frozen tensor, NF4 ones by their packed 4-bit data and scales."""
    snapshot = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        if type(p).__name__ == "NF4Tensor":
            for part in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean"):
                snapshot[f"{name}.{part}"] = getattr(p, part).clone()
        else:
            snapshot[name] = p.detach().clone()
    return snapshot


def save_adapter(model, model_dir: Path, out_dir: Path, method: str) -> Path:
    tokenizer = load_tokenizer(str(model_dir))
    return save_trained(model, tokenizer, out_dir, method, torch.float32, [tokenizer.eos_token_id], str(model_dir))


def test_scaler_block_size_divides_the_block_count():
    for blocks in (8, 16, 1728, 4096, 27648):
        size = nf4_scaler_block_size(blocks)
        assert blocks % size == 0 and size <= 256
    assert nf4_scaler_block_size(4096) == 256 and nf4_scaler_block_size(1728) == 216  # SmolLM2 k_proj


def test_dora_with_qlora_is_a_config_error_and_dora_with_lora_trains(tiny_model_dir):
    with pytest.raises(ConfigError, match="use_dora"):
        method_config("qlora", use_dora=True)
    model = prepared(tiny_model_dir, "lora", use_dora=True)
    assert any(".lora_magnitude_vector." in n for n, p in model.named_parameters() if p.requires_grad)
    train_steps(model, steps=1)


def test_full_trains_everything_and_lora_only_adapters_of_block_linears(tiny_model_dir):
    full = prepared(tiny_model_dir, "full")
    assert all(p.requires_grad for p in full.parameters())
    for method in ("lora", "qlora"):
        model = prepared(tiny_model_dir, method)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
        wrapped = {n.split(".layers.")[1].split(".lora_")[0].split(".", 1)[1] for n in trainable}
        expected = {f"self_attn.{x}_proj" for x in "qkvo"} | {f"mlp.{x}_proj" for x in ("gate", "up", "down")}
        assert wrapped == expected  # every linear of the blocks, not lm_head
        trainable_count, total = count_trainable_parameters(model)
        assert 0 < trainable_count < total
    qlora = prepared(tiny_model_dir, "qlora")
    weights = [m.weight for m in qlora.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(type(w).__name__ == "NF4Tensor" for w in weights) == 2 * 7  # every block linear is 4-bit
    assert type(qlora.get_output_embeddings().weight).__name__ != "NF4Tensor"


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_training_never_changes_the_base(tiny_model_dir, method):
    model = prepared(tiny_model_dir, method)
    before = base_snapshot(model)
    train_steps(model)
    after = base_snapshot(model)
    assert before.keys() == after.keys() and len(before) > 0
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_saved_adapter_reloads_to_the_in_memory_model(tmp_path, tiny_model_dir, method):
    model = prepared(tiny_model_dir, method)
    train_steps(model)
    expected = logits(model)
    folder = save_adapter(model, tiny_model_dir, tmp_path / "adapter", method)

    assert (folder / "adapter_model.safetensors").is_file() and (folder / "generation_config.json").is_file()
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(folder).chat_template
    base = dense_base(tiny_model_dir, method)
    assert (logits(base) - expected).abs().max() > 1e-3  # the adapter does change the model
    reloaded = peft.PeftModel.from_pretrained(base, folder)
    assert (logits(reloaded) - expected).abs().max() <= TOLERANCE


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_merged_equals_base_plus_adapter(tmp_path, tiny_model_dir, method):
    model = prepared(tiny_model_dir, method)
    train_steps(model)
    expected = logits(model)  # QLoRA: the NF4 model, i.e. the dequantized base + adapter
    folder = save_adapter(model, tiny_model_dir, tmp_path / "adapter", method)
    merged_dir = merge_adapter(folder, tmp_path / "merged")

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert not any(".lora_" in name for name in merged.state_dict())
    assert (logits(merged) - expected).abs().max() <= TOLERANCE
    in_process, _ = load_merged(folder, torch.float32, "cpu")  # what `sftune generate ADAPTER` runs
    assert (logits(in_process) - expected).abs().max() <= TOLERANCE


def test_qlora_gradients_match_the_dense_dequantized_twin(tiny_model_dir):
    qlora = prepared(tiny_model_dir, "qlora")
    train_steps(qlora, steps=2)  # B != 0, so gradients reach A too
    twin = prepared(tiny_model_dir, "qlora")  # the same deterministic NF4 base (deepcopy would requantize)
    twin.load_state_dict({n: p.detach() for n, p in qlora.named_parameters() if p.requires_grad}, strict=False)
    dequantize_base(twin)
    assert not any(type(p).__name__ == "NF4Tensor" for p in twin.parameters())
    ids = batch(qlora.config.vocab_size, seed=2)
    for model in (qlora, twin):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in qlora.named_parameters() if p.requires_grad}
    twin_grads = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    assert grads.keys() == twin_grads.keys()
    for name, grad in grads.items():
        assert grad is not None and grad.abs().max() > 0, name
        assert torch.allclose(grad, twin_grads[name], rtol=1e-4, atol=1e-6), name
