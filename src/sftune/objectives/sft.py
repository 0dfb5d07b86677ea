"""Supervised fine-tuning as an objective of the loop: cross-entropy on the supervised tokens of each example,
divided by the supervised tokens of the whole window; validation loss and sample replies to fixed prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sftune.data.batching import Batch, make_batch
from sftune.data.dataset import PreparedData
from sftune.training.checkpoint import TrainerState
from sftune.training.distributed import Distributed, LossModule, rank_examples, unwrap
from sftune.training.evaluation import evaluate_and_log, log_samples
from sftune.training.loop import Run
from sftune.training.loss import TokenLoss


@dataclass
class SupervisedObjective:
    model: Any
    data: PreparedData
    tokenizer: Any
    loss: TokenLoss

    @classmethod
    def for_model(cls, model: Any, data: PreparedData, tokenizer: Any) -> SupervisedObjective:
        loss = TokenLoss.for_model(model)
        print(f"loss: {loss.path}")
        return cls(model, data, tokenizer, loss)

    @property
    def items(self) -> list[Any]:
        return self.data.train

    def loss_module(self) -> LossModule:
        return LossModule(self.loss, self.model)

    def window_batches(self, window: list[list[int]], run: Run) -> list[Batch]:
        examples = rank_examples(window, self.data.train, lambda e: len(e.input_ids), run.info)
        padding_free = run.config.train.padding_free
        return [make_batch(chunk, self.tokenizer.pad_token_id, padding_free).to(run.device) for chunk in examples]

    def count(self, batch: Batch) -> int:
        return batch.num_supervised

    def window_tokens(self, window: list[list[int]]) -> int:
        return sum(len(self.data.train[i].input_ids) for indices in window for i in indices)

    def sources(self, window: list[list[int]]) -> list[str]:
        return [self.data.train[i].source for indices in window for i in indices]

    def step_metrics(self, info: Distributed) -> dict[str, float]:
        return {}

    def has_validation(self) -> bool:
        return bool(self.data.validation)

    def validate(self, wrapped: torch.nn.Module, run: Run, state: TrainerState) -> dict[str, float]:
        """Validation loss (computed exactly as the training loss), and the sample replies to watch."""
        cfg = run.config.train
        pad_id = self.tokenizer.pad_token_id
        loss = evaluate_and_log(
            unwrap(wrapped), self.data.validation, cfg, pad_id, run.device, run.autocast(), run.log, state, run.info
        )
        if run.info.strategy != "fsdp2" and run.info.is_main:  # FSDP2: every rank would generate in lockstep
            max_tokens = run.config.eval.sample_max_new_tokens
            log_samples(
                self.model,
                self.tokenizer,
                self.data.validation_prompts,
                self.end_token_ids(),
                max_tokens,
                state,
                run.run_dir,
            )
        return {"val_loss": loss}

    def end_token_ids(self) -> list[int]:
        return self.data.end_token_ids()

    def counts(self) -> dict[str, Any]:
        return self.data.counts()

    def write_outputs(self, run: Run) -> None:
        return None
