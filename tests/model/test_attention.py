"""Padding-free rows: loss and gradients of packed examples equal those of the same examples padded (fp32)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sftune.config import LoraConfig
from sftune.data.batching import collate, collate_packed
from sftune.model.attention import ATTENTION
from sftune.model.lora import apply_lora
from sftune.training.loss import TokenLoss
from tests.helpers import make_examples

TINY = LlamaConfig(
    vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
)  # fmt: skip


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = TokenLoss.for_model(model)(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["sdpa", ATTENTION])
@pytest.mark.parametrize("lora", [False, True])
def test_packed_row_equals_padded_batch(attention, lora):
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY)
    model.config._attn_implementation = attention
    if lora:
        model = apply_lora(model, LoraConfig(r=4, dropout=0.0), [])
    examples = make_examples(TINY.vocab_size, count=5, seed=3)  # lengths 5..40, very different
    padded_loss, padded_grads = loss_and_grads(model, collate(examples, pad_token_id=0))
    packed = collate_packed(examples)
    assert packed.input_ids.shape == (1, sum(len(e.input_ids) for e in examples))  # no padding at all
    assert packed.num_supervised == collate(examples, 0).num_supervised
    packed_loss, packed_grads = loss_and_grads(model, packed)
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-6)
    assert packed_grads.keys() == padded_grads.keys() and packed_grads
    for name in packed_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_examples_in_a_row_do_not_attend_to_each_other():
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY).eval()
    model.config._attn_implementation = ATTENTION
    first, second = make_examples(TINY.vocab_size, count=2, seed=4)
    other = make_examples(TINY.vocab_size, count=1, seed=9)[0]
    body = model.model
    with torch.no_grad():
        a = body(**collate_packed([first, second]).model_inputs())[0][0, len(first.input_ids) :]
        b = body(**collate_packed([other, second]).model_inputs())[0][0, len(other.input_ids) :]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)  # what came before in the row changes nothing
