"""LoRA adapters computed at the speed of the base: one product for the adapters that share an input.

PEFT computes each adapter on its own: `result + lora_B(lora_A(dropout(x))) * scaling`, i.e. per targeted linear a
dropout copy of x (when dropout > 0), two thin matmuls and two full-size elementwise passes (the scaling and the
add), and in backward one thin matmul per adapter back into x. Here, for the adapters that read the same tensor
(q/k/v of an attention block, gate/up of an MLP):

- their A products are one matmul, x @ cat(A_q, A_k, A_v)^T ([tokens, in] x [in, r_q + r_k + r_v]), split into
  each adapter's [tokens, r] slice; backward is one matmul into x and one for the stacked A gradients;
- each B product is added into the base output by one `addmm` (scaling as its alpha): no scaled temporary and no
  separate add, forward or backward;
- dropout > 0 draws one mask per shared input instead of one per adapter (one copy instead of three). Each adapter
  still sees its input dropped at rate p, as in PEFT, but q, k and v now see the same mask: the same per-adapter
  distribution, not the same joint one, and fewer random numbers drawn (so not the same random stream as PEFT).

The layers are PEFT's own `lora.Linear`, created through PEFT's hook for custom LoRA layers
(`LoraConfig._register_custom_module`); only `forward` differs. Their parameters, state-dict keys, merge, unload,
`disable_adapter` and saving are PEFT's, so adapters save with `save_pretrained` and load with
`PeftModel.from_pretrained` unchanged. Which layers form a group is decided by name (`SHARED_INPUT_GROUPS`), but the
shared product is used only when a member receives the very tensor its group's product was computed from;
otherwise it computes its own, so a wrong guess costs time, never correctness. Forwards PEFT handles differently
(adapters disabled or merged, DoRA and other variants, several active adapters, per-row `adapter_names`) take
PEFT's own path.
"""

from __future__ import annotations

from typing import Any

import peft
import torch
import torch.nn.functional as F

# Sibling linears that read the same input in the common decoder blocks (Llama, Mistral, Qwen, Gemma, SmolLM, ...).
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedLoraLinear(peft.tuners.lora.Linear):
    """PEFT's LoRA linear whose adapter product may come from its group's shared product."""

    shared_input: SharedInput | None = None  # set by group_shared_inputs

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self.plain_active_adapter(args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        base_layer: Any = self.base_layer
        result = base_layer(x)
        if self.shared_input is not None and self.shared_input.is_usable(adapter):
            product = self.shared_input.product_for(self, x, adapter)
        else:
            product = lora_products([self], x, adapter)[0]
        weight_b = adapter_weight(self.lora_B, adapter)  # [out, r]
        # result + scaling * (product @ B^T), one kernel; [tokens, out]
        update = torch.addmm(result.reshape(-1, result.shape[-1]), product, weight_b.t(), alpha=self.scaling[adapter])
        return update.view(result.shape).to(result.dtype)

    def plain_active_adapter(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """The one active plain-LoRA adapter, or None where PEFT's own forward must run."""
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        adapters = [name for name in self.active_adapters if name in self.lora_A]
        if len(adapters) != 1 or not is_plain_lora(self, adapters[0]):
            return None
        return adapters[0]


class SharedInput:
    """The adapters of sibling linears that read one input, and the slices of their last shared product that
    members have not used yet (dropped once all are, so no activation outlives its forward)."""

    def __init__(self, members: list[FusedLoraLinear]) -> None:
        self.members = members
        self.input: torch.Tensor | None = None
        self.input_version = -1
        self.pending: dict[int, torch.Tensor] = {}  # member index -> its [tokens, r] product

    def is_usable(self, adapter: str) -> bool:
        return all(adapter in member.lora_A and is_plain_lora(member, adapter) for member in self.members)

    def product_for(self, member: FusedLoraLinear, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """`member`'s A product of x: its slice of the product computed for an earlier member from this very
        tensor, or else the whole group's product, computed now and kept for the others."""
        index = next(i for i, m in enumerate(self.members) if m is member)
        if self.input is x and x._version == self.input_version and index in self.pending:
            product = self.pending.pop(index)
            if not self.pending:
                self.input = None
            return product
        products = lora_products(self.members, x, adapter)
        self.input, self.input_version = x, x._version
        self.pending = {i: p for i, p in enumerate(products) if i != index}
        return products[index]


def is_plain_lora(layer: Any, adapter: str) -> bool:
    """Vanilla LoRA for this adapter: no DoRA or other variant, no bias on B."""
    return adapter not in layer.lora_variant and not layer.lora_bias[adapter]


def lora_products(layers: list[FusedLoraLinear], x: torch.Tensor, adapter: str) -> list[torch.Tensor]:
    """dropout(x) @ A^T for each layer, as one matmul over their stacked A; one dropout mask for all.
    Returns [tokens, r] per layer (column slices of one [tokens, sum of r] product)."""
    first = layers[0]
    weights = [adapter_weight(layer.lora_A, adapter) for layer in layers]  # each [r, in]
    x = first._cast_input_dtype(x, weights[0].dtype)
    x = first.lora_dropout[adapter](x).reshape(-1, x.shape[-1])  # [tokens, in]
    if len(weights) == 1:
        return [F.linear(x, weights[0])]
    product = F.linear(x, torch.cat(weights))  # [tokens, sum of r]; autograd splits the gradient back
    return list(product.split([w.shape[0] for w in weights], dim=-1))


def adapter_weight(modules: Any, adapter: str) -> torch.Tensor:
    """The weight of `adapter`'s linear in a PEFT lora_A / lora_B ModuleDict."""
    weight: torch.Tensor = modules[adapter].weight
    return weight


def register_fused_layers(peft_config: peft.LoraConfig) -> None:
    """Make PEFT build FusedLoraLinear instead of its lora.Linear for targeted nn.Linear layers (dense or NF4)."""
    peft_config._register_custom_module({torch.nn.Linear: FusedLoraLinear})


def group_shared_inputs(model: torch.nn.Module, adapter: str = "default") -> int:
    """Give each set of sibling FusedLoraLinear layers named in SHARED_INPUT_GROUPS one SharedInput; returns how
    many groups were formed. Siblings with different input sizes or dropout rates stay apart."""
    groups = 0
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in SHARED_INPUT_GROUPS:
            members = [child for name in names if isinstance(child := children.get(name), FusedLoraLinear)]
            if len(members) > 1 and can_share_input(members, adapter):
                group = SharedInput(members)
                for member in members:
                    member.shared_input = group
                groups += 1
    return groups


def can_share_input(members: list[FusedLoraLinear], adapter: str) -> bool:
    if not all(adapter in member.lora_A for member in members):
        return False
    dropouts = {getattr(member.lora_dropout[adapter], "p", 0.0) for member in members}
    in_features = {member.in_features for member in members}
    dtypes = {member.lora_A[adapter].weight.dtype for member in members}
    return len(dropouts) == len(in_features) == len(dtypes) == 1
