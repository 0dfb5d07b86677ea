"""The frozen base of a LoRA model in bf16, where the hardware computes bf16 natively (lora.base_dtype).

Under LoRA the base linears never train: their weights are only read, by the forward product and by backward's
product into the input. Stored in bf16 they take half the memory, and where bf16 is native (AVX-512 BF16 / AMX CPUs,
Ampere+ GPUs) their matmuls run several times faster than fp32. The adapters, their gradients and optimizer
state, the norms, the embeddings and the output layer (and with it the loss) stay in the training precision.

Each frozen linear keeps its module (and its PEFT wrapper), only its class becomes `LowPrecisionLinear`: the
input is cast to the weight's dtype for the product, the output back to the input's dtype. Every path that
calls the base layer (PEFT's own forward, the adapter switched off for a DPO reference)
therefore works unchanged. What it costs: the base product is rounded to bf16 (8-bit mantissa), as in any bf16
run (the losses measured beside the fp32 base: bench/results/memory_profile.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sftune.config import Config


class LowPrecisionLinear(torch.nn.Linear):
    """A frozen linear whose weight is stored in a lower precision than the activations that flow through it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        return F.linear(x.to(weight.dtype), weight, self.bias).to(x.dtype)


def frozen_base_dtype(config: Config, precision: str) -> torch.dtype | None:
    """The dtype to store the frozen base linears in (lora.base_dtype as resolved by training/settings.py), or None
    to leave them as loaded: fp32, an unresolved auto, bf16-true (every weight bf16 already), and full fine-tuning
    or QLoRA (every weight trains; the base is 4-bit already)."""
    if config.train.method != "lora" or precision == "bf16-true" or config.lora.base_dtype != "bf16":
        return None
    return torch.bfloat16


def cast_frozen_base(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store every frozen dense linear of the model in `dtype` (LowPrecisionLinear); returns how many. Left as
    they are: linears with a trainable weight or bias, 4-bit weights, and the output layer (with whatever wraps
    it, e.g. PEFT's trainable-token rows) or any linear sharing its weight with an embedding (tied heads)."""
    output = model.get_output_embeddings()  # type: ignore[operator]
    output_names = [name for name, module in model.named_modules() if output is not None and module is output]
    embedding_storage = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    cast = 0
    for name, module in model.named_modules():
        if not _is_frozen_dense_linear(module) or module.weight.data_ptr() in embedding_storage:
            continue
        if any(name == head or name.startswith(f"{head}.") for head in output_names):
            continue
        module.weight = torch.nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
        if module.bias is not None:
            module.bias = torch.nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        module.__class__ = LowPrecisionLinear
        cast += 1
    if cast:
        copy_out_of_checkpoint(model)
    return cast


def copy_out_of_checkpoint(model: torch.nn.Module) -> None:
    """Give the parameters and buffers left in the training precision memory of their own. Loaded in the
    checkpoint's dtype they may still point into its memory-mapped file, and while one tensor does, the whole
    mapping stays, with every page the cast above read counted in
    the process's resident memory. Copies are made in place (`.data`), so every reference stays valid."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.dtype.is_floating_point and type(tensor) in (torch.nn.Parameter, torch.Tensor):
            tensor.data = tensor.data.clone()


def _is_frozen_dense_linear(module: Any) -> bool:
    if type(module) is not torch.nn.Linear:  # not a LoRA wrapper, not already cast
        return False
    weight, bias = module.weight, module.bias
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    return frozen and type(weight) is torch.nn.Parameter and weight.dtype == torch.float32
