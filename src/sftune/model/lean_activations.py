"""Leaner activations: a decoder block keeps for backward only its matrix products' and its attention's outputs; the
element-wise work between them is recomputed in backward (train.lean_activations).

Autograd keeps, for backward, every tensor an operation needs for its gradients, and in a decoder block much of that
is the output of cheap element-wise work: each norm's output (kept for the q/k/v and gate/up products), the rotated
q and k, the activated gate and act(gate) * up of a gated MLP (the widest of all, [tokens, intermediate]), LoRA
dropout's copies of its inputs. Here each block runs under torch's selective activation checkpointing (the public
`create_selective_checkpoint_contexts`, through transformers' `activation_checkpointing_enable`): in forward the
block keeps its input and the outputs of the operations the policy below marks MUST_SAVE, nothing else; in backward
it replays its forward from them, taking those outputs from the store instead of computing them again, so only the
element-wise work runs twice. Recomputed by the same operations on the same values (autocast state and random
state, hence dropout masks, restored by the checkpoint), every tensor is bit for bit the one forward made and the
gradients are unchanged (tested).

Kept: the attention kernels' outputs and the matrix products (mm, addmm, bmm, baddbmm) that contract over at least a
quarter of the model's width. A LoRA adapter's B product contracts over its rank only: about r multiply-adds per
value, as cheap as element-wise work and as wide as the base output it is added to, so it is recomputed rather than
kept beside that output. Unused where the blocks' activations are handled otherwise: under plain activation
checkpointing (a checkpointed block keeps none of them) and train.compile (the compiler chooses its own
recomputation). Memory and speed against the hook-based version this replaced: bench/results/lean_activations.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from transformers import GradientCheckpointingLayer

from sftune.config import TrainConfig
from sftune.model.blocks import unwrapped_model

aten = torch.ops.aten
# Always kept: the fused attention kernels, CPU and GPU (model/attention.py's segment attention runs the first on a
# CPU), and batched products (eager attention's scores and weighted values).
KEPT_OPS = {
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten._scaled_dot_product_fused_attention_overrideable.default,
    aten.bmm.default,
    aten.baddbmm.default,
}
# The linears' products, kept where they contract over enough values; by the position of their left factor.
LINEAR_PRODUCTS = {aten.mm.default: 0, aten.addmm.default: 1}


def is_used(train: TrainConfig) -> bool:
    """Whether a run's blocks are made lean: asked for, and their activations not handled otherwise (activation
    checkpointing, also when still 'auto': it may resolve to on; train.compile)."""
    return train.lean_activations and not train.gradient_checkpointing and not train.compile


def keeping_policy(min_contraction: int) -> Callable[..., CheckpointPolicy]:
    """The selective checkpointing policy: keep what KEPT_OPS make and the linears' products that contract over at
    least `min_contraction` values; recompute everything else."""

    def policy(context: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        left = LINEAR_PRODUCTS.get(op)
        if op in KEPT_OPS or (left is not None and args[left].shape[-1] >= min_contraction):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def make_activations_lean(model: torch.nn.Module) -> int:
    """Run every decoder block of a transformers model (under a PEFT wrapper or not) under selective activation
    checkpointing with `keeping_policy`; returns how many blocks (0 for a model without checkpointing support,
    left as it is)."""
    base = unwrapped_model(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        return 0
    width = base.get_input_embeddings().embedding_dim
    context_fn = functools.partial(create_selective_checkpoint_contexts, keeping_policy(max(1, width // 4)))
    base.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": context_fn}
    )
    # transformers also makes the embeddings' output require grad, which only reentrant checkpointing needs: without
    # it LoRA's backward ends at the first block, as it does when not lean.
    base.disable_input_require_grads()
    return sum(
        1 for block in base.modules() if isinstance(block, GradientCheckpointingLayer) and block.gradient_checkpointing
    )
