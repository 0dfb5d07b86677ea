"""Preference optimisation (DPO, IPO, SimPO) after SFT, top to bottom: setup -> loop -> save.

`train_dpo(config)` is what `sftune dpo` and `sftune.train_dpo` call. It shares the SFT recipe's parts: the config
schema, run folder, model preparation (full, LoRA, QLoRA), checkpoints and exact resume, signals, health checks,
outputs and manifest. What differs is the data (pairs), the loss and the reference.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from sftune.config import Config
from sftune.data.batching import accumulation_windows, window_micro_batches
from sftune.data.formats import split_validation
from sftune.data.preference import PairExample, build_pairs, read_pairs
from sftune.model.load import default_cache_dir, resolve_model_path
from sftune.model.setup import setup_model, setup_tokenizer
from sftune.training.checkpoint import save_checkpoint
from sftune.training.data import write_rejections
from sftune.training.loss import TokenLoss
from sftune.training.metrics import MetricsLog, Throughput, log_step, progress_bar
from sftune.training.optim import build_optimizer, build_scheduler
from sftune.training.outputs import save_outputs
from sftune.training.preference import PreferenceLoss, make_pair_batch, pair_count, precompute_reference
from sftune.training.run import (
    RunError,
    StopRequest,
    TrainResult,
    advance,
    autocast_context,
    count_total_steps,
    restore_state,
    resume_fingerprint,
    seed_everything,
    setup_device,
    setup_run_dir,
)
from sftune.training.step import backward_window, optimizer_step

__all__ = ["train_dpo"]


def train_dpo(config: Config, resume: str | None = None, resume_changed: bool = False) -> TrainResult:
    # ------------------------------------------------------------------------------------------- setup
    run_dir = setup_run_dir(config, resume)
    seed_everything(config.train.seed)
    device, precision = setup_device(config)
    tokenizer, template = setup_tokenizer(config)
    train_pairs, val_pairs, counts = setup_pairs(config, tokenizer, template, run_dir)
    model = setup_model(config, tokenizer, device, precision)
    loss_sum = TokenLoss.for_model(model)
    autocast = autocast_context(device, precision)
    adapter_reference = reference_mode(config) == "adapter_off"
    reference = {}
    if reference_mode(config) == "precomputed":
        reference = {name: cached_reference(config, loss_sum, pairs, device, autocast, name)
                     for name, pairs in (("train", train_pairs), ("validation", val_pairs)) if pairs}  # fmt: skip
    objective = PreferenceLoss(loss_sum, config.dpo, adapter_reference)
    optimizer = build_optimizer(list(model.named_parameters()), config.train)
    total_steps = count_total_steps(config, len(train_pairs))
    scheduler = build_scheduler(optimizer, config.train, total_steps)
    state = restore_state(resume, run_dir, model, optimizer, scheduler, config, resume_changed)
    saved_config = resume_fingerprint(config)

    cfg, log = config.train, MetricsLog(run_dir / "metrics.jsonl")
    steps_per_epoch = accumulation_windows(len(train_pairs), cfg.micro_batch_size, cfg.gradient_accumulation_steps)
    throughput, bar = Throughput(), progress_bar(total_steps, state.global_step, cfg.progress)
    last_loss, val_metrics, skipped = None, {}, 0

    def pair_batches(pairs: list[PairExample], indices: list[list[int]], refs: list[Any] | None) -> list[Any]:
        chosen = [[pairs[i] for i in idx] for idx in indices]
        return [
            batch_to(make_pair_batch(group, [refs[i] for i in idx] if refs else None), device)
            for group, idx in zip(chosen, indices, strict=True)
        ]

    # -------------------------------------------------------------------------------------------- loop
    model.train()
    with StopRequest() as stop:
        while state.global_step < total_steps:
            indices = window_micro_batches(
                len(train_pairs), cfg.seed, state.epoch, state.window, cfg.micro_batch_size,
                cfg.gradient_accumulation_steps, config.data.shuffle,
            )  # fmt: skip
            batches = pair_batches(train_pairs, indices, reference.get("train"))
            step_loss = backward_window(batches, objective, autocast, count=pair_count)
            tokens = sum(b.batch.num_tokens for b in batches)
            throughput.add(tokens)
            sources = [source for b in batches for source in b.sources]
            grad_norm, lr, updated = optimizer_step(
                model, optimizer, scheduler, cfg, step_loss, state.global_step + 1, sources
            )
            skipped += not updated
            state = advance(state, steps_per_epoch, tokens)
            last_loss = step_loss
            values = {"loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": throughput.rate()}
            values |= objective.window_metrics() | ({"skipped_steps": skipped} if skipped else {})
            log_step(log, bar, state.global_step, state.epoch, state.tokens_seen, values)
            bar.update(1)
            if val_pairs and cfg.eval_every and state.global_step % cfg.eval_every == 0:
                val_metrics = evaluate_pairs(objective, val_pairs, reference.get("validation"), cfg.micro_batch_size,
                                             device, autocast, log, state.global_step)  # fmt: skip
            if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0:
                save_checkpoint(run_dir / "checkpoints", model, optimizer, scheduler, state, cfg.keep_checkpoints,
                                saved_config)  # fmt: skip
            if stop.requested:
                bar.close()
                checkpoint = save_checkpoint(run_dir / "checkpoints", model, optimizer, scheduler, state,
                                             cfg.keep_checkpoints, saved_config)  # fmt: skip
                raise stop.stop(checkpoint, state.global_step)
    bar.close()
    if val_pairs and (not cfg.eval_every or state.global_step % cfg.eval_every != 0):
        val_metrics = evaluate_pairs(objective, val_pairs, reference.get("validation"), cfg.micro_batch_size,
                                     device, autocast, log, state.global_step)  # fmt: skip

    # -------------------------------------------------------------------------------------------- save
    end_ids = sorted({i for p in train_pairs for i in p.chosen.end_token_ids})
    model_dir = save_outputs(config, run_dir, model, tokenizer, template, end_ids, counts, state, device, precision)
    return TrainResult(run_dir, model_dir, state.global_step, last_loss, val_metrics.get("val_loss"), counts)


# ----------------------------------------------------------------------------------------------- setup


def setup_pairs(
    config: Config, tokenizer: Any, template: Any, run_dir: Path
) -> tuple[list[PairExample], list[PairExample], dict[str, Any]]:
    """Read and build the pairs once; every dropped pair is written to rejected.jsonl with its reason."""
    data = config.data
    pairs, rejected = read_pairs(data.train, data.system_prompt)
    if data.max_rows:
        pairs = pairs[: data.max_rows]
    if data.validation:
        validation, val_rejected = read_pairs(data.validation, data.system_prompt)
        rejected += val_rejected
    else:
        pairs, validation = split_validation(pairs, data.validation_fraction, config.train.seed)
    train_examples, train_dropped = build_pairs(pairs, tokenizer, template, data.max_length, data.truncation)
    val_examples, val_dropped = build_pairs(validation, tokenizer, template, data.max_length, data.truncation)
    rejections = [*rejected, *train_dropped, *val_dropped]
    write_rejections(run_dir / "rejected.jsonl", rejections)
    reasons: dict[str, int] = {}
    for r in rejections:
        reasons[r.reason] = reasons.get(r.reason, 0) + 1
    counts = {
        "pairs_in": len(pairs) + len(validation) + len(rejected),
        "pairs_trained": len(train_examples),
        "pairs_validation": len(val_examples),
        "pairs_rejected": len(rejections),
        "rejected_by_reason": reasons,
    }
    (run_dir / "data_summary.json").write_text(json.dumps(counts, indent=2))
    print(
        f"data: {counts['pairs_in']} pairs in = {len(train_examples)} train + {len(val_examples)} validation + "
        f"{len(rejections)} rejected ({', '.join(f'{k}: {v}' for k, v in reasons.items()) or 'none'})"
    )
    if not train_examples:
        raise RunError(f"no preference pairs left to train on: {reasons}; see rejected.jsonl in the run folder")
    return train_examples, val_examples, counts


def reference_mode(config: Config) -> str:
    """Where reference log-probs come from: none (SimPO), the adapter switched off, or one pass before training."""
    if config.dpo.loss == "simpo":
        return "none"
    if config.dpo.reference == "auto":
        return "adapter_off" if config.train.method in ("lora", "qlora") else "precomputed"
    return config.dpo.reference


def cached_reference(
    config: Config, loss: TokenLoss, pairs: list[PairExample], device: torch.device, autocast: Any, name: str
) -> list[tuple[float, float]]:
    """Reference log-probs computed once and cached on disk, keyed by the model, the pairs' tokens and the
    precision: a second run or a resume reads them instead of recomputing."""
    path = reference_cache_path(config, pairs, name)
    if path.is_file():
        print(f"reference log-probs ({name}): cached, {path}")
        return [tuple(pair) for pair in json.loads(path.read_text())]  # type: ignore[misc]
    print(f"reference log-probs ({name}): computing for {len(pairs)} pairs, once")
    values = precompute_reference(loss, pairs, config.train.micro_batch_size, device, autocast)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values))
    tmp.replace(path)
    return values


def reference_cache_path(config: Config, pairs: list[PairExample], name: str) -> Path:
    digest = hashlib.sha256()
    model_path = Path(resolve_model_path(config.model.name_or_path))
    for weights in sorted(model_path.glob("*.safetensors")) if model_path.is_dir() else []:
        digest.update(f"{weights.name}:{weights.stat().st_size}:{weights.stat().st_mtime_ns}".encode())
    digest.update(str(model_path).encode() + config.train.precision.encode())
    for pair in pairs:
        digest.update(repr((pair.chosen.input_ids, pair.chosen.labels, pair.rejected.input_ids,
                            pair.rejected.labels)).encode())  # fmt: skip
    return default_cache_dir().parent / "reference" / f"{name}-{digest.hexdigest()[:24]}.json"


def batch_to(pair_batch: Any, device: torch.device) -> Any:
    pair_batch.batch = pair_batch.batch.to(device)
    return pair_batch


@torch.no_grad()
def evaluate_pairs(
    objective: PreferenceLoss,
    pairs: list[PairExample],
    reference: list[tuple[float, float]] | None,
    micro_batch_size: int,
    device: torch.device,
    autocast: Any,
    log: MetricsLog,
    step: int,
) -> dict[str, float]:
    """Preference loss and reward accuracy on held-out pairs, logged as val_*."""
    model = objective.loss.model
    was_training = model.training
    model.eval()
    objective.window_metrics()  # start from zero
    total = 0.0
    for start in range(0, len(pairs), micro_batch_size):
        refs = reference[start : start + micro_batch_size] if reference else None
        batch = batch_to(make_pair_batch(pairs[start : start + micro_batch_size], refs), device)
        with autocast:
            total += float(objective(batch))
    model.train(was_training)
    metrics = {"val_loss": total / len(pairs), **{f"val_{k}": v for k, v in objective.window_metrics().items()}}
    log.write({"step": step, **metrics})
    print(
        f"step {step}: validation loss {metrics['val_loss']:.4f}, reward accuracy {metrics['val_reward_accuracy']:.2%}"
    )
    return metrics
