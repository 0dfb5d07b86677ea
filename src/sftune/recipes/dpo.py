"""Preference optimisation (DPO, IPO, SimPO) after SFT, top to bottom: setup -> loop -> save.

`train_dpo(config)` is what `sftune dpo` and `sftune.train_dpo` call. It shares the SFT recipe's parts: the config
schema, run folder, model preparation (full, LoRA, QLoRA), checkpoints and exact resume, signals, health checks,
outputs and manifest. What differs is the data (pairs), the loss and the reference, and that it may start from
an SFT run folder (model.name_or_path: runs/my_sft), full or adapter (dpo.adapter: merge or continue).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from sftune.config import Config
from sftune.data.batching import accumulation_windows, window_micro_batches
from sftune.data.check import MASK_CHECKS
from sftune.data.formats import split_validation
from sftune.data.pair_check import PairReport, build_pair_report
from sftune.data.preference import PairExample, build_pair_examples, read_pairs
from sftune.data.templates import ChatTemplate
from sftune.eval.report import plot_preference_curves
from sftune.infer.generate import resolve_model_dir
from sftune.model.load import default_cache_dir
from sftune.model.setup import setup_model, setup_tokenizer
from sftune.model.start import StartingPoint, adapter_tokenizer, find_starting_point
from sftune.training.checkpoint import save_checkpoint
from sftune.training.data import write_rejections
from sftune.training.loss import TokenLoss
from sftune.training.metrics import MetricsLog, Throughput, log_step, progress_bar
from sftune.training.optim import build_optimizer, build_scheduler
from sftune.training.outputs import save_outputs
from sftune.training.preference import (
    PreferenceLoss,
    frozen_copy,
    make_pair_batch,
    pair_count,
    precompute_reference,
)
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
    start, start_config = setup_start(config, run_dir)  # before seeding: a merge done or reused draws no numbers
    seed_everything(config.train.seed)
    device, precision = setup_device(config)
    tokenizer, template = setup_tokenizer(start_config, adapter_tokenizer(start.adapter_dir))
    train_pairs, val_pairs, counts = setup_pairs(config, tokenizer, template, run_dir)
    model = setup_model(start_config, tokenizer, device, precision, start.adapter_dir)
    loss_sum = TokenLoss.for_model(model)
    autocast = autocast_context(device, precision)
    mode = reference_mode(config, start)
    reference = {}
    if mode == "precomputed":  # before restore_state: the reference is the model as it starts, also on resume
        reference = {name: cached_reference(start_config, start, loss_sum, pairs, device, autocast, name)
                     for name, pairs in (("train", train_pairs), ("validation", val_pairs)) if pairs}  # fmt: skip
    reference_copy = frozen_copy(model) if mode == "copy" else None
    objective = PreferenceLoss(loss_sum, config.dpo, mode == "adapter_off", reference_copy)
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
    model_dir = save_outputs(start_config, run_dir, model, tokenizer, template, end_ids, counts, state, device,
                             precision)  # fmt: skip
    plot_preference_curves(log.read(), run_dir / "preference.png")
    return TrainResult(run_dir, model_dir, state.global_step, last_loss, val_metrics.get("val_loss"), counts)


# ----------------------------------------------------------------------------------------------- setup


def setup_start(config: Config, run_dir: Path) -> tuple[StartingPoint, Config]:
    """Where training starts (an SFT run folder: its model, or its adapter merged or continued) and the config
    whose model.name_or_path is the folder the weights load from; the run's own config keeps what was written."""
    start = find_starting_point(
        resolve_model_dir(config.model.name_or_path), config.dpo.adapter, config.train.method, run_dir
    )
    model = config.model.model_copy(update={"name_or_path": start.model_path})
    return start, config.model_copy(update={"model": model})


def setup_pairs(
    config: Config, tokenizer: Any, template: ChatTemplate, run_dir: Path
) -> tuple[list[PairExample], list[PairExample], dict[str, Any]]:
    """Read and build the pairs once; the data report checks the mask of each branch of the very pairs trained;
    every dropped pair is written to rejected.jsonl with its reason."""
    data = config.data
    pairs, rejected = read_pairs(data.train, data.system_prompt)
    if data.max_rows:
        pairs = pairs[: data.max_rows]
    if data.validation:
        validation, val_rejected = read_pairs(data.validation, data.system_prompt)
        rejected += val_rejected
    else:
        pairs, validation = split_validation(pairs, data.validation_fraction, config.train.seed)
    built = build_pair_examples(pairs, tokenizer, template, data.max_length, data.truncation)
    report = build_pair_report(built, [], tokenizer, template)
    val_built = build_pair_examples(validation, tokenizer, template, data.max_length, data.truncation)
    write_pair_report(report, run_dir, data.proceed_on_failed_checks)
    rejections = [*rejected, *built.rejections, *val_built.rejections]
    write_rejections(run_dir / "rejected.jsonl", rejections)
    reasons: dict[str, int] = {}
    for r in rejections:
        reasons[r.reason] = reasons.get(r.reason, 0) + 1
    counts = {
        "pairs_in": len(pairs) + len(validation) + len(rejected),
        "pairs_trained": len(built.pairs),
        "pairs_validation": len(val_built.pairs),
        "pairs_rejected": len(rejections),
        "rejected_by_reason": reasons,
        "prompts_truncated": built.prompts_truncated + val_built.prompts_truncated,
    }
    (run_dir / "data_summary.json").write_text(json.dumps(counts, indent=2))
    print(
        f"data: {counts['pairs_in']} pairs in = {len(built.pairs)} train + {len(val_built.pairs)} validation + "
        f"{len(rejections)} rejected ({', '.join(f'{k}: {v}' for k, v in reasons.items()) or 'none'}); "
        f"{counts['prompts_truncated']} prompts truncated from the left to fit data.max_length={data.max_length}"
    )
    if not built.pairs:
        raise RunError(f"no preference pairs left to train on: {reasons}; see rejected.jsonl in the run folder")
    return built.pairs, val_built.pairs, counts


def write_pair_report(report: PairReport, run_dir: Path, proceed_on_failed_checks: bool) -> None:
    """data_report.txt/json of the training pairs; a failed mask check on either branch stops the run, as in SFT."""
    (run_dir / "data_report.json").write_text(report.to_json())
    (run_dir / "data_report.txt").write_text(report.to_text() + "\n")
    failed = report.failed_checks(MASK_CHECKS)
    if failed and not proceed_on_failed_checks:
        names = ", ".join(f"{c.name} ({c.failures} of {c.checked}, first: {c.first_source})" for c in failed)
        raise RunError(
            f"the loss mask fails checks: {names}. The log-probabilities would count the wrong tokens (see "
            "data_report.txt in the run folder, and `sftune data inspect` on the pairs): fix the template or data, or "
            "set data.proceed_on_failed_checks=true to train anyway"
        )


def reference_mode(config: Config, start: StartingPoint) -> str:
    """Where reference log-probs come from: none (SimPO), the adapter switched off, one pass before training, or a
    frozen copy. The reference is the model as it starts: a continued SFT adapter is part of it, so switching the
    adapter off would compare against the model before SFT."""
    if config.dpo.loss == "simpo":
        return "none"
    lora = config.train.method in ("lora", "qlora")
    if config.dpo.reference == "auto":
        return "adapter_off" if lora and start.adapter_dir is None else "precomputed"
    if config.dpo.reference == "adapter_off" and (not lora or start.adapter_dir is not None):
        why = (
            "full fine-tuning has no adapter" if not lora else "with dpo.adapter=continue that is the model before SFT"
        )
        raise RunError(f"dpo.reference=adapter_off cannot give the reference here ({why}): use "
                       "dpo.reference=precomputed (or auto, or copy)")  # fmt: skip
    return config.dpo.reference


def cached_reference(
    config: Config,
    start: StartingPoint,
    loss: TokenLoss,
    pairs: list[PairExample],
    device: torch.device,
    autocast: Any,
    name: str,
) -> list[tuple[float, float]]:
    """Reference log-probs computed once and cached on disk, keyed by the model (and continued adapter), the pairs'
    tokens and the precision: a second run or a resume reads them instead of recomputing."""
    path = reference_cache_path(config, start, pairs, name)
    if path.is_file():
        print(f"reference log-probs ({name}): cached, {path}")
        return [tuple(pair) for pair in json.loads(path.read_text())]  # type: ignore[misc]
    print(f"reference log-probs ({name}): computing for {len(pairs)} pairs, once")
    values = precompute_reference(loss, pairs, config.train.micro_batch_size, device, autocast,
                                  adapter_off=start.adapter_dir is None)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values))
    tmp.replace(path)
    return values


def reference_cache_path(config: Config, start: StartingPoint, pairs: list[PairExample], name: str) -> Path:
    digest = hashlib.sha256()
    for folder in (Path(start.model_path), *([start.adapter_dir] if start.adapter_dir else [])):
        for weights in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            digest.update(f"{weights.name}:{weights.stat().st_size}:{weights.stat().st_mtime_ns}".encode())
        digest.update(str(folder).encode())
    digest.update(config.train.precision.encode())
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
