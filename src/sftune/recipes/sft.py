"""Supervised fine-tuning, top to bottom: setup -> loop -> save.

`train(config)` is what `sftune train` and `sftune.train` both call. Every step it takes is a named part of a
component (training/, model/, data/); what is written here is the order, and the loop itself.
"""

from __future__ import annotations

from pathlib import Path

from sftune.config import Config
from sftune.data.batching import make_batch
from sftune.model.memory import fit_memory_budget
from sftune.model.setup import setup_model, setup_tokenizer
from sftune.training.checkpoint import save_checkpoint
from sftune.training.data import setup_data
from sftune.training.distributed import (
    LossModule,
    gathered_model,
    rank_examples,
    shutdown,
    unwrap,
    wrap_model,
)
from sftune.training.evaluation import evaluate_and_log, log_samples
from sftune.training.loss import TokenLoss
from sftune.training.metrics import MetricsLog, Throughput, log_step, progress_bar
from sftune.training.optim import build_optimizer, build_scheduler
from sftune.training.outputs import save_outputs
from sftune.training.run import (
    StopRequest,
    TrainResult,
    advance,
    autocast_context,
    check_free_space,
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

__all__ = ["TrainResult", "train"]


def train(config: Config, resume: str | None = None, resume_changed: bool = False) -> TrainResult:
    # ------------------------------------------------------------------------------------------- setup
    config, device, precision, info = setup_process(config)  # one process: SINGLE, every collective a no-op
    run_dir = setup_run_dir(config, resume, info)
    seed_everything(config.train.seed)
    tokenizer, template = setup_tokenizer(config)
    data = setup_data(config, tokenizer, template, run_dir, write_files=info.is_main)
    config = fit_memory_budget(config, data.memory)  # activation checkpointing where the estimate needs it
    model = setup_model(config, tokenizer, device, precision, strategy=info.strategy)
    check_free_space(run_dir, model, config)
    loss_sum = TokenLoss.for_model(model)
    print(f"loss: {loss_sum.path}")
    trainer = wrap_model(LossModule(loss_sum, model), info, device)  # DDP / FSDP2 around model + loss
    optimizer = build_optimizer(list(model.named_parameters()), config.train, run_dir)
    total_steps = count_total_steps(config, len(data.train), info.world_size)
    scheduler = build_scheduler(optimizer, config.train, total_steps)
    checkpointed = trainer if info.enabled else model
    state = restore_state(resume, run_dir, checkpointed, optimizer, scheduler, config, resume_changed, info)
    saved_config = resume_fingerprint(config)  # goes into every checkpoint: a resume compares against it

    cfg, log = config.train, MetricsLog(run_dir / "metrics.jsonl", enabled=info.is_main)
    windows_per_epoch = steps_per_epoch(config, len(data.train), info.world_size)
    autocast = autocast_context(device, precision)
    pad_id, stop_ids = tokenizer.pad_token_id, data.end_token_ids()
    throughput = Throughput()
    bar = progress_bar(total_steps, state.global_step, cfg.progress and info.is_main)
    last_loss, val_loss, skipped = None, None, 0

    def validate() -> float:
        """Validation loss, and the sample replies to watch (eval.sample_prompts)."""
        loss = evaluate_and_log(unwrap(trainer), data.validation, cfg, pad_id, device, autocast, log, state, info)
        if info.strategy != "fsdp2" and info.is_main:  # FSDP2: every rank would have to generate in lockstep
            max_tokens = config.eval.sample_max_new_tokens
            log_samples(model, tokenizer, data.validation_prompts, stop_ids, max_tokens, state, run_dir)
        return loss

    def checkpoint() -> Path:
        return save_checkpoint(
            run_dir / "checkpoints", checkpointed, optimizer, scheduler, state, cfg.keep_checkpoints, saved_config, info
        )

    # -------------------------------------------------------------------------------------------- loop
    model.train()
    with StopRequest() as stop:  # SIGTERM / Ctrl-C: finish the step, checkpoint, stop
        while state.global_step < total_steps:
            window = window_indices(config, len(data.train), state, info.world_size)  # split across ranks below
            examples = rank_examples(window, data.train, lambda e: len(e.input_ids), info)
            batches = [make_batch(chunk, pad_id, cfg.padding_free).to(device) for chunk in examples]
            step_loss = backward_window(batches, trainer, autocast, info=info)
            sources = [e.source for chunk in examples for e in chunk]
            tokens = sum(len(data.train[i].input_ids) for indices in window for i in indices)  # all ranks'
            stopping = info.any_rank(stop.requested is not None)
            grad_norm, lr, updated = optimizer_step(
                model, optimizer, scheduler, cfg, step_loss, state.global_step + 1, sources
            )
            skipped += not updated

            state = advance(state, windows_per_epoch, tokens)
            throughput.add(tokens)
            last_loss = step_loss
            if state.global_step % cfg.log_every == 0 or state.global_step == total_steps:
                values = {"loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": throughput.rate()}
                values |= {"skipped_steps": skipped} if skipped else {}
                log_step(log, bar, state.global_step, state.epoch, state.tokens_seen, values)
            bar.update(1)
            if data.validation and cfg.eval_every and state.global_step % cfg.eval_every == 0:
                val_loss = validate()
            if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0:
                checkpoint()
            if stopping:  # on every rank at the same step: the checkpoint is written by all of them
                bar.close()
                raise stop.stop(checkpoint(), state.global_step)
    bar.close()
    if data.validation and (not cfg.eval_every or state.global_step % cfg.eval_every != 0):
        val_loss = validate()

    # -------------------------------------------------------------------------------------------- save
    model_dir = run_dir / "model"
    trained = gathered_model(
        trainer, model, info, lambda: setup_model(config, tokenizer, device, precision, strategy=info.strategy)
    )
    if info.is_main:
        model_dir = save_outputs(
            config, run_dir, trained, tokenizer, template, stop_ids, data.counts(), state, device, precision
        )
    shutdown(info)
    return TrainResult(run_dir, model_dir, state.global_step, last_loss, val_loss, data.counts())
