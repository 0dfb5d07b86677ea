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
down(act(gate) * up), its act(gate) and act(gate) * up, the latter only where autograd's graph shows that down's
input is that product of those very tensors (not, say, a dropout of it). Everything else is saved as before. Off
where the block's activations are handled otherwise: under activation checkpointing (a checkpointed block keeps
none of them) and train.compile (the compiler chooses its own recomputation).

Safety: with saved-tensor hooks set, autograd no longer checks saved tensors for in-place changes itself, so the
hooks do: every tensor kept as it is carries its version, and a recipe the versions of its inputs and of the
remaking module's parameters; a change between forward and backward raises autograd's own error.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sftune.config import TrainConfig
from sftune.model.blocks import decoder_layers

GATED_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


def is_used(train: TrainConfig) -> bool:
    """Whether a run's blocks are made lean: asked for, and their activations not handled otherwise (activation
    checkpointing, also when still 'auto': it may resolve to on; train.compile)."""
    return train.lean_activations and not train.gradient_checkpointing and not train.compile


def modified_error(what: str) -> RuntimeError:
    return RuntimeError(
        f"one of the variables needed for gradient computation has been modified by an inplace operation ({what}); "
        "lean activations (train.lean_activations) keep autograd's check"
    )


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
    watched: tuple[torch.Tensor, ...] = ()  # inputs and the parameters `make` reads
    versions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        parameters = tuple(self.make.parameters()) if isinstance(self.make, torch.nn.Module) else ()
        self.watched = self.inputs + parameters
        self.versions = tuple(t._version for t in self.watched)

    def remake(self) -> torch.Tensor:
        if self.remade is None:
            if any(t._version != v for t, v in zip(self.watched, self.versions, strict=True)):
                raise modified_error("an input of a tensor remade in backward")
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


@dataclass
class Kept:
    """A saved tensor kept as it is, with its version when saved (autograd's in-place check, redone here)."""

    tensor: torch.Tensor
    version: int


def unpack(saved: Any) -> torch.Tensor:
    if isinstance(saved, Kept):
        if saved.tensor._version != saved.version:
            raise modified_error(f"a {tuple(saved.tensor.shape)} tensor at version {saved.tensor._version}, "
                                 f"saved at version {saved.version}")  # fmt: skip
        return saved.tensor
    remade = saved.recipe.remake()
    return remade.as_strided(saved.size, saved.stride, remade.storage_offset() + saved.offset)


def extent(tensor: torch.Tensor) -> int:
    """Elements from a tensor's first to one past its last, in its storage (a non-empty strided tensor)."""
    return 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))


@dataclass
class Remakeable:
    """A tensor made in a block's forward that a saved tensor may be swapped for a recipe of. Held weakly, with
    its inputs: only once a consumer saves it does a Recipe hold the inputs (which autograd keeps anyway)."""

    output: weakref.ref
    address: int
    version: int  # an in-place change after this makes it no longer what the recipe remakes
    offset: int
    make: Callable[..., torch.Tensor]
    inputs: tuple[weakref.ref, ...]
    autocast: tuple[str, bool, torch.dtype]
    recipe: Recipe | None = None

    def recipe_for(self, tensor: torch.Tensor) -> tuple[Recipe, int] | None:
        """The recipe for `tensor` and its offset in the output, or None where `tensor` is not (or no longer) a
        view of the output as forward made it."""
        output, inputs = self.output(), tuple(ref() for ref in self.inputs)
        if output is None or any(t is None for t in inputs) or output.dtype != tensor.dtype:
            return None  # what was registered at this address is gone: another tensor lives there now
        if output.untyped_storage().data_ptr() != self.address or output._version != self.version:
            return None  # moved (set_, resize_) or changed in place since it was made
        offset = int(tensor.storage_offset()) - self.offset
        if offset < 0 or offset + extent(tensor) > output.numel():
            return None
        if self.recipe is None:
            self.recipe = Recipe(self.make, inputs, self.autocast, output.shape)  # type: ignore[arg-type]
        return self.recipe, offset


def is_plain_strided(tensor: Any) -> bool:
    """A dense tensor of torch's own class (not a subclass such as DTensor, not sparse, not empty)."""
    return type(tensor) is torch.Tensor and tensor.layout == torch.strided and tensor.numel() > 0


class BlockRecipes:
    """The remakeable tensors of one block's forward, by storage address, and the pack hook that swaps a saved one
    for its recipe. Lives for that forward only."""

    def __init__(self) -> None:
        self.remakeable: dict[int, Remakeable] = {}

    def add(self, output: Any, make: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> None:
        if not (is_plain_strided(output) and output.requires_grad and output.is_contiguous()):
            return
        address = output.untyped_storage().data_ptr()
        if address == 0:  # no memory of its own (meta): nothing to save
            return
        device_type = output.device.type
        autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        self.remakeable[address] = Remakeable(
            weakref.ref(output), address, output._version, int(output.storage_offset()), make,
            tuple(weakref.ref(t) for t in inputs), autocast,
        )  # fmt: skip

    def pack(self, tensor: torch.Tensor) -> Any:
        entry = self.remakeable.get(tensor.untyped_storage().data_ptr()) if is_plain_strided(tensor) else None
        found = entry.recipe_for(tensor) if entry is not None else None
        if found is None:
            return Kept(tensor, tensor._version)
        recipe, offset = found
        recipe.consumers += 1
        return Saved(recipe, tensor.size(), tensor.stride(), offset)


class LeanBlock:
    """The hooks of one decoder block: while its forward runs with gradients, a BlockRecipes collects what its
    norms and gated MLPs make and packs what autograd saves."""

    def __init__(self) -> None:
        self.recipes: BlockRecipes | None = None
        self.hooks: Any = None
        self.mlps: list[LeanGatedMLP] = []

    def enter(self, module: torch.nn.Module, args: Any) -> None:
        self.leave(module, args, None)  # a forward interrupted before (KeyboardInterrupt) left its hooks set
        if torch.is_grad_enabled():
            self.recipes = BlockRecipes()
            self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, unpack)
            self.hooks.__enter__()

    def leave(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.hooks is not None:
            self.hooks.__exit__(None, None, None)
        self.recipes = self.hooks = None
        for mlp in self.mlps:
            mlp.forget()

    def pack(self, tensor: torch.Tensor) -> Any:
        if self.recipes is None:
            return Kept(tensor, tensor._version)
        return self.recipes.pack(tensor)

    def norm_made(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.recipes is not None and len(args) == 1 and isinstance(args[0], torch.Tensor):
            self.recipes.add(output, module, args[0])


class LeanGatedMLP:
    """Records a gated MLP's gate, act(gate) and up as they are made, and registers down's input as act(gate) * up
    where autograd's graph shows it is exactly that product of those tensors."""

    def __init__(self, block: LeanBlock, act: torch.nn.Module) -> None:
        self.block, self.act = block, act
        block.mlps.append(self)
        self.gate: torch.Tensor | None = None
        self.activated: torch.Tensor | None = None
        self.up: torch.Tensor | None = None

    def forget(self) -> None:
        self.gate = self.activated = self.up = None

    def act_made(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.block.recipes is not None and len(args) == 1:
            self.gate, self.activated = args[0], output
            self.block.recipes.add(output, module, args[0])

    def up_made(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.block.recipes is not None:
            self.up = output

    def down_called(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        gate, activated, up = self.gate, self.activated, self.up
        self.forget()
        product = args[0] if args else None
        if self.block.recipes is None or gate is None or not isinstance(product, torch.Tensor):
            return
        if is_product_of(product, activated, up) and product.shape == gate.shape:
            self.block.recipes.add(product, self.gated_product, gate, up)  # type: ignore[arg-type]

    def gated_product(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act(gate) * up


def is_product_of(product: torch.Tensor, a: Any, b: Any) -> bool:
    """True when autograd made `product` as a * b (either order) from these very tensors."""
    node = product.grad_fn
    if node is None or type(node).__name__ != "MulBackward0" or a is None or b is None:
        return False
    made_a, made_b = a.grad_fn, b.grad_fn  # held: autograd hands out one Python object per live node
    if made_a is None or made_b is None or len(node.next_functions) != 2:
        return False
    (first, _), (second, _) = node.next_functions
    return (first is made_a and second is made_b) or (first is made_b and second is made_a)


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
    probe = torch.randn(1, 3, width, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    training = module.training
    try:  # own generator, eval mode (no dropout draws): the run's random stream is the same, lean or not
        with torch.no_grad():
            module.eval()(probe)
    finally:
        module.train(training)
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
