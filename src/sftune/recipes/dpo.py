"""Preference optimisation (DPO, IPO, SimPO) after SFT, top to bottom: setup -> loop -> save.

`train_dpo(config)` is what `sftune dpo` and `sftune.train_dpo` call. It shares the SFT recipe's parts: the config
schema, run folder, model preparation (full, LoRA, QLoRA), checkpoints and exact resume, signals, health checks,
outputs and manifest. What differs is the data (pairs), the loss and the reference, and that it may start from
an SFT run folder (model.name_or_path: runs/my_sft), full or adapter (dpo.adapter: merge or continue).

Under torchrun (`sftune dpo CONFIG --nproc N`) it is the same run as one process with the same global batch, as SFT
is: each window's pairs split over the ranks (a rank short of pairs runs a placeholder pair that counts for
nothing), the loss divided by the pairs of the whole window, the per-step metrics summed over the ranks, the
objective (the adapter-off reference included) inside the DDP / FSDP2 wrapper, and only rank 0 writing files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from sftune.config import Config
from sftune.data.check import MASK_CHECKS
from sftune.data.formats import split_validation
from sftune.data.pair_check import PairReport, build_pair_report
from sftune.data.preference import PairExample, build_pair_examples, read_pairs
from sftune.data.templates import ChatTemplate
from sftune.eval.report import plot_preference_curves
from sftune.infer.generate import resolve_model_dir
from sftune.model.load import default_cache_dir
from sftune.model.memory import fit_memory_budget
from sftune.model.setup import setup_model, setup_tokenizer
from sftune.model.start import StartingPoint, adapter_tokenizer, find_starting_point
from sftune.training.checkpoint import save_checkpoint
from sftune.training.data import write_rejections
from sftune.training.distributed import (
    SINGLE,
    Distributed,
    DistributedError,
    LossModule,
    gathered_model,
    rank_chunks,
    rank_examples,
    shutdown,
    unwrap,
    wrap_model,
)
from sftune.training.loss import TokenLoss
from sftune.training.metrics import MetricsLog, Throughput, log_step, progress_bar
from sftune.training.optim import build_optimizer, build_scheduler
from sftune.training.outputs import save_outputs
from sftune.training.preference import (
    PreferenceLoss,
    ReferencedPair,
    frozen_copy,
    make_referenced_batch,
    pair_count,
    pair_length,
    precompute_reference,
    referenced_length,
    referenced_placeholder,
    with_reference,
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
    setup_process,
    setup_run_dir,
    steps_per_epoch,
    window_indices,
)
from sftune.training.step import backward_window, optimizer_step

__all__ = ["train_dpo"]


def train_dpo(config: Config, resume: str | None = None, resume_changed: bool = False) -> TrainResult:
    # ------------------------------------------------------------------------------------------- setup
    config, device, precision, info = setup_process(config)  # one process: SINGLE, every collective a no-op
    run_dir = setup_run_dir(config, resume, info)
    start, start_config = setup_start(config, run_dir, info)  # before seeding: a merge done or reused draws no numbers
    seed_everything(config.train.seed)
    tokenizer, template = setup_tokenizer(start_config, adapter_tokenizer(start.adapter_dir))
    train_pairs, val_pairs, counts = setup_pairs(config, tokenizer, template, run_dir, write_files=info.is_main)
    config = fit_memory_budget(config, None)  # no estimate for pairs: train.offload_optimizer_state auto -> off
    model = setup_model(start_config, tokenizer, device, precision, start.adapter_dir, info.strategy)
    loss_sum = TokenLoss.for_model(model)
    autocast = autocast_context(device, precision)
    mode = reference_mode(config, start, info)
    reference = {}
    if mode == "precomputed":  # before restore_state: the reference is the model as it starts, also on resume
        reference = {name: cached_reference(start_config, start, loss_sum, pairs, device, autocast, name, info)
                     for name, pairs in (("train", train_pairs), ("validation", val_pairs)) if pairs}  # fmt: skip
    reference_copy = frozen_copy(model) if mode == "copy" else None
    objective = PreferenceLoss(loss_sum, config.dpo, mode == "adapter_off", reference_copy)
    trainer = wrap_model(LossModule(objective, model), info, device)  # the adapter-off reference runs inside too
    optimizer = build_optimizer(list(model.named_parameters()), config.train, run_dir)
    total_steps = count_total_steps(config, len(train_pairs), info.world_size)
    scheduler = build_scheduler(optimizer, config.train, total_steps)
    checkpointed = trainer if info.enabled else model
    state = restore_state(resume, run_dir, checkpointed, optimizer, scheduler, config, resume_changed, info)
    saved_config = resume_fingerprint(config)

    cfg, log = config.train, MetricsLog(run_dir / "metrics.jsonl", enabled=info.is_main)
    windows_per_epoch = steps_per_epoch(config, len(train_pairs), info.world_size)
    throughput = Throughput()
    bar = progress_bar(total_steps, state.global_step, cfg.progress and info.is_main)
    last_loss, val_metrics, skipped = None, {}, 0
    train_items = with_reference(train_pairs, reference.get("train"))

    def validate() -> dict[str, float]:
        return evaluate_pairs(unwrap(trainer), objective, with_reference(val_pairs, reference.get("validation")),
                              cfg.micro_batch_size, device, autocast, log, state.global_step, info)  # fmt: skip

    def checkpoint() -> Path:
        return save_checkpoint(
            run_dir / "checkpoints", checkpointed, optimizer, scheduler, state, cfg.keep_checkpoints, saved_config, info
        )

    # -------------------------------------------------------------------------------------------- loop
    model.train()
    with StopRequest() as stop:  # SIGTERM / Ctrl-C: finish the step, checkpoint, stop
        while state.global_step < total_steps:
            window = window_indices(config, len(train_pairs), state, info.world_size)  # split across ranks below
            shares = rank_examples(window, train_items, referenced_length, info, referenced_placeholder)
            batches = [batch_to(make_referenced_batch(share), device) for share in shares]
            step_loss = backward_window(batches, trainer, autocast, count=pair_count, info=info)
            tokens = sum(pair_length(train_pairs[i]) for indices in window for i in indices)  # all ranks'
            throughput.add(tokens)
            sources = [source for b in batches for source in b.sources]
            stopping = info.any_rank(stop.requested is not None)
            grad_norm, lr, updated = optimizer_step(
                model, optimizer, scheduler, cfg, step_loss, state.global_step + 1, sources
            )
            skipped += not updated
            state = advance(state, windows_per_epoch, tokens)
            last_loss = step_loss
            values = {"loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": throughput.rate()}
            values |= objective.window_metrics(info) | ({"skipped_steps": skipped} if skipped else {})
            log_step(log, bar, state.global_step, state.epoch, state.tokens_seen, values)
            bar.update(1)
            if val_pairs and cfg.eval_every and state.global_step % cfg.eval_every == 0:
                val_metrics = validate()
            if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0:
                checkpoint()
            if stopping:  # on every rank at the same step: the checkpoint is written by all of them
                bar.close()
                raise stop.stop(checkpoint(), state.global_step)
    bar.close()
    if val_pairs and (not cfg.eval_every or state.global_step % cfg.eval_every != 0):
        val_metrics = validate()

    # -------------------------------------------------------------------------------------------- save
    model_dir = run_dir / "model"
    end_ids = sorted({i for p in train_pairs for i in p.chosen.end_token_ids})
    trained = gathered_model(
        trainer,
        model,
        info,
        lambda: setup_model(start_config, tokenizer, device, precision, start.adapter_dir, info.strategy),
    )
    if info.is_main:
        model_dir = save_outputs(start_config, run_dir, trained, tokenizer, template, end_ids, counts, state, device,
                                 precision)  # fmt: skip
        plot_preference_curves(log.read(), run_dir / "preference.png")
    shutdown(info)
    return TrainResult(run_dir, model_dir, state.global_step, last_loss, val_metrics.get("val_loss"), counts)


# ----------------------------------------------------------------------------------------------- setup


def setup_start(config: Config, run_dir: Path, info: Distributed = SINGLE) -> tuple[StartingPoint, Config]:
    """Where training starts (an SFT run folder: its model, or its adapter merged or continued) and the config
    whose model.name_or_path is the folder the weights load from; the run's own config keeps what was written.
    Rank 0 merges an SFT adapter into the run folder; the other ranks wait, then find it merged."""
    if not info.is_main:
        info.barrier()
    start = find_starting_point(
        resolve_model_dir(config.model.name_or_path), config.dpo.adapter, config.train.method, run_dir
    )
    if info.is_main:
        info.barrier()
    model = config.model.model_copy(update={"name_or_path": start.model_path})
    return start, config.model_copy(update={"model": model})


def setup_pairs(
    config: Config, tokenizer: Any, template: ChatTemplate, run_dir: Path, write_files: bool = True
) -> tuple[list[PairExample], list[PairExample], dict[str, Any]]:
    """Read and build the pairs once; the data report checks the mask of each branch of the very pairs trained;
    every dropped pair is written to rejected.jsonl with its reason. `write_files`: rank 0 of a distributed run
    writes the report, rejections and summary; the other ranks build the same pairs and write nothing."""
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
    write_pair_report(report, run_dir, data.proceed_on_failed_checks, write_files)
    rejections = [*rejected, *built.rejections, *val_built.rejections]
    if write_files:
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
    if write_files:
        (run_dir / "data_summary.json").write_text(json.dumps(counts, indent=2))
    print(
        f"data: {counts['pairs_in']} pairs in = {len(built.pairs)} train + {len(val_built.pairs)} validation + "
        f"{len(rejections)} rejected ({', '.join(f'{k}: {v}' for k, v in reasons.items()) or 'none'}); "
        f"{counts['prompts_truncated']} prompts truncated from the left to fit data.max_length={data.max_length}"
    )
    if not built.pairs:
        raise RunError(f"no preference pairs left to train on: {reasons}; see rejected.jsonl in the run folder")
    return built.pairs, val_built.pairs, counts


def write_pair_report(report: PairReport, run_dir: Path, proceed_on_failed_checks: bool, write: bool = True) -> None:
    """data_report.txt/json of the training pairs; a failed mask check on either branch stops the run (every rank),
    as in SFT."""
    if write:
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


def reference_mode(config: Config, start: StartingPoint, info: Distributed = SINGLE) -> str:
    """Where reference log-probs come from: none (SimPO), the adapter switched off, one pass before training, or a
    frozen copy. The reference is the model as it starts: a continued SFT adapter is part of it, so switching the
    adapter off would compare against the model before SFT. FSDP2 refuses the copy: a whole unsharded model on
    every rank (DDP holds a full replica per rank anyway, so there the copy is what one process would hold)."""
    if config.dpo.loss == "simpo":
        return "none"
    if config.dpo.reference == "copy" and info.strategy == "fsdp2":
        raise DistributedError(
            "dpo.reference=copy with train.strategy=fsdp2: the frozen copy would be a whole, unsharded model on "
            f"each of the {info.world_size} processes, which is what sharding avoids. Use dpo.reference=precomputed "
            "(the same reference, computed once before training; or auto), or train.strategy=ddp"
        )
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
    info: Distributed = SINGLE,
) -> list[tuple[float, float]]:
    """Reference log-probs computed once and cached on disk, keyed by the model (and continued adapter), the pairs'
    tokens and the precision: a second run or a resume reads them instead of recomputing. On several processes
    rank 0 reads or computes them (before the model is wrapped: it holds the model whole) and sends them to the
    others (a broadcast: no cache folder shared between machines needed)."""
    values: list[tuple[float, float]] = []
    path = reference_cache_path(config, start, pairs, name)
    if info.is_main and path.is_file():
        print(f"reference log-probs ({name}): cached, {path}")
        values = [tuple(pair) for pair in json.loads(path.read_text())]  # type: ignore[misc]
    elif info.is_main:
        print(f"reference log-probs ({name}): computing for {len(pairs)} pairs, once")
        values = precompute_reference(loss, pairs, config.train.micro_batch_size, device, autocast,
                                      adapter_off=start.adapter_dir is None)  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(values))
        tmp.replace(path)
    if not info.enabled:
        return values
    sent = info.broadcast(torch.tensor(values or [(0.0, 0.0)] * len(pairs), dtype=torch.float64))  # [pairs, 2]
    return [(chosen, rejected) for chosen, rejected in sent.tolist()]


def reference_cache_path(config: Config, start: StartingPoint, pairs: list[PairExample], name: str) -> Path:
    digest = hashlib.sha256()
    for folder in (Path(start.model_path), *([start.adapter_dir] if start.adapter_dir else [])):
        for weights in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            digest.update(f"{weights.name}:{weights.stat().st_size}:{weights.stat().st_mtime_ns}".encode())
        digest.update(str(folder).encode())
    digest.update(config.train.precision.encode())
    digest.update(f"base:{config.lora.base_dtype if config.train.method == 'lora' else 'as loaded'}".encode())
    for pair in pairs:
        digest.update(repr((pair.chosen.input_ids, pair.chosen.labels, pair.rejected.input_ids,
                            pair.rejected.labels)).encode())  # fmt: skip
    return default_cache_dir().parent / "reference" / f"{name}-{digest.hexdigest()[:24]}.json"


def batch_to(pair_batch: Any, device: torch.device) -> Any:
    pair_batch.batch = pair_batch.batch.to(device)
    return pair_batch


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
            total += float(loss_module(batch_to(make_referenced_batch(chunk), device)))
    model.train(was_training)
    (total,) = info.all_sum(total)
    metrics = {"val_loss": total / len(pairs), **{f"val_{k}": v for k, v in objective.window_metrics(info).items()}}
    log.write({"step": step, **metrics})
    print(
        f"step {step}: validation loss {metrics['val_loss']:.4f}, reward accuracy {metrics['val_reward_accuracy']:.2%}"
    )
    return metrics
