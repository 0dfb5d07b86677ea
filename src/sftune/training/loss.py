"""Cross-entropy on supervised tokens, summed: the caller divides by the tokens of the whole accumulation window.

A causal LM is a body (the decoder, giving hidden states) and a head (the vocabulary projection). The loss runs
the head on supervised positions only: prompt tokens never need vocabulary logits, and the head is a large
share of a small model's compute and the largest activation of all. `TokenLoss` resolves that split once per
model and proves it on a short input; a model whose logits need more than head(body(x)) either has a named
fallback (soft-capped or scaled logits: the full forward, said in the run log) or is refused loudly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sftune.config import UserError
from sftune.data.batching import Batch, make_batch
from sftune.data.types import IGNORE_INDEX, Example
from sftune.model.blocks import unwrapped_model
from sftune.training.distributed import SINGLE, Distributed, LossModule, placeholder, rank_chunks

# Config attributes that change logits after the head: the split would compute the wrong logits for them.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")
SPLIT_CHECK_TOLERANCE = 1e-3  # relative, on logits of a short fp32 input


class LossSplitError(UserError, ValueError):
    """The model's logits are not head(body(hidden)): the selected-positions loss would be wrong for it."""


@dataclass(frozen=True)
class TokenLoss:
    """Sum of token cross-entropies over a batch's supervised positions. Labels shift here, and only here.

    `body`/`head` are the split this model is run with; both None means the full forward (the named fallback).
    """

    model: Any
    body: Any  # None: the full forward
    head: Any
    path: str  # how logits are computed, for the run log

    @classmethod
    def for_model(cls, model: Any, verify: bool = True) -> TokenLoss:
        inner = unwrapped_model(model)  # PEFT wraps the *ForCausalLM
        transform = logit_transform(inner)
        if transform:
            return cls(
                model, None, None, f"full logits on every position ({transform}: the head alone is not the logits)"
            )
        body, head = split_body_and_head(inner)
        loss = cls(model, body, head, "LM head on supervised positions only (body/head split)")
        if verify:
            verify_split(inner, body, head)
        return loss

    def __call__(self, batch: Batch) -> torch.Tensor:
        targets = batch.labels[:, 1:]  # [batch, seq-1]
        keep = targets != IGNORE_INDEX
        if self.body is None:
            logits = self.model(**batch.model_inputs(), use_cache=False).logits
            return F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum")
        hidden = self.body(**batch.model_inputs(), use_cache=False)[0]
        selected = hidden[:, :-1][keep]  # [supervised, hidden]
        if isinstance(self.head, torch.nn.Linear):  # logits a chunk at a time, never all of them at once
            return linear_cross_entropy(selected, self.head.weight, self.head.bias, targets[keep])
        return F.cross_entropy(self.head(selected).float(), targets[keep], reduction="sum")


# Logits held at once by the chunked head + loss: chunk rows x vocabulary fp32 values (32 MiB: as fast as larger
# chunks, where smaller ones cost time in the head; bench/results/memory_profile.md).
CHUNK_LOGITS = 8 * 1024 * 1024


@dataclass
class HeadGrads:
    """Gradients of the head's inputs (hidden rows, weight, bias), summed a chunk of d(loss)/d(logits) at a time;
    None for an input that needs none. Weight and bias gradients accumulate in fp32."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    @classmethod
    def zeros(
        cls, needs: tuple[bool, ...], hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> HeadGrads:
        return cls(
            torch.zeros_like(hidden) if needs[0] else None,
            torch.zeros_like(weight, dtype=torch.float32) if needs[1] else None,
            torch.zeros_like(bias, dtype=torch.float32) if needs[2] and bias is not None else None,
        )

    @property
    def needed(self) -> bool:
        return self.hidden is not None or self.weight is not None or self.bias is not None

    def add(self, start: int, rows: torch.Tensor, grad_logits: torch.Tensor, weight: torch.Tensor) -> None:
        if self.hidden is not None:
            self.hidden[start : start + len(rows)] = (grad_logits.to(weight.dtype) @ weight).to(self.hidden.dtype)
        if self.weight is None:
            return
        if torch.is_autocast_enabled(rows.device.type):  # the product in the autocast dtype, summed in fp32
            self.weight += grad_logits.T @ rows
        else:  # in place: no [vocab, hidden] product beside the sum
            self.weight.addmm_(grad_logits.T, rows.float())
        if self.bias is not None:
            self.bias += grad_logits.sum(0)


class LinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T + bias, targets)) with the logits computed a chunk of rows at a time.

    Forward computes each chunk's logits, its loss and, while the chunk is at hand, its gradients (softmax - one
    hot, times the weight for the hidden states and times the hidden states for the weight), then frees the chunk:
    peak memory holds one chunk of logits instead of [supervised, vocab] logits, their softmax and their gradient.
    Backward only scales the stored gradients. Same maths as the plain loss (tested to 1e-5 in fp32).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
    ) -> torch.Tensor:
        grads = HeadGrads.zeros(ctx.needs_input_grad[:3], hidden, weight, bias)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start, rows, target in chunks_of_rows(hidden, targets, weight.shape[0]):
            logits = F.linear(rows, weight, bias).float()  # [chunk, vocab]
            target_logit = logits.gather(1, target[:, None]).squeeze(1)
            grad_logits, log_norm = softmax_in_place(logits, normalise=grads.needed)
            total += (log_norm - target_logit).sum()
            if not grads.needed:
                continue
            grad_logits[torch.arange(len(target), device=target.device), target] -= 1.0
            grads.add(start, rows, grad_logits, weight)
        ctx.grads = grads  # not inputs or outputs of this function: kept on ctx, given up in backward
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        # Scaled in place and handed over: the stored sums are the gradients' only copy (a [vocab, hidden] weight
        # gradient is the largest tensor of a small model's step), and autograd takes them as they are.
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("LinearCrossEntropy's gradients were already used: its backward runs once per forward")
        scale = grad_output.float()
        return (
            None if grads.hidden is None else grads.hidden.mul_(scale.to(grads.hidden.dtype)),
            None if grads.weight is None else grads.weight.mul_(scale).to(ctx.weight_dtype),
            None if grads.bias is None else grads.bias.mul_(scale).to(ctx.weight_dtype),
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """Summed cross-entropy of the head's logits over `hidden` rows, without holding all the logits at once."""
    if hidden.shape[0] == 0:
        return (hidden.sum() * 0.0).float() + (weight.sum() * 0.0).float()  # no supervised rows: a zero in the graph
    if not torch.is_grad_enabled():  # evaluation: no gradients to take ahead (needs_input_grad ignores no_grad)
        hidden, weight = hidden.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
    return LinearCrossEntropy.apply(hidden, weight, bias, targets)  # type: ignore[no-any-return]


class LinearLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[target] per row, with the logits computed a chunk of rows at a time.

    The per-row values (DPO's sequence log-probs) get a different gradient weight per row, unknown in forward, so
    unlike LinearCrossEntropy the gradients cannot be taken ahead: backward computes each chunk's logits again (one
    more head product) rather than keeping [rows, vocab] logits and their softmax for the whole batch.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
    ) -> torch.Tensor:
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start, rows, target in chunks_of_rows(hidden, targets, weight.shape[0]):
            logits = F.linear(rows, weight, bias).float()
            target_logit = logits.gather(1, target[:, None]).squeeze(1)
            out[start : start + len(rows)] = target_logit - softmax_in_place(logits, normalise=False)[1]
        ctx.save_for_backward(hidden, weight, bias, targets)
        device = hidden.device.type  # backward recomputes the logits under the same autocast as forward
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        hidden, weight, bias, targets = ctx.saved_tensors
        grads = HeadGrads.zeros(ctx.needs_input_grad[:3], hidden, weight, bias)
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            for start, rows, target in chunks_of_rows(hidden, targets, weight.shape[0]):
                scale = grad_output[start : start + len(rows)].float()
                logits = F.linear(rows, weight, bias).float()
                grad_logits = softmax_in_place(logits)[0].mul_(-scale[:, None])  # d logp / d logits = onehot - p
                grad_logits[torch.arange(len(target), device=target.device), target] += scale
                grads.add(start, rows, grad_logits, weight)
        return (
            grads.hidden,
            None if grads.weight is None else grads.weight.to(weight.dtype),
            None if grads.bias is None else grads.bias.to(weight.dtype),
            None,
        )


def softmax_in_place(logits: torch.Tensor, normalise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax, log-sum-exp) of each row of fp32 `logits`, the softmax written over them: one exp pass and no
    second [chunk, vocab] buffer (torch.logsumexp and torch.softmax would each make one and exponentiate again).
    normalise=False skips the division where only the log-sum-exp is wanted (the first value is then exp(x - max))."""
    row_max = logits.amax(dim=-1, keepdim=True)
    exps = logits.sub_(row_max).exp_()
    sums = exps.sum(dim=-1, keepdim=True)
    return exps.div_(sums) if normalise else exps, (sums.log() + row_max).squeeze(1)


def chunks_of_rows(
    hidden: torch.Tensor, targets: torch.Tensor, vocab: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(first row, rows, their targets) in chunks whose logits hold at most CHUNK_LOGITS values."""
    chunk = max(1, CHUNK_LOGITS // vocab)
    for start in range(0, hidden.shape[0], chunk):
        yield start, hidden[start : start + chunk], targets[start : start + chunk]


def linear_log_probs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """Each row's log-probability of its target under the head's logits, without holding all the logits at once."""
    return LinearLogProbs.apply(hidden, weight, bias, targets)  # type: ignore[no-any-return]


def logit_transform(model: Any) -> str:
    """The config setting that transforms logits after the head ('' when none): those models need the full forward."""
    config = getattr(model, "config", None)
    for name in LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 0, 1, 1.0, False):
            return f"{name}={value}"
    return ""


def split_body_and_head(model: Any) -> tuple[Any, Any]:
    """The decoder (`model.<base_model_prefix>`) and the output layer of a *ForCausalLM; a clear error otherwise."""
    prefix = getattr(model, "base_model_prefix", None)
    body = getattr(model, prefix, None) if prefix else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or head is None or body is model:
        raise LossSplitError(
            f"{type(model).__name__} does not split into a decoder body (base_model_prefix={prefix!r}) and an output "
            "layer (get_output_embeddings), which the token loss needs to run the LM head on supervised positions "
            "only. Use a transformers *ForCausalLM model"
        )
    return body, head


@torch.no_grad()
def verify_split(model: Any, body: Any, head: Any, length: int = 8) -> None:
    """head(body(x)) must equal the model's own logits on a short input, or the loss would train the wrong thing."""
    was_training = model.training
    model.eval()
    vocab = head.weight.shape[0]
    device = head.weight.device
    input_ids = (torch.arange(length, device=device) * 7 + 3).remainder(vocab).unsqueeze(0)  # [1, length]
    mask = torch.ones_like(input_ids)
    expected = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()
    got = head(body(input_ids=input_ids, attention_mask=mask, use_cache=False)[0]).float()
    model.train(was_training)
    error = float((got - expected).abs().max()) / max(1e-6, float(expected.abs().max()))
    if error > SPLIT_CHECK_TOLERANCE:
        raise LossSplitError(
            f"{type(model).__name__}: head(body(x)) differs from the model's logits (relative error {error:.2e}); it "
            "transforms logits in a way the config does not name. The selected-positions loss would be wrong: "
            "report the model type so its transform can be named in training/loss.py LOGIT_TRANSFORMS"
        )


def token_loss_sum(model: Any, batch: Batch) -> torch.Tensor:
    """One batch's summed token loss, resolving the split on the spot (tests, one-off use; loops keep a TokenLoss)."""
    return TokenLoss.for_model(model, verify=False)(batch)


@torch.no_grad()
def mean_token_loss(
    loss: TokenLoss | LossModule,
    examples: list[Example],
    micro_batch_size: int,
    pad_id: int,
    device: torch.device,
    autocast: Any,
    padding_free: bool = True,
    info: Distributed = SINGLE,
) -> float:
    """Cross-entropy per supervised token over all `examples` (validation loss): token-weighted, not a mean of
    batch means, batched as training batches. Leaves the model in the mode it was in.

    On several processes the micro-batches are dealt round-robin to the ranks and the sums all-reduced; a rank
    with fewer batches runs placeholders (FSDP2 needs every rank in every forward)."""
    was_training = loss.model.training
    loss.model.eval()
    total, tokens = 0.0, 0
    for part in rank_chunks(len(examples), micro_batch_size, info):
        chunk = examples[part] if part is not None else [placeholder(examples[0])]
        batch = make_batch(chunk, pad_id, padding_free).to(device)
        with autocast:
            total += loss(batch).item()
        tokens += batch.num_supervised
    loss.model.train(was_training)
    total, all_tokens = info.all_sum(total, tokens)
    return total / max(1.0, all_tokens)
