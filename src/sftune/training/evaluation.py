"""Evaluation during training: validation loss and perplexity, greedy replies to fixed validation prompts, and the
preference loss and reward accuracy on held-out pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sftune.config import TrainConfig
from sftune.data.types import Example, Prompt
from sftune.infer.generate import generate_replies
from sftune.training.checkpoint import TrainerState
from sftune.training.distributed import SINGLE, Distributed, LossModule, rank_chunks
from sftune.training.loss import TokenLoss, mean_token_loss
from sftune.training.metrics import MetricsLog, perplexity
from sftune.training.preference import PreferenceLoss, ReferencedPair, make_referenced_batch, referenced_placeholder


def evaluate_and_log(
    loss: TokenLoss | LossModule,
    examples: list[Example],
    train: TrainConfig,
    pad_id: int,
    device: torch.device,
    autocast: Any,
    log: MetricsLog,
    state: TrainerState,
    info: Distributed = SINGLE,
) -> float:
    """Validation loss per supervised token, computed exactly as the training loss; logged with its perplexity."""
    val_loss = mean_token_loss(
        loss, examples, train.micro_batch_size, pad_id, device, autocast, train.padding_free, info
    )
    log.write({"step": state.global_step, "val_loss": val_loss, "val_ppl": perplexity(val_loss)})
    print(f"step {state.global_step}: validation loss {val_loss:.4f}, perplexity {perplexity(val_loss):.2f}")
    return val_loss


def log_samples(
    model: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    stop_ids: list[int],
    max_new_tokens: int,
    state: TrainerState,
    run_dir: Path,
) -> None:
    """Greedy replies to the fixed validation prompts (eval.sample_prompts), appended to samples.jsonl."""
    if not prompts:
        return
    was_training = model.training
    model.eval()
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens, stop_ids=stop_ids)
    model.train(was_training)
    log = MetricsLog(run_dir / "samples.jsonl")
    for index, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
        record = {"step": state.global_step, "index": index, "prompt": prompt.messages[-1]["content"]}
        record["output"] = reply.text
        log.write({**record, "finished": reply.finished})


@torch.no_grad()
def evaluate_pairs(
    loss_module: LossModule,
    objective: PreferenceLoss,
    pairs: list[ReferencedPair],
    micro_batch_size: int,
    device: torch.device,
    autocast: Any,
    log: MetricsLog,
    step: int,
    info: Distributed = SINGLE,
) -> dict[str, float]:
    """Preference loss and reward accuracy on held-out pairs, logged as val_*. `loss_module` runs the objective
    (through FSDP2's hooks, which gather the weights); on several processes the micro-batches are dealt to the
    ranks, a rank with fewer runs placeholders, and the sums are all-reduced."""
    model = objective.loss.model
    was_training = model.training
    model.eval()
    objective.window_metrics()  # start from zero (this rank's sums only: no collective)
    total = 0.0
    for part in rank_chunks(len(pairs), micro_batch_size, info):
        chunk = pairs[part] if part is not None else [referenced_placeholder(pairs[0])]
        with autocast:
            total += float(loss_module(make_referenced_batch(chunk).to(device)))
    model.train(was_training)
    (total,) = info.all_sum(total)
    metrics = {"val_loss": total / len(pairs), **{f"val_{k}": v for k, v in objective.window_metrics(info).items()}}
    log.write({"step": step, **metrics})
    print(
        f"step {step}: validation loss {metrics['val_loss']:.4f}, reward accuracy {metrics['val_reward_accuracy']:.2%}"
    )
    return metrics
