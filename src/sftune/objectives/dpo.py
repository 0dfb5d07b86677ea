"""Preference optimisation (DPO, IPO, SimPO, ORPO) as an objective of the loop: a micro-batch of pairs is one
padding-free row (chosen, then rejected), its loss is summed per pair and divided by the pairs of the whole window;
the reference is the adapter switched off, log-probs precomputed once (training/reference.py), or a frozen copy (none
for SimPO and ORPO); validation is the preference loss and reward accuracy on held-out pairs.

Under torchrun each window's pairs split over the ranks (a rank short of pairs runs a placeholder pair that counts
for nothing) and the per-step metrics are summed over the ranks, as on one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sftune.config import Config
from sftune.eval.report import plot_preference_curves
from sftune.model.start import StartingPoint
from sftune.training.checkpoint import TrainerState
from sftune.training.data import PairData
from sftune.training.distributed import SINGLE, Distributed, DistributedError, LossModule, rank_examples, unwrap
from sftune.training.evaluation import evaluate_pairs
from sftune.training.loop import Run
from sftune.training.loss import TokenLoss
from sftune.training.preference import (
    PairBatch,
    PreferenceLoss,
    ReferencedPair,
    frozen_copy,
    make_referenced_batch,
    pair_length,
    referenced_length,
    referenced_placeholder,
    with_reference,
)
from sftune.training.reference import cached_reference
from sftune.training.run import RunError
from sftune.training.settings import dpo_reference


@dataclass
class PreferenceObjective:
    model: Any
    pairs: PairData
    loss: PreferenceLoss
    train_items: list[ReferencedPair]
    validation_items: list[ReferencedPair]

    @classmethod
    def setup(
        cls, model: Any, pairs: PairData, run: Run, start: StartingPoint, start_config: Config
    ) -> PreferenceObjective:
        """The loss and its reference: before the checkpoint is restored, so a precomputed reference is the model as
        it starts, also on resume."""
        token_loss = TokenLoss.for_model(model)
        mode = reference_mode(run.config, start, run.info)
        reference = {}
        if mode == "precomputed":
            reference = {
                name: cached_reference(
                    start_config, start, token_loss, items, run.device, run.autocast(), name, run.info
                )
                for name, items in (("train", pairs.train), ("validation", pairs.validation))
                if items
            }
        copy = frozen_copy(model) if mode == "copy" else None
        loss = PreferenceLoss(token_loss, run.config.dpo, mode == "adapter_off", copy)
        train_items = with_reference(pairs.train, reference.get("train"))
        return cls(model, pairs, loss, train_items, with_reference(pairs.validation, reference.get("validation")))

    @property
    def items(self) -> list[Any]:
        return self.train_items

    def loss_module(self) -> LossModule:
        return LossModule(self.loss, self.model)  # the adapter-off reference runs inside the wrapper too

    def window_batches(self, window: list[list[int]], run: Run) -> list[PairBatch]:
        shares = rank_examples(window, self.train_items, referenced_length, run.info, referenced_placeholder)
        return [make_referenced_batch(share).to(run.device) for share in shares]

    def count(self, batch: PairBatch) -> int:
        return batch.num_pairs

    def window_tokens(self, window: list[list[int]]) -> int:
        return sum(pair_length(self.pairs.train[i]) for indices in window for i in indices)

    def sources(self, window: list[list[int]]) -> list[str]:
        return [self.pairs.train[i].source for indices in window for i in indices]

    def step_metrics(self, info: Distributed) -> dict[str, float]:
        return self.loss.window_metrics(info)

    def has_validation(self) -> bool:
        return bool(self.validation_items)

    def validate(self, wrapped: torch.nn.Module, run: Run, state: TrainerState) -> dict[str, float]:
        return evaluate_pairs(
            unwrap(wrapped),
            self.loss,
            self.validation_items,
            run.config.train.micro_batch_size,
            run.device,
            run.autocast(),
            run.log,
            state.global_step,
            run.info,
        )

    def end_token_ids(self) -> list[int]:
        return self.pairs.end_token_ids()

    def counts(self) -> dict[str, Any]:
        return self.pairs.counts

    def write_outputs(self, run: Run) -> None:
        plot_preference_curves(run.log.read(), run.run_dir / "preference.png")


def reference_mode(config: Config, start: StartingPoint, info: Distributed = SINGLE) -> str:
    """Where reference log-probs come from: none (SimPO, ORPO), the adapter switched off, one pass before training, or a
    frozen copy. The reference is the model as it starts: a continued SFT adapter is part of it, so switching the
    adapter off would compare against the model before SFT. FSDP2 refuses the copy: a whole unsharded model on
    every rank (DDP holds a full replica per rank anyway, so there the copy is what one process would hold)."""
    if config.dpo.is_reference_free:
        return "none"
    if config.dpo.reference == "copy" and info.strategy == "fsdp2":
        raise DistributedError(
            "dpo.reference=copy with train.strategy=fsdp2: the frozen copy would be a whole, unsharded model on "
            f"each of the {info.world_size} processes, which is what sharding avoids. Use dpo.reference=precomputed "
            "(the same reference, computed once before training; or auto), or train.strategy=ddp"
        )
    lora = config.train.method in ("lora", "qlora")
    if config.dpo.reference == "auto":  # resolved by the run's settings; here for a config used on its own
        return dpo_reference(config, start.adapter_dir is not None)[0]
    if config.dpo.reference == "adapter_off" and (not lora or start.adapter_dir is not None):
        why = (
            "full fine-tuning has no adapter" if not lora else "with dpo.adapter=continue that is the model before SFT"
        )
        raise RunError(
            f"dpo.reference=adapter_off cannot give the reference here ({why}): use "
            "dpo.reference=precomputed (or auto, or copy)"
        )
    return config.dpo.reference
