"""Preference losses (DPO, IPO, SimPO) on pairs whose chosen and rejected branches share one forward pass.

A micro-batch of n pairs is one padding-free row: the n chosen examples, then the n rejected ones (each attending
only to itself). A sequence's log-probability is the sum of its response tokens' log-probabilities (the labels of
the SFT mask: the response and its end-of-turn token, never the prompt). The reference is the same model with the
adapter switched off (LoRA/QLoRA) or log-probabilities computed once before training; no second model copy unless
one is asked for (a frozen copy of the starting model).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from sftune.config import DPOConfig
from sftune.data.batching import Batch, collate_packed
from sftune.data.preference import PairExample
from sftune.data.types import IGNORE_INDEX
from sftune.training.distributed import SINGLE, Distributed, placeholder
from sftune.training.loss import TokenLoss, linear_log_probs


@dataclass
class PairBatch:
    batch: Batch  # one row: chosen examples, then rejected examples
    num_pairs: int  # the pairs that count (placeholders do not)
    sources: list[str]
    reference: torch.Tensor | None = None  # [2 * pairs]: reference log-probs, chosen then rejected
    weights: torch.Tensor | None = None  # [pairs]: 1.0 for a pair, 0.0 for a placeholder (None: all count)

    def to(self, device: torch.device) -> PairBatch:
        return replace(self, batch=self.batch.to(device))


def make_pair_batch(pairs: list[PairExample], reference: list[tuple[float, float]] | None = None) -> PairBatch:
    examples = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    ref = None
    if reference is not None:
        ref = torch.tensor([r[0] for r in reference] + [r[1] for r in reference], dtype=torch.float32)
    counted = [supervises_tokens(p) for p in pairs]
    weights = None if all(counted) else torch.tensor(counted, dtype=torch.float32)
    return PairBatch(collate_packed(examples), sum(counted), [p.source for p in pairs], ref, weights)


def supervises_tokens(pair: PairExample) -> bool:
    """A pair counts when its branches supervise tokens; one that supervises none (a placeholder) has no log-prob
    to compare and counts for nothing: not in the loss, the pair count or the metrics."""
    return any(label != IGNORE_INDEX for label in pair.chosen.labels + pair.rejected.labels)


def pair_placeholder(pair: PairExample) -> PairExample:
    """What a rank with no pair in a micro-batch runs (`rank_examples`): the pair with nothing supervised, so its
    forward and backward match the other ranks' collectives and add exactly zero."""
    return replace(pair, chosen=placeholder(pair.chosen), rejected=placeholder(pair.rejected),
                   source=f"{pair.source} (placeholder)")  # fmt: skip


# A pair and its precomputed reference log-probs (chosen, rejected); None where the reference is computed live.
ReferencedPair = tuple[PairExample, tuple[float, float] | None]


def with_reference(pairs: list[PairExample], reference: list[tuple[float, float]] | None) -> list[ReferencedPair]:
    if reference is None:
        return [(pair, None) for pair in pairs]
    return list(zip(pairs, reference, strict=True))


def referenced_placeholder(item: ReferencedPair) -> ReferencedPair:
    return pair_placeholder(item[0]), None if item[1] is None else (0.0, 0.0)


def make_referenced_batch(items: list[ReferencedPair]) -> PairBatch:
    references = [reference for _, reference in items if reference is not None]
    return make_pair_batch([pair for pair, _ in items], references if len(references) == len(items) else None)


def referenced_length(item: ReferencedPair) -> int:
    return pair_length(item[0])


def pair_length(pair: PairExample) -> int:
    """Tokens of both branches: what a rank's share of a micro-batch is balanced on."""
    return len(pair.chosen.input_ids) + len(pair.rejected.input_ids)


def sequence_logps(loss: TokenLoss, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response-token log-probs, number of response tokens) per example of a padding-free row."""
    assert batch.cu_seq_lens is not None, "preference batches are padding-free rows"
    targets = batch.labels[0, 1:]  # [seq-1]
    keep = targets != IGNORE_INDEX
    if loss.body is None:
        logits = loss.model(**batch.model_inputs(), use_cache=False).logits[0, :-1][keep]
        token_logps = -F.cross_entropy(logits.float(), targets[keep], reduction="none")  # [supervised]
    else:
        hidden = loss.body(**batch.model_inputs(), use_cache=False)[0][0, :-1][keep]  # [supervised, hidden]
        if isinstance(loss.head, torch.nn.Linear):  # a chunk of logits at a time, as the SFT loss
            token_logps = linear_log_probs(hidden, loss.head.weight, loss.head.bias, targets[keep])
        else:
            token_logps = -F.cross_entropy(loss.head(hidden).float(), targets[keep], reduction="none")
    # Target position t belongs to the example whose [start, end) holds t + 1.
    positions = torch.nonzero(keep).squeeze(1) + 1
    owner = torch.bucketize(positions, batch.cu_seq_lens[1:].to(positions.device), right=True)
    examples = len(batch.cu_seq_lens) - 1
    sums = torch.zeros(examples, device=token_logps.device).index_add(0, owner, token_logps)
    counts = torch.zeros(examples, device=token_logps.device).index_add(0, owner, torch.ones_like(token_logps))
    return sums, counts


def preference_loss(
    policy: torch.Tensor, reference: torch.Tensor | None, counts: torch.Tensor, cfg: DPOConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses and metrics from [2n] policy/reference log-probs (chosen then rejected)."""
    n = policy.shape[0] // 2
    chosen, rejected = policy[:n], policy[n:]
    if cfg.loss == "simpo":  # reference-free, length-normalised
        average = policy / counts.clamp(min=1)
        logits = cfg.beta * (average[:n] - average[n:]) - cfg.simpo_gamma
        losses = -F.logsigmoid(logits)
        chosen_rewards, rejected_rewards = cfg.beta * average[:n].detach(), cfg.beta * average[n:].detach()
    else:
        assert reference is not None, "DPO and IPO need reference log-probs"
        ref_chosen, ref_rejected = reference[:n], reference[n:]
        if cfg.loss == "ipo":  # on length-averaged log-probs, as in the IPO paper and TRL
            ratio = (chosen - ref_chosen) / counts[:n].clamp(min=1) - (rejected - ref_rejected) / counts[n:].clamp(
                min=1
            )
            losses = (ratio - 1 / (2 * cfg.beta)) ** 2
        else:
            logits = cfg.beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
            smoothing = cfg.label_smoothing
            losses = -F.logsigmoid(logits) * (1 - smoothing) - F.logsigmoid(-logits) * smoothing
        chosen_rewards = cfg.beta * (chosen - ref_chosen).detach()
        rejected_rewards = cfg.beta * (rejected - ref_rejected).detach()
    metrics = {
        "rewards_chosen": chosen_rewards,
        "rewards_rejected": rejected_rewards,
        "reward_accuracy": (chosen_rewards > rejected_rewards).float(),
        "reward_margin": chosen_rewards - rejected_rewards,
        "logps_chosen": chosen.detach(),
        "logps_rejected": rejected.detach(),
    }
    return losses, metrics


@dataclass
class PreferenceLoss:
    """Summed per-pair loss of a PairBatch (backward_window divides by the window's pairs); metrics accumulate."""

    loss: TokenLoss
    cfg: DPOConfig
    adapter_reference: bool
    reference_copy: TokenLoss | None = None  # a frozen copy of the starting model (dpo.reference=copy)
    totals: dict[str, float] = field(default_factory=dict)
    pairs: int = 0

    def __call__(self, pair_batch: PairBatch) -> torch.Tensor:
        policy, counts = sequence_logps(self.loss, pair_batch.batch)
        reference = pair_batch.reference
        if reference is None and self.cfg.loss != "simpo":
            reference = self.reference_logps(pair_batch.batch)
        reference = None if reference is None else reference.to(policy.device)
        losses, metrics = preference_loss(policy, reference, counts, self.cfg)
        weights = None if pair_batch.weights is None else pair_batch.weights.to(policy.device)
        for name, values in metrics.items():
            values = values if weights is None else values * weights
            self.totals[name] = self.totals.get(name, 0.0) + float(values.sum())
        self.pairs += pair_batch.num_pairs
        return losses.sum() if weights is None else (losses * weights).sum()  # a placeholder: a zero in the graph

    @torch.no_grad()
    def reference_logps(self, batch: Batch) -> torch.Tensor:
        """The frozen copy where there is one; else the same model with its adapter switched off (no second copy)."""
        if self.reference_copy is not None:
            return sequence_logps(self.reference_copy, batch)[0]
        if not self.adapter_reference:
            raise ValueError("no reference log-probs for this batch: precompute them (dpo.reference=precomputed)")
        with self.loss.model.disable_adapter():
            return sequence_logps(self.loss, batch)[0]

    def window_metrics(self, info: Distributed = SINGLE) -> dict[str, float]:
        """Means over the pairs since the last call; on several processes over every rank's pairs (the sums and
        the count all-reduced: every rank calls this at the same point)."""
        *totals, pairs = info.all_sum(*self.totals.values(), self.pairs)
        means = {name: total / max(1, pairs) for name, total in zip(self.totals, totals, strict=True)}
        self.totals, self.pairs = {}, 0
        return means


def frozen_copy(model: Any) -> TokenLoss:
    """A frozen copy of the model as it starts, as the reference (dpo.reference=copy): exact, but it holds the
    weights twice; the adapter switched off or precomputed log-probs give the same reference without it."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return TokenLoss.for_model(reference)


def pair_count(pair_batch: PairBatch) -> int:
    return pair_batch.num_pairs
