"""Gradient accumulation invariant: micro-batch 8 x accumulation 1 == micro-batch 1 x accumulation 8."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from sftune.data.batching import collate
from sftune.data.types import IGNORE_INDEX
from sftune.training.loss import TokenLoss, token_loss_sum
from sftune.training.step import backward_window
from tests.helpers import make_examples


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def test_micro_batch_8_equals_accumulation_8(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    examples = make_examples(model.config.vocab_size)
    pad = model.config.pad_token_id

    model.zero_grad()
    loss_big = backward_window([collate(examples, pad)], TokenLoss.for_model(model))
    grads_big = gradients(model)

    model.zero_grad()
    loss_small = backward_window([collate([e], pad) for e in examples], TokenLoss.for_model(model))
    grads_small = gradients(model)

    assert abs(loss_big - loss_small) <= 1e-5
    assert grads_big.keys() == grads_small.keys() and grads_big
    for name in grads_big:
        torch.testing.assert_close(grads_big[name], grads_small[name], atol=1e-5, rtol=1e-4, msg=name)


def test_loss_is_token_weighted_not_mean_of_means(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    examples = make_examples(model.config.vocab_size, count=4, seed=1)
    pad = model.config.pad_token_id
    with torch.no_grad():
        sums = [token_loss_sum(model, collate([e], pad)).item() for e in examples]
        counts = [collate([e], pad).num_supervised for e in examples]
    expected = sum(sums) / sum(counts)
    mean_of_means = sum(s / c for s, c in zip(sums, counts, strict=True)) / len(sums)
    model.zero_grad()
    got = backward_window([collate([e], pad) for e in examples], TokenLoss.for_model(model))
    assert abs(got - expected) < 1e-5
    assert abs(expected - mean_of_means) > 1e-4  # the lengths differ enough for the two to disagree


def test_selected_head_loss_equals_full_logits_reference(tiny_model_dir):
    """Our loss runs the LM head on supervised positions only; it must equal plain shifted cross-entropy."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = collate(make_examples(model.config.vocab_size, count=3, seed=2), model.config.pad_token_id)
    with torch.no_grad():
        ours = token_loss_sum(model, batch)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        reference = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)),
            batch.labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-5)
