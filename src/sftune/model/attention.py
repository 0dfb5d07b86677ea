"""Attention for padding-free rows: each packed example attends only to itself, through the fused SDPA kernel.

A padding-free micro-batch is one row holding several examples back to back (`data.batching.collate_packed`), with
position ids restarting per example and `cu_seq_lens_q` giving the boundaries. `segment_attention` runs
`scaled_dot_product_attention(is_causal=True)` on each example's slice: no attention across examples, no
[seq x seq] mask or score tensor (the CPU and GPU flash kernels keep neither), and no compute spent on the
blocks a mask would zero. Registered with transformers' AttentionInterface (its public extension point) under
`ATTENTION`, with the sdpa mask function, so calls without boundaries (generation, padded batches) take the
ordinary sdpa path unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "sftune_segments"


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, tokens, head_dim]
    key: torch.Tensor,  # [1, kv_heads, tokens, head_dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed example; the sdpa path where the call carries no boundaries."""
    if cu_seq_lens_q is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    grouped = getattr(module, "num_key_value_groups", 1) > 1  # GQA in the kernel: no repeated copies of k and v
    bounds = cu_seq_lens_q.tolist()
    outputs = [
        F.scaled_dot_product_attention(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            dropout_p=dropout,
            scale=scaling,
            is_causal=True,
            enable_gqa=grouped,
        )
        for start, end in zip(bounds[:-1], bounds[1:], strict=True)
        if end > start
    ]
    output = torch.cat(outputs, dim=2)  # [1, heads, tokens, head_dim]
    return output.transpose(1, 2).contiguous(), None  # [1, tokens, heads, head_dim], as sdpa returns it


AttentionInterface.register(ATTENTION, segment_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
