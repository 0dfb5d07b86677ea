"""The loss's body/head split: used where it is exact, a named fallback for soft-capped logits, loud otherwise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from sftune.data.batching import collate
from sftune.data.types import IGNORE_INDEX
from sftune.training.loss import LossSplitError, TokenLoss
from tests.helpers import make_examples

TINY = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}


def reference_loss(model, batch) -> torch.Tensor:
    """Plain shifted cross-entropy over the model's own full logits."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)),
        batch.labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def test_plain_causal_lm_uses_the_split_and_matches_full_logits():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, **HEADS)).eval()
    loss = TokenLoss.for_model(model)
    assert loss.body is model.model and loss.head is model.lm_head and "supervised positions only" in loss.path
    batch = collate(make_examples(TINY["vocab_size"], count=3), pad_token_id=0)
    with torch.no_grad():
        torch.testing.assert_close(loss(batch), reference_loss(model, batch), atol=1e-4, rtol=1e-5)


def test_soft_capped_logits_fall_back_to_the_full_forward_and_say_so():
    torch.manual_seed(0)
    config = Gemma2Config(**TINY, **HEADS, final_logit_softcapping=0.05, attn_implementation="eager")
    model = Gemma2ForCausalLM(config).eval()
    loss = TokenLoss.for_model(model)
    assert loss.body is None and "final_logit_softcapping=0.05" in loss.path
    batch = collate(make_examples(TINY["vocab_size"], count=3), pad_token_id=0)
    with torch.no_grad():
        torch.testing.assert_close(loss(batch), reference_loss(model, batch), atol=1e-4, rtol=1e-5)
        # The split would be wrong for this model: head(body(x)) is not its logits.
        split = model.lm_head(model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0])
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        assert (split - full).abs().max() > 1e-2


class ScaledLogitsLlama(LlamaForCausalLM):
    """A model that transforms its logits without a config attribute that says so."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 3.0
        return output


def test_a_model_whose_logits_are_not_head_of_body_is_refused():
    model = ScaledLogitsLlama(LlamaConfig(**TINY, **HEADS))
    with pytest.raises(LossSplitError, match="differs from the model's logits"):
        TokenLoss.for_model(model)


def test_a_model_without_body_and_head_is_refused():
    class Bare(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return None

    with pytest.raises(LossSplitError, match="does not split into a decoder body"):
        TokenLoss.for_model(Bare())


@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_linear_cross_entropy_equals_plain_cross_entropy(monkeypatch, with_bias):
    from sftune.training import loss as loss_module

    monkeypatch.setattr(loss_module, "CHUNK_LOGITS", 7 * 97)  # 7 rows per chunk: several chunks, a ragged last one
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(97, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(97, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 97, (30,))
    chunked = loss_module.linear_cross_entropy(hidden, weight, bias, targets)
    grads = torch.autograd.grad(2.5 * chunked, [hidden, weight, *([bias] if with_bias else [])])
    plain = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")
    expected = torch.autograd.grad(2.5 * plain, [hidden, weight, *([bias] if with_bias else [])])
    torch.testing.assert_close(chunked, plain.float(), atol=1e-5, rtol=1e-6)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_chunked_loss_gradients_accumulate_over_micro_batches_and_are_handed_over_once():
    """The head's gradients are computed in forward and handed to autograd in backward (scaled in place, no copy):
    two micro-batches accumulate into .grad exactly as the plain loss does, and a second backward through the same
    graph is refused rather than handing over an already-used gradient."""
    from sftune.training import loss as loss_module

    torch.manual_seed(0)
    weight = torch.randn(97, 16, dtype=torch.float64, requires_grad=True)
    plain_weight = weight.detach().clone().requires_grad_(True)
    for _ in range(2):
        hidden = torch.randn(12, 16, dtype=torch.float64)
        targets = torch.randint(0, 97, (12,))
        (loss_module.linear_cross_entropy(hidden, weight, None, targets) / 24).backward()
        (F.cross_entropy(F.linear(hidden, plain_weight), targets, reduction="sum") / 24).backward()
    torch.testing.assert_close(weight.grad, plain_weight.grad, atol=1e-6, rtol=1e-6)
    again = loss_module.linear_cross_entropy(hidden, weight, None, targets)
    again.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        again.backward()


def test_chunked_loss_under_no_grad_is_the_same_value_with_nothing_to_backpropagate():
    """Evaluation runs the loss under no_grad on parameters that require grad: the same sum, no graph (and no
    gradients computed ahead in forward)."""
    from sftune.training import loss as loss_module

    torch.manual_seed(0)
    hidden = torch.randn(20, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(97, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 97, (20,))
    with torch.no_grad():
        value = loss_module.linear_cross_entropy(hidden, weight, None, targets)
    assert value.grad_fn is None and not value.requires_grad
    plain = F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum")
    torch.testing.assert_close(value, plain.detach().float(), atol=1e-5, rtol=1e-6)


def test_chunked_loss_under_bf16_autocast_stays_close_to_fp32_and_keeps_fp32_gradients():
    from sftune.training import loss as loss_module

    torch.manual_seed(0)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = (0.1 * torch.randn(300, 32)).requires_grad_(True)
    targets = torch.randint(0, 300, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss_module.linear_cross_entropy(hidden, weight, None, targets)
    mixed_grads = torch.autograd.grad(mixed, [hidden, weight])
    exact = loss_module.linear_cross_entropy(hidden, weight, None, targets)
    exact_grads = torch.autograd.grad(exact, [hidden, weight])
    assert mixed.dtype == torch.float32 and all(g.dtype == torch.float32 for g in mixed_grads)
    torch.testing.assert_close(mixed, exact, rtol=2e-2, atol=0.0)
    for got, want in zip(mixed_grads, exact_grads, strict=True):
        assert (got - want).norm() / want.norm() < 3e-2


@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_log_probs_equal_log_softmax_with_any_per_row_gradient(monkeypatch, with_bias):
    """DPO's per-token log-probs: values and gradients (a different weight per row, as sequence sums give) equal
    the plain log-softmax's, with several chunks and a ragged last one; empty input stays in the graph."""
    from sftune.training import loss as loss_module

    monkeypatch.setattr(loss_module, "CHUNK_LOGITS", 7 * 97)
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, requires_grad=True)
    weight = torch.randn(97, 16, requires_grad=True)
    bias = torch.randn(97, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 97, (30,))
    row_weights = torch.randn(30)  # what d(loss)/d(logp) looks like: per row, unknown in forward
    inputs = [hidden, weight, *([bias] if with_bias else [])]

    chunked = loss_module.linear_log_probs(hidden, weight, bias, targets)
    grads = torch.autograd.grad((chunked * row_weights).sum(), inputs)
    plain = torch.log_softmax(F.linear(hidden, weight, bias), dim=-1).gather(1, targets[:, None]).squeeze(1)
    expected = torch.autograd.grad((plain * row_weights).sum(), inputs)
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    empty = loss_module.linear_log_probs(hidden[:0], weight, bias, targets[:0])
    assert empty.shape == (0,) and empty.requires_grad


def test_chunked_loss_in_a_model_equals_full_logits_in_fp32(monkeypatch):
    from sftune.training import loss as loss_module

    monkeypatch.setattr(loss_module, "CHUNK_LOGITS", 5 * TINY["vocab_size"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, **HEADS, tie_word_embeddings=True))
    batch = collate(make_examples(TINY["vocab_size"], count=4), pad_token_id=0)
    ours = TokenLoss.for_model(model)(batch)
    ours.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference_loss(model, batch).backward()
    torch.testing.assert_close(ours, reference_loss(model, batch).detach(), atol=1e-5, rtol=1e-6)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(got[name], parameter.grad, atol=1e-5, rtol=1e-4, msg=name)
