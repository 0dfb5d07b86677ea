"""Contracts with private or internal APIs of torch, transformers and torchao: each site sftune uses where nothing
public does the job, exercised here by name, so that an upgrade that changes one fails in this file first.

- training/optim.py fused_kernel_applies: torch.utils._foreach_utils._get_fused_kernels_supported_devices, the
  devices AdamW's fused kernel runs on.
- training/distributed.py wrap_model: DistributedDataParallel._set_params_and_buffers_to_ignore_for_model, frozen
  (NF4) weights kept out of DDP's broadcast.
- host/offload.py OffloadedAdamW.step: the hooked AdamW.step's __wrapped__, so torch's step hooks run once a step.
- model/frozen_base.py cast_frozen_base: a module's __class__ swapped to LowPrecisionLinear (PEFT holds the base
  layer object; replacing it would not reach PEFT).
- model/lora.py: torchao's NF4 from torchao.quantization.quantize_.workflows.nf4 (to_nf4), and
  NF4Tensor.__tensor_flatten__ for the bytes an NF4 weight really holds.
- model/blocks.py decoder_layers: transformers' PreTrainedModel._no_split_modules, which modules are the decoder
  blocks (FSDP2's units, compile).
"""

from __future__ import annotations

import peft
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers import LlamaConfig, LlamaForCausalLM

from sftune.host.offload import OffloadedAdamW
from sftune.model.blocks import decoder_layers
from sftune.model.frozen_base import LowPrecisionLinear, cast_frozen_base
from sftune.model.lora import nf4_weight_memory
from sftune.training.optim import fused_kernel_applies

TINY = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=64)  # fmt: skip


def test_fused_adamw_devices_are_listed_where_optim_reads_them():
    from torch.utils import _foreach_utils

    devices = _foreach_utils._get_fused_kernels_supported_devices()
    assert "cpu" in devices
    assert fused_kernel_applies([torch.nn.Parameter(torch.zeros(3))])


def test_ddp_takes_the_names_of_parameters_to_ignore():
    from torch.nn.parallel import DistributedDataParallel

    module = torch.nn.Linear(2, 2)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ["bias"])
    assert module._ddp_params_and_buffers_to_ignore == ["bias"]  # what DDP's constructor reads


def test_hooked_adamw_step_exposes_the_function_it_wraps(tmp_path):
    torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))])  # an optimizer's construction hooks its class's step
    step = torch.optim.AdamW.step
    assert getattr(step, "hooked", False) and callable(step.__wrapped__)
    weight = torch.nn.Parameter(torch.ones(4))
    reference = torch.nn.Parameter(torch.ones(4))
    offloaded, plain = OffloadedAdamW([weight], tmp_path, lr=0.1), torch.optim.AdamW([reference], lr=0.1)
    calls = []
    handle = register_optimizer_step_post_hook(lambda *args: calls.append(1))
    try:
        for p, opt in ((weight, offloaded), (reference, plain)):
            p.grad = torch.arange(4.0)
            opt.step()
    finally:
        handle.remove()
    assert len(calls) == 2  # once per step each, not once per slice
    assert torch.equal(weight, reference)


def test_a_module_class_swap_keeps_peft_layers_working():
    model = peft.get_peft_model(LlamaForCausalLM(TINY), peft.LoraConfig(r=2, target_modules=["q_proj", "up_proj"]))
    ids = torch.tensor([[1, 2, 3, 4]])
    before = model(input_ids=ids).logits
    assert cast_frozen_base(model, torch.bfloat16) > 0
    swapped = [m for m in model.modules() if type(m) is LowPrecisionLinear]
    assert swapped and all(m.weight.dtype == torch.bfloat16 for m in swapped)
    after = model(input_ids=ids).logits
    assert after.dtype == before.dtype and torch.allclose(after, before, atol=0.05)


def test_nf4_tensors_flatten_into_their_inner_tensors():
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    weight = to_nf4(torch.randn(256, 64, dtype=torch.bfloat16))
    names, _ = weight.__tensor_flatten__()
    assert names and all(isinstance(getattr(weight, name), torch.Tensor) for name in names)
    model = torch.nn.Linear(64, 256, bias=False)
    model.weight = torch.nn.Parameter(weight, requires_grad=False)
    held = nf4_weight_memory(model)
    assert held["nf4_weights"] == 256 * 64 and 0 < held["nf4_bytes"] < held["bf16_bytes"]


def test_transformers_models_name_their_decoder_blocks():
    model = LlamaForCausalLM(TINY)
    assert "LlamaDecoderLayer" in model._no_split_modules
    assert len(decoder_layers(model)) == TINY.num_hidden_layers
