"""The model a run trains (model/setup.py): activation checkpointing recomputes the blocks in backward and changes
neither the loss nor any gradient; bf16-true holds every weight in bf16."""

from __future__ import annotations

import pytest
import torch

from sftune.config import load_config
from sftune.model.setup import setup_model, setup_tokenizer
from tests.model.helpers import adapters, batch

CPU = torch.device("cpu")


def set_up(model_dir, method: str, precision: str = "fp32", **train):
    """The model as a run sets it up, seeded (LoRA's A), lean activations off: one change at a time."""
    config = load_config(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"train": "unused.json"},
            "train": {"method": method, "precision": precision, "lean_activations": False, **train},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "base_dtype": "fp32"},
        }
    )
    tokenizer, _ = setup_tokenizer(config)
    torch.manual_seed(0)
    return setup_model(config, tokenizer, CPU, precision)


def count_forwards(module: torch.nn.Module) -> list[int]:
    """Calls of `module`'s forward, the recomputation in backward included (module hooks do not see that one)."""
    calls = [0]
    forward = module.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    module.forward = counted
    return calls


def loss_gradients_and_recomputes(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    mlps = [count_forwards(m) for m in model.modules() if type(m).__name__.endswith("MLP")]
    assert len(mlps) == 2  # one per block
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    recomputes = sum(calls[0] for calls in mlps) - len(mlps)  # beyond the one forward each
    return loss.detach(), {name: p.grad for name, p in adapters(model).items()}, recomputes


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_activation_checkpointing_recomputes_and_changes_no_loss_or_gradient(tiny_model_dir, method):
    models = {on: set_up(tiny_model_dir, method, gradient_checkpointing=on) for on in (False, True)}
    if method != "full":  # LoRA's B starts at zero: random adapters, the same in both, so every gradient is non-zero
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in adapters(models[False]).items():
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
                adapters(models[True])[name].copy_(p)
    ids = batch(models[False].config.vocab_size)
    plain_loss, plain_gradients, plain_recomputes = loss_gradients_and_recomputes(models[False], ids)
    loss, gradients, recomputes = loss_gradients_and_recomputes(models[True], ids)
    assert (plain_recomputes, recomputes) == (0, 2)  # checkpointing is on: each block's forward ran again
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-7)
    assert gradients.keys() == plain_gradients.keys() and gradients
    for name, gradient in gradients.items():
        assert gradient is not None and gradient.abs().max() > 0, name
        torch.testing.assert_close(gradient, plain_gradients[name], rtol=1e-6, atol=1e-7, msg=name)


def test_bf16_true_holds_every_weight_in_bf16(tiny_model_dir):
    model = set_up(tiny_model_dir, "full", precision="bf16-true")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
