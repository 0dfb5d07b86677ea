"""Helpers of the model tests: a tiny model prepared for full/LoRA/QLoRA, a batch of token ids, and the same random
adapters on two copies of a model with their loss and adapter gradients."""

from __future__ import annotations

from pathlib import Path

import torch

from sftune.config import Config, load_config
from sftune.model.load import load_model
from sftune.model.lora import prepare_model


def method_config(method: str, **lora) -> Config:
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, **lora}
    return load_config({"data": {"train": "unused.json"}, "train": {"method": method}, "lora": lora})


def prepared(model_dir: Path, method: str, **lora):
    torch.manual_seed(0)
    return prepare_model(load_model(str(model_dir), torch.float32, "cpu"), method_config(method, **lora))


def batch(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def adapters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def adapter_pair(model_dir: Path, method: str, **lora):
    """Two copies of a model with the same adapters (A and B random, so every gradient is non-zero)."""
    fused = prepared(model_dir, method, **lora)
    plain = prepared(model_dir, method, **lora)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in adapters(plain).items():
            p.copy_(0.2 * torch.randn(p.shape, generator=generator))
            adapters(fused)[name].copy_(p)
    return fused, plain


def loss_and_gradients(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training-mode forward and backward of the loss: the logits, and every adapter's gradient."""
    model.train()
    output = model(input_ids=ids, labels=ids)
    output.loss.backward()
    return output.logits.detach(), {name: p.grad for name, p in adapters(model).items()}


fused_and_peft_pair = adapter_pair  # the name tests/model/test_lean_activations.py still uses
