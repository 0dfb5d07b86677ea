"""Fused LoRA (lora.fuse_shared_inputs) == PEFT's own layers: forward, every adapter gradient, the saved adapter
reloaded by plain PEFT, merging; one dropout mask per shared input; DoRA falls back to PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch

from sftune.model import fused_lora
from sftune.model.fused_lora import FusedLoraLinear, SharedInput
from sftune.model.load import load_model, load_tokenizer
from sftune.model.lora import dequantize_base, quantize_base_to_nf4, save_trained
from tests.model.helpers import adapters, batch, fused_and_peft_pair, loss_and_gradients, prepared

TOLERANCE = 1e-5  # fp32


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize(("method", "lora"), [("lora", {}), ("qlora", {}), ("lora", {"use_rslora": True})])
def test_fused_forward_and_every_adapter_gradient_equal_peft(tiny_model_dir, method, lora):
    fused, plain = fused_and_peft_pair(tiny_model_dir, method, **lora)
    ids = batch(fused.config.vocab_size)
    fused_logits, fused_grads = loss_and_gradients(fused, ids)
    plain_logits, plain_grads = loss_and_gradients(plain, ids)

    assert max_difference(fused_logits, plain_logits) <= TOLERANCE
    assert len(fused_grads) == 2 * 7 * 2  # 2 layers x 7 linears x (A, B)
    for name, grad in fused_grads.items():
        assert grad is not None and grad.abs().max() > 0, name
        assert max_difference(grad, plain_grads[name]) <= TOLERANCE, name


def test_fused_gradients_equal_peft_under_activation_checkpointing(tiny_model_dir):
    """The recomputed forward in backward takes the shared product again, from the recomputed input."""
    fused, plain = fused_and_peft_pair(tiny_model_dir, "lora")
    for model in (fused, plain):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = batch(fused.config.vocab_size, seed=5)
    _, fused_grads = loss_and_gradients(fused, ids)
    _, plain_grads = loss_and_gradients(plain, ids)
    for name, grad in fused_grads.items():
        assert grad is not None and max_difference(grad, plain_grads[name]) <= TOLERANCE, name


def test_siblings_share_one_product_and_nothing_is_kept_after_the_forward(tiny_model_dir, monkeypatch):
    model = prepared(tiny_model_dir, "lora", fuse_shared_inputs=True)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, FusedLoraLinear)}
    assert len(layers) == 2 * 7
    for block in ("layers.0", "layers.1"):
        attention, mlp = f"{block}.self_attn", f"{block}.mlp"
        q, k, v, o = (layers[next(n for n in layers if n.endswith(f"{attention}.{x}_proj"))] for x in "qkvo")
        gate, up, down = (
            layers[next(n for n in layers if n.endswith(f"{mlp}.{x}_proj"))] for x in ("gate", "up", "down")
        )
        assert isinstance(q.shared_input, SharedInput) and q.shared_input is k.shared_input is v.shared_input
        assert isinstance(gate.shared_input, SharedInput) and gate.shared_input is up.shared_input
        assert o.shared_input is None and down.shared_input is None  # their inputs are their own
    group_sizes: list[int] = []
    products = fused_lora.lora_products
    monkeypatch.setattr(fused_lora, "lora_products", lambda ls, x, a: group_sizes.append(len(ls)) or products(ls, x, a))
    loss_and_gradients(model, batch(model.config.vocab_size))
    assert group_sizes == [3, 1, 2, 1] * 2  # per block: q/k/v, o, gate/up, down: four A products, not seven
    groups = {id(m.shared_input): m.shared_input for m in layers.values() if m.shared_input is not None}
    assert len(groups) == 4
    assert all(group.input is None and not group.pending for group in groups.values())  # no activation held on to


def test_member_called_with_another_tensor_computes_its_own_product(tiny_model_dir):
    """Sharing is decided by tensor identity, not by the names: a k_proj fed something else is still exact."""
    fused, plain = fused_and_peft_pair(tiny_model_dir, "lora")
    fused_attention = fused.base_model.model.model.layers[0].self_attn
    plain_attention = plain.base_model.model.model.layers[0].self_attn
    x, other = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    for name, inputs in (("q_proj", x), ("k_proj", other), ("v_proj", x), ("k_proj", x)):
        expected = getattr(plain_attention, name)(inputs)
        assert max_difference(getattr(fused_attention, name)(inputs), expected) <= TOLERANCE, name


def test_dropout_draws_one_mask_per_shared_input(tiny_model_dir):
    """With dropout > 0 q, k and v see the same mask: each equals PEFT's layer run on that masked input."""
    fused, plain = fused_and_peft_pair(tiny_model_dir, "lora", dropout=0.5)
    fused_attention = fused.base_model.model.model.layers[0].self_attn
    plain_attention = plain.base_model.model.model.layers[0].self_attn
    fused.train()
    x = torch.randn(2, 5, 32, requires_grad=True)
    torch.manual_seed(7)
    outputs = [getattr(fused_attention, f"{name}_proj")(x) for name in "qkv"]
    torch.manual_seed(7)
    mask = torch.nn.functional.dropout(torch.ones_like(x), p=0.5)  # the same draw: 0 or 1 / (1 - p)
    assert 0 < (mask == 0).float().mean() < 1
    x_reference = x.detach().clone().requires_grad_(True)
    expected = masked_peft_outputs(plain_attention, x_reference, mask)
    for name, output, reference in zip("qkv", outputs, expected, strict=True):
        assert max_difference(output, reference) <= TOLERANCE, name
    sum(output.sum() for output in outputs).backward()
    sum(reference.sum() for reference in expected).backward()
    assert max_difference(x.grad, x_reference.grad) <= TOLERANCE
    for name in "qkv":
        fused_a = getattr(fused_attention, f"{name}_proj").lora_A["default"].weight.grad
        plain_a = getattr(plain_attention, f"{name}_proj").lora_A["default"].weight.grad
        assert max_difference(fused_a, plain_a) <= TOLERANCE, name


def masked_peft_outputs(attention, x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """PEFT's q/k/v outputs with the given dropout mask on the adapter input."""
    outputs = []
    for name in "qkv":
        layer = getattr(attention, f"{name}_proj")
        lora = layer.lora_B["default"](layer.lora_A["default"](x * mask)) * layer.scaling["default"]
        outputs.append(layer.base_layer(x) + lora)
    return outputs


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_fused_adapter_saves_and_loads_as_a_plain_peft_adapter(tmp_path, tiny_model_dir, method):
    fused, _ = fused_and_peft_pair(tiny_model_dir, method)
    ids = batch(fused.config.vocab_size, seed=3)
    fused.eval()
    with torch.no_grad():
        expected = fused(input_ids=ids).logits
    tokenizer = load_tokenizer(str(tiny_model_dir))
    folder = save_trained(
        fused, tokenizer, tmp_path / "adapter", method, torch.float32, [tokenizer.eos_token_id], str(tiny_model_dir)
    )
    assert "custom" not in (folder / "adapter_config.json").read_text()
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"

    base = load_model(str(tiny_model_dir), torch.float32, "cpu")
    if method == "qlora":
        quantize_base_to_nf4(base)
        dequantize_base(base)
    reloaded = peft.PeftModel.from_pretrained(base, folder)
    assert not any(isinstance(m, FusedLoraLinear) for m in reloaded.modules())  # PEFT's own layers
    reloaded.eval()
    with torch.no_grad():
        assert max_difference(reloaded(input_ids=ids).logits, expected) <= 1e-4  # NF4 vs its dense twin: 1e-4


def test_merge_and_disabled_adapters_take_peft_paths(tiny_model_dir):
    fused, plain = fused_and_peft_pair(tiny_model_dir, "lora")
    ids = batch(fused.config.vocab_size, seed=4)
    fused.eval()
    plain.eval()
    with torch.no_grad():
        with fused.disable_adapter(), plain.disable_adapter():  # DPO's reference model
            assert max_difference(fused(input_ids=ids).logits, plain(input_ids=ids).logits) <= TOLERANCE
        expected = plain(input_ids=ids).logits
        merged = fused.merge_and_unload()
        assert not any(isinstance(m, FusedLoraLinear) for m in merged.modules())
        assert max_difference(merged(input_ids=ids).logits, expected) <= 1e-4


def test_dora_falls_back_to_peft_layers(tiny_model_dir, capsys):
    model = prepared(tiny_model_dir, "lora", fuse_shared_inputs=True, use_dora=True)
    assert "not implemented for DoRA" in capsys.readouterr().out
    assert not any(isinstance(m, FusedLoraLinear) for m in model.modules())
