"""The frozen LoRA base in bf16 (lora.base_dtype): what is cast and what is not, the trained model's forward and
adapter gradients against the fp32 base, the adapter-off path, saving as a plain fp32 PEFT adapter, and when
'auto' picks it (and activation checkpointing with it)."""

from __future__ import annotations

import peft
import torch

from sftune.config import load_config
from sftune.model.frozen_base import LowPrecisionLinear, cast_frozen_base, frozen_base_dtype
from sftune.model.load import load_model
from sftune.model.lora import save_trained
from tests.model.helpers import adapter_pair, adapters, batch, loss_and_gradients

CPU = torch.device("cpu")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def bf16_and_fp32_pair(model_dir):
    """The same random adapters on a bf16 frozen base and on the fp32 one."""
    low, exact = adapter_pair(model_dir, "lora")
    assert cast_frozen_base(low, torch.bfloat16) == 2 * 7  # every block linear (2 layers x 7), nothing else
    return low, exact


def test_only_the_frozen_block_linears_are_cast(tiny_model_dir):
    model, _ = bf16_and_fp32_pair(tiny_model_dir)
    cast = {name: m for name, m in model.named_modules() if isinstance(m, LowPrecisionLinear)}
    assert len(cast) == 14 and all(name.endswith("base_layer") for name in cast)
    assert all(m.weight.dtype == torch.bfloat16 and not m.weight.requires_grad for m in cast.values())
    cast_weights = {id(m.weight) for m in cast.values()}
    others = [p for p in model.parameters() if id(p) not in cast_weights]
    assert others and all(p.dtype == torch.float32 for p in others)  # adapters, norms, embeddings, head
    assert all(p.dtype == torch.float32 for p in adapters(model).values())
    assert cast_frozen_base(model, torch.bfloat16) == 0  # idempotent: nothing left to cast


def test_forward_and_adapter_gradients_stay_close_to_the_fp32_base(tiny_model_dir):
    low, exact = bf16_and_fp32_pair(tiny_model_dir)
    ids = batch(low.config.vocab_size, seed=3)
    low_logits, low_grads = loss_and_gradients(low, ids)
    exact_logits, exact_grads = loss_and_gradients(exact, ids)
    assert low_logits.dtype == torch.float32
    assert 0 < (low_logits - exact_logits).abs().max() <= 0.05 * exact_logits.abs().max()  # bf16 rounding, no more
    assert low_grads.keys() == exact_grads.keys() and len(low_grads) == 28
    for name, grad in low_grads.items():
        assert grad is not None and grad.dtype == torch.float32 and grad.abs().max() > 0, name
        assert cosine(grad, exact_grads[name]) > 0.99, name
    assert all(m.weight.grad is None for m in low.modules() if isinstance(m, LowPrecisionLinear))


def test_adapter_off_runs_the_bf16_base(tiny_model_dir):
    """The DPO reference path: PEFT's own forward with the adapter disabled calls the cast base layers."""
    low, exact = bf16_and_fp32_pair(tiny_model_dir)
    ids = batch(low.config.vocab_size, seed=4)
    with torch.no_grad(), low.disable_adapter(), exact.disable_adapter():
        off, exact_off = low(input_ids=ids).logits, exact(input_ids=ids).logits
    assert off.dtype == torch.float32 and (off - exact_off).abs().max() <= 0.05 * exact_off.abs().max()


def test_the_saved_adapter_is_fp32_and_loads_on_the_fp32_base(tiny_model_dir, tmp_path):
    low, _ = bf16_and_fp32_pair(tiny_model_dir)
    tokenizer = _tokenizer(tiny_model_dir)
    out = save_trained(low, tokenizer, tmp_path / "adapter", "lora", torch.float32, [2], str(tiny_model_dir))
    base = load_model(str(tiny_model_dir), torch.float32, "cpu")
    reloaded = peft.PeftModel.from_pretrained(base, out)
    ours = {n.replace(".default", ""): p for n, p in adapters(low).items()}
    theirs = {n.replace(".default", ""): p for n, p in reloaded.named_parameters() if "lora_" in n}
    assert ours.keys() == theirs.keys()
    assert all(theirs[n].dtype == torch.float32 and torch.equal(ours[n], theirs[n]) for n in ours)


def _tokenizer(model_dir):
    from sftune.model.load import load_tokenizer

    return load_tokenizer(str(model_dir))


def config(method: str = "lora", **train):
    return load_config({"data": {"train": "x.json"}, "train": {"method": method, **train}})


def test_the_frozen_base_dtype_follows_the_resolved_setting():
    """Only a resolved lora.base_dtype=bf16 casts (its `auto` is training/settings.py's, tested there)."""
    forced = load_config({"data": {"train": "x.json"}, "train": {"method": "lora"}, "lora": {"base_dtype": "bf16"}})
    assert frozen_base_dtype(forced, "fp32") == torch.bfloat16
    assert frozen_base_dtype(forced, "bf16-true") is None  # every weight bf16 already
    exact = load_config({"data": {"train": "x.json"}, "train": {"method": "lora"}, "lora": {"base_dtype": "fp32"}})
    assert frozen_base_dtype(exact, "fp32") is None
    assert frozen_base_dtype(config(), "fp32") is None  # unresolved auto: as loaded
    for method in ("full", "qlora"):
        full = load_config({"data": {"train": "x.json"}, "train": {"method": method}, "lora": {"base_dtype": "bf16"}})
        assert frozen_base_dtype(full, "fp32") is None
