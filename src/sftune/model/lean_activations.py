"""Leaner activations: outputs that are cheap to recompute are not kept for backward (train.lean_activations).

Autograd keeps, for backward, every tensor an operation needs for its gradients. In a decoder block much of that is
the output of element-wise work that its consumers save again: each norm's output (the input of the q/k/v and
gate/up products, kept for their weight or adapter gradients) and, in a gated MLP `down(act(gate(x)) * up(x))`,
both `act(gate)` (kept by the product) and `act(gate) * up` (kept by down). Four of a block's eleven or so kept
values per token, about 40% of them: the MLP's are [tokens, intermediate], the widest of all.

Here those tensors are kept as a recipe instead: a `saved_tensors_hooks` pair, active while each decoder block runs
forward, swaps a saved tensor that is one of them for (the module that made it, its inputs), and backward
recomputes it from those inputs, which autograd keeps anyway (the norm's input, `gate` and `up`). Recomputed by
the same code on the same values, the tensor is bit for bit the one forward made, so the gradients are unchanged
(tested). What it costs is element-wise: each norm and the act(gate) * up product once more per backward.

Which tensors: the outputs of every norm in a block (a module whose class name ends in "Norm"), and, where the
block has a gated MLP (gate_proj, up_proj, down_proj, act_fn) whose forward is proven on a probe to be exactly
down(act(gate) * up), its act(gate) and act(gate) * up. Everything else is saved as before. Off where the block's
activations are handled otherwise: under activation checkpointing (a checkpointed block keeps none of them) and
train.compile (the compiler chooses its own recomputation).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sftune.model.blocks import decoder_layers

GATED_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


@dataclass
class Recipe:
    """How to remake a tensor from inputs autograd keeps anyway. The remade tensor is shared by every consumer
    that saved it (q, k and v all keep their norm's output) and dropped once the last of them has had it."""

    make: Callable[..., torch.Tensor]
    inputs: tuple[torch.Tensor, ...]
    autocast: tuple[str, bool, torch.dtype]  # device type, autocast on, its dtype: the state it was made under
    shape: torch.Size  # of the tensor forward made (contiguous)
    consumers: int = 0
    remade: torch.Tensor | None = None

    def remake(self) -> torch.Tensor:
        if self.remade is None:
            device_type, enabled, dtype = self.autocast
            with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                self.remade = self.make(*self.inputs)
            if self.remade.shape != self.shape or not self.remade.is_contiguous():
                raise RuntimeError(
                    f"lean activations: a tensor saved for backward was remade as {tuple(self.remade.shape)}, not "
                    f"{tuple(self.shape)} as in forward; set train.lean_activations=false for this model"
                )
        remade = self.remade
        self.consumers -= 1
        if self.consumers <= 0:
            self.remade = None
        return remade


@dataclass
class Saved:
    """A saved tensor kept as its recipe and its place in the recipe's output (a view: shape, strides, offset)."""

    recipe: Recipe
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


def unpack(saved: Any) -> torch.Tensor:
    if not isinstance(saved, Saved):
        return saved
    remade = saved.recipe.remake()
    return remade.as_strided(saved.size, saved.stride, remade.storage_offset() + saved.offset)


@dataclass
class Remakeable:
    """A tensor made in a block's forward that a saved tensor may be swapped for a recipe of. Held weakly, with
    its inputs: only once a consumer saves it does a Recipe hold the inputs (which autograd keeps anyway)."""

    output: weakref.ref
    version: int  # an in-place change after this makes it no longer what the recipe remakes
    offset: int
    make: Callable[..., torch.Tensor]
    inputs: tuple[weakref.ref, ...]
    autocast: tuple[str, bool, torch.dtype]
    recipe: Recipe | None = None

    def recipe_for(self, tensor: torch.Tensor) -> Recipe | None:
        output, inputs = self.output(), tuple(ref() for ref in self.inputs)
        if output is None or any(t is None for t in inputs) or output.dtype != tensor.dtype:
            return None  # what was registered at this address is gone: another tensor lives there now
        if tensor._version != self.version:
            return None
        if self.recipe is None:
            self.recipe = Recipe(self.make, inputs, self.autocast, output.shape)  # type: ignore[arg-type]
        return self.recipe


class BlockRecipes:
    """The remakeable tensors of one block's forward, by storage address, and the pack hook that swaps a saved one
    for its recipe. Lives for that forward only."""

    def __init__(self) -> None:
        self.remakeable: dict[int, Remakeable] = {}

    def add(self, output: Any, make: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> None:
        if not (isinstance(output, torch.Tensor) and output.requires_grad and output.is_contiguous()):
            return
        if output.untyped_storage().data_ptr() == 0:  # no memory of its own (empty, meta): nothing to save
            return
        device_type = output.device.type
        autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        self.remakeable[output.untyped_storage().data_ptr()] = Remakeable(
            weakref.ref(output), output._version, int(output.storage_offset()), make,
            tuple(weakref.ref(t) for t in inputs), autocast,
        )  # fmt: skip

    def pack(self, tensor: torch.Tensor) -> Any:
        entry = self.remakeable.get(tensor.untyped_storage().data_ptr())
        recipe = entry.recipe_for(tensor) if entry is not None else None
        if recipe is None:
            return tensor
        recipe.consumers += 1
        return Saved(recipe, tensor.size(), tensor.stride(), int(tensor.storage_offset()) - entry.offset)  # type: ignore[union-attr]


class LeanBlock:
    """The hooks of one decoder block: while its forward runs with gradients, a BlockRecipes collects what its
    norms and gated MLPs make and packs what autograd saves."""

    def __init__(self) -> None:
        self.recipes: BlockRecipes | None = None
        self.hooks: Any = None

    def enter(self, module: torch.nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():
            self.recipes = BlockRecipes()
            self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, unpack)
            self.hooks.__enter__()

    def leave(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.hooks is not None:
            self.hooks.__exit__(None, None, None)
        self.recipes = self.hooks = None

    def pack(self, tensor: torch.Tensor) -> Any:
        if self.recipes is None or type(tensor) is not torch.Tensor or tensor.numel() == 0:
            return tensor
        return self.recipes.pack(tensor)

    def norm_made(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.recipes is not None and len(args) == 1 and isinstance(args[0], torch.Tensor):
            self.recipes.add(output, module, args[0])


class LeanGatedMLP:
    """Records a gated MLP's act(gate) and up as they are made, and registers act(gate) * up when it reaches down."""

    def __init__(self, block: LeanBlock, act: torch.nn.Module) -> None:
        self.block, self.act = block, act
        self.gate: torch.Tensor | None = None
        self.up: torch.Tensor | None = None

    def act_made(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.block.recipes is not None and len(args) == 1:
            self.gate = args[0]
            self.block.recipes.add(output, module, args[0])

    def up_made(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.block.recipes is not None:
            self.up = output

    def down_called(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        gate, up, self.gate, self.up = self.gate, self.up, None, None
        product = args[0] if args else None
        if self.block.recipes is None or gate is None or up is None or not isinstance(product, torch.Tensor):
            return
        if product.shape == up.shape == gate.shape:
            self.block.recipes.add(product, self.gated_product, gate, up)

    def gated_product(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act(gate) * up


def is_gated_mlp(module: Any, dtype: torch.dtype, device: torch.device) -> bool:
    """True when `module` has gate_proj, up_proj, down_proj and an act_fn module, and its forward, on a probe,
    calls each once and feeds down exactly act(gate) * up."""
    if not all(isinstance(getattr(module, part, None), torch.nn.Module) for part in GATED_MLP_PARTS):
        return False
    width = getattr(module.gate_proj, "in_features", None)
    if not isinstance(width, int):
        return False
    seen: dict[str, list[Any]] = {part: [] for part in GATED_MLP_PARTS}
    handles = [
        module.act_fn.register_forward_hook(lambda m, a, o: seen["act_fn"].append(a[0])),
        module.up_proj.register_forward_hook(lambda m, a, o: seen["up_proj"].append(o)),
        module.gate_proj.register_forward_hook(lambda m, a, o: seen["gate_proj"].append(o)),
        module.down_proj.register_forward_pre_hook(lambda m, a: seen["down_proj"].append(a[0] if a else None)),
    ]
    try:
        with torch.no_grad():
            module(torch.randn(1, 3, width, dtype=dtype, device=device))
    finally:
        for handle in handles:
            handle.remove()
    if any(len(calls) != 1 for calls in seen.values()):
        return False
    (gate,), (up,), (product,) = seen["act_fn"], seen["up_proj"], seen["down_proj"]
    with torch.no_grad():
        return seen["gate_proj"][0] is gate and torch.equal(product, module.act_fn(gate) * up)


def make_activations_lean(model: torch.nn.Module) -> tuple[int, int]:
    """Hook every decoder block (model/blocks.py) so that its norms' outputs and its gated MLP's act(gate) and
    act(gate) * up are saved for backward as recipes; returns (blocks, gated MLPs among them)."""
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    dtype, device = embeddings.weight.dtype, embeddings.weight.device
    blocks = decoder_layers(model)
    gated = 0
    for block in blocks:
        lean = LeanBlock()
        block.register_forward_pre_hook(lean.enter)
        block.register_forward_hook(lean.leave, always_call=True)
        module: Any
        for module in block.modules():
            if type(module).__name__.endswith("Norm"):
                module.register_forward_hook(lean.norm_made)
            elif is_gated_mlp(module, dtype, device):
                mlp = LeanGatedMLP(lean, module.act_fn)
                module.act_fn.register_forward_hook(mlp.act_made)
                module.up_proj.register_forward_hook(mlp.up_made)
                module.down_proj.register_forward_pre_hook(mlp.down_called)
                gated += 1
    return len(blocks), gated
