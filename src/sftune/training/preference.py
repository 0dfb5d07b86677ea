"""Preference losses (DPO, IPO, SimPO, ORPO) on pairs whose chosen and rejected branches share one forward pass.

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
    sums, counts, _, _ = branch_logps(loss, batch)
    return sums, counts


def branch_logps(
    loss: TokenLoss, batch: Batch, whole_examples: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per example of a padding-free row, the sum and count of its response-token log-probs; and, from the same
    forward, for the first `whole_examples` examples the sum and count over every token after their first, prompt
    included (ORPO's NLL on the chosen answers, as TRL computes it)."""
    assert batch.cu_seq_lens is not None, "preference batches are padding-free rows"
    labels = batch.labels[0, 1:]  # [seq-1]
    response = labels != IGNORE_INDEX
    bounds = batch.cu_seq_lens.to(labels.device)
    positions = torch.arange(1, len(labels) + 1, device=labels.device)  # the label position of each target
    whole = (positions < bounds[whole_examples]) & ~torch.isin(positions, bounds[:whole_examples])
    keep = response | whole
    targets = torch.where(response, labels, batch.input_ids[0, 1:])[keep]  # a label is its input id or ignored
    token_logps = kept_logps(loss, batch, keep, targets)  # [kept]
    # Target position t belongs to the example whose [start, end) holds t + 1.
    owner = torch.bucketize(positions[keep], bounds[1:], right=True)
    examples = len(bounds) - 1

    def per_example(selected: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        values, owners = token_logps[selected], owner[selected]
        sums = torch.zeros(size, device=token_logps.device).index_add(0, owners, values)
        return sums, torch.zeros(size, device=token_logps.device).index_add(0, owners, torch.ones_like(values))

    return *per_example(response[keep], examples), *per_example(whole[keep], whole_examples)


def kept_logps(loss: TokenLoss, batch: Batch, keep: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probs of `targets` at the kept positions of a padding-free row, a chunk of logits at a time where the
    head allows it (as the SFT loss)."""
    if loss.body is None:
        logits = loss.model(**batch.model_inputs(), use_cache=False).logits[0, :-1][keep]
        return -F.cross_entropy(logits.float(), targets, reduction="none")  # [kept]
    hidden = loss.body(**batch.model_inputs(), use_cache=False)[0][0, :-1][keep]  # [kept, hidden]
    if isinstance(loss.head, torch.nn.Linear):
        return linear_log_probs(hidden, loss.head.weight, loss.head.bias, targets)
    return -F.cross_entropy(loss.head(hidden).float(), targets, reduction="none")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (as TRL's ORPO)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_loss(
    average: torch.Tensor, chosen_nll: torch.Tensor, cfg: DPOConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO per pair from [2n] average response log-probs (chosen then rejected) and the micro-batch's chosen NLL:
    nll - beta * log sigmoid(log odds(chosen) - log odds(rejected)), the odds of an answer p / (1 - p) with p its
    average token probability (TRL's ORPOTrainer, beta its lambda)."""
    n = average.shape[0] // 2
    chosen, rejected = average[:n].float(), average[n:].float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    metrics = {
        "log_odds_ratio": ratio.detach(),
        "log_odds_chosen": log_odds.detach(),
        "nll_loss": chosen_nll.detach().expand(n),
    }
    return chosen_nll - cfg.beta * ratio, metrics


def preference_loss(
    policy: torch.Tensor,
    reference: torch.Tensor | None,
    counts: torch.Tensor,
    cfg: DPOConfig,
    chosen_nll: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses and metrics from [2n] policy/reference log-probs (chosen then rejected); ORPO also takes the
    micro-batch's chosen NLL (a scalar) and needs no reference."""
    n = policy.shape[0] // 2
    chosen, rejected = policy[:n], policy[n:]
    extra: dict[str, torch.Tensor] = {}
    if cfg.loss == "orpo":  # reference-free, on average log-probs
        assert chosen_nll is not None, "ORPO needs the chosen answers' NLL"
        average = torch.where(counts > 0, policy / counts.clamp(min=1), -1.0)  # a placeholder's: finite odds
        losses, extra = odds_ratio_loss(average, chosen_nll, cfg)
        chosen_rewards, rejected_rewards = cfg.beta * average[:n].detach(), cfg.beta * average[n:].detach()
    elif cfg.loss == "simpo":  # reference-free, length-normalised
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
        **extra,
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
        weights = pair_batch.weights
        if self.cfg.loss == "orpo":
            policy, counts, chosen_nll = orpo_logps(self.loss, pair_batch.batch, weights, self.cfg.orpo_nll)
            losses, metrics = preference_loss(policy, None, counts, self.cfg, chosen_nll)
        else:
            policy, counts = sequence_logps(self.loss, pair_batch.batch)
            reference = pair_batch.reference
            if reference is None and not self.cfg.is_reference_free:
                reference = self.reference_logps(pair_batch.batch)
            reference = None if reference is None else reference.to(policy.device)
            losses, metrics = preference_loss(policy, reference, counts, self.cfg)
        weights = None if weights is None else weights.to(policy.device)
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


def orpo_logps(
    loss: TokenLoss, batch: Batch, weights: torch.Tensor | None, nll: str = "response"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Response log-prob sums and counts of every branch, and the chosen answers' NLL, a token mean over the
    micro-batch's chosen answers (placeholders left out): over their response tokens (nll="response", the default:
    the prompt is never trained), or over every token after the first, prompt included, as TRL's ORPOTrainer
    (nll="full_sequence"); one forward for all of it."""
    assert batch.cu_seq_lens is not None, "preference batches are padding-free rows"
    pairs = (len(batch.cu_seq_lens) - 1) // 2
    if nll == "response":
        sums, counts = sequence_logps(loss, batch)
        chosen_sums, chosen_tokens = sums[:pairs], counts[:pairs]
    else:
        sums, counts, chosen_sums, chosen_tokens = branch_logps(loss, batch, whole_examples=pairs)
    if weights is not None:
        weights = weights.to(chosen_sums.device)
        chosen_sums, chosen_tokens = chosen_sums * weights, chosen_tokens * weights
    return sums, counts, -chosen_sums.sum() / chosen_tokens.sum().clamp(min=1)


def frozen_copy(model: Any) -> TokenLoss:
    """A frozen copy of the model as it starts, as the reference (dpo.reference=copy): exact, but it holds the
    weights twice; the adapter switched off or precomputed log-probs give the same reference without it."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return TokenLoss.for_model(reference)


def pair_count(pair_batch: PairBatch) -> int:
    return pair_batch.num_pairs
