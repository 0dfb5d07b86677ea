"""Cross-entropy on supervised tokens, summed: the caller divides by the tokens of the whole accumulation window."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sftune.data.batching import Batch, collate
from sftune.data.types import IGNORE_INDEX, Example


def _decoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """The transformer body and LM head of a plain *ForCausalLM, or None when logits need model-specific work."""
    if hasattr(model, "get_base_model"):  # a PEFT model: its LoRA layers live inside the wrapped *ForCausalLM
        model = model.get_base_model()
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    prefix = getattr(model, "base_model_prefix", None)
    body = getattr(model, prefix, None) if prefix else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or head is None or body is model:
        return None
    return body, head


def token_loss_sum(model: Any, batch: Batch) -> torch.Tensor:
    """Sum of token cross-entropies over supervised positions. Labels shift here, and only here.

    The LM head runs on supervised positions only: prompt tokens never need vocabulary logits, and the
    head is a large share of a small model's compute.
    """
    targets = batch.labels[:, 1:]  # [batch, seq-1]
    keep = targets != IGNORE_INDEX
    parts = _decoder_and_head(model)
    if parts is None:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        selected = logits[:, :-1][keep]  # [supervised, vocab]
    else:
        body, head = parts
        hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)[0]
        selected = head(hidden[:, :-1][keep])  # [supervised, vocab]
    return F.cross_entropy(selected.float(), targets[keep], reduction="sum")


@torch.no_grad()
def mean_token_loss(
    model: Any, examples: list[Example], micro_batch_size: int, pad_id: int, device: torch.device, autocast: Any
) -> float:
    """Cross-entropy per supervised token over all `examples` (validation loss): token-weighted, not a mean of
    batch means. Leaves the model in the mode it was in."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), micro_batch_size):
        batch = collate(examples[start : start + micro_batch_size], pad_id).to(device)
        with autocast:
            total += token_loss_sum(model, batch).item()
        tokens += batch.num_supervised
    model.train(was_training)
    return total / max(1, tokens)
