"""Supervised fine-tuning, top to bottom: setup -> loop -> save.

`train(config)` is what `sftune train` and `sftune.train` both call.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sftune.config import Config, config_to_yaml
from sftune.data.batching import accumulation_windows, collate, window_micro_batches
from sftune.data.check import MASK_CHECKS, DataReport, build_report, load_model_config
from sftune.data.dataset import PreparedData, build_examples
from sftune.data.formats import read_conversations, split_validation
from sftune.data.templates import ChatTemplate, install_template, resolve_template
from sftune.data.types import Conversation, Example, Rejection
from sftune.infer.generate import generate_replies
from sftune.model.load import (
    bf16_supported,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)
from sftune.model.lora import prepare_model, save_trained
from sftune.model.save import end_of_turn_ids
from sftune.training.checkpoint import TrainerState, find_resume_checkpoint, load_checkpoint, save_checkpoint
from sftune.training.loss import mean_token_loss
from sftune.training.manifest import write_manifest
from sftune.training.metrics import MetricsLog, Throughput, perplexity, plot_loss_curve, progress_bar
from sftune.training.optim import build_optimizer, build_scheduler
from sftune.training.step import backward_window


class RunError(RuntimeError):
    """A run that cannot start as configured; the message says how to fix it."""


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    global_step: int
    final_loss: float | None
    val_loss: float | None
    counts: dict[str, Any] = field(default_factory=dict)


def train(config: Config, resume: str | None = None) -> TrainResult:
    run_dir = setup_run_dir(config, resume)
    seed_everything(config.train.seed)
    device, precision = setup_device(config)
    tokenizer, template = setup_tokenizer(config)
    data = setup_data(config, tokenizer, template, run_dir)
    model = setup_model(config, tokenizer, device, precision)
    optimizer = build_optimizer(list(model.named_parameters()), config.train)
    total_steps = count_total_steps(config, len(data.train))
    scheduler = build_scheduler(optimizer, config.train, total_steps)
    state = restore_state(resume, run_dir, model, optimizer, scheduler)

    cfg, log = config.train, MetricsLog(run_dir / "metrics.jsonl")
    steps_per_epoch = accumulation_windows(len(data.train), cfg.micro_batch_size, cfg.gradient_accumulation_steps)
    autocast = autocast_context(device, precision)
    pad_id = tokenizer.pad_token_id
    throughput, bar = Throughput(), progress_bar(total_steps, state.global_step, cfg.progress)
    last_loss, val_loss = None, None
    model.train()
    while state.global_step < total_steps:
        indices = window_micro_batches(
            len(data.train),
            cfg.seed,
            state.epoch,
            state.window,
            cfg.micro_batch_size,
            cfg.gradient_accumulation_steps,
            config.data.shuffle,
        )
        batches = [collate([data.train[i] for i in idx], pad_id).to(device) for idx in indices]
        step_loss = backward_window(model, batches, autocast)
        throughput.add(sum(b.num_tokens for b in batches))
        grad_norm = clip_gradients(model, cfg.max_grad_norm)
        lr = float(scheduler.get_last_lr()[0])  # the rate this step uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        state = advance(state, steps_per_epoch, sum(b.num_tokens for b in batches))
        last_loss = step_loss
        if state.global_step % cfg.log_every == 0 or state.global_step == total_steps:
            log_step(log, bar, state, step_loss, lr, grad_norm, throughput.rate())
        bar.update(1)
        if data.validation and cfg.eval_every and state.global_step % cfg.eval_every == 0:
            val_loss = evaluate_and_log(
                model, data.validation, cfg.micro_batch_size, pad_id, device, autocast, log, state
            )
            log_samples(model, tokenizer, data, config.eval.sample_max_new_tokens, state, run_dir)
        if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0:
            save_checkpoint(run_dir / "checkpoints", model, optimizer, scheduler, state, cfg.keep_checkpoints)
    bar.close()

    if data.validation and (not cfg.eval_every or state.global_step % cfg.eval_every != 0):
        val_loss = evaluate_and_log(model, data.validation, cfg.micro_batch_size, pad_id, device, autocast, log, state)
        log_samples(model, tokenizer, data, config.eval.sample_max_new_tokens, state, run_dir)
    model_dir = save_outputs(config, run_dir, model, tokenizer, template, data, state, device, precision)
    return TrainResult(run_dir, model_dir, state.global_step, last_loss, val_loss, data.counts())


# ----------------------------------------------------------------------------------------------- setup


def setup_run_dir(config: Config, resume: str | None) -> Path:
    """An existing, non-empty run folder is only reused to resume, or replaced with output.overwrite."""
    run_dir = Path(config.output.dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        if not config.output.overwrite:
            raise RunError(
                f"output folder '{run_dir}' already exists and is not empty: pass --overwrite "
                "(output.overwrite=true) to replace it, --resume auto to continue it, or choose another output.dir"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(config))
    return run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_device(config: Config) -> tuple[torch.device, str]:
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    device = resolve_device(config.train.device)
    precision = config.train.precision
    if precision == "auto":
        precision = "bf16-mixed" if bf16_supported(device.type) else "fp32"
    return device, precision


def setup_tokenizer(config: Config) -> tuple[Any, ChatTemplate]:
    model_path = resolve_model_path(config.model.name_or_path)
    tokenizer = load_tokenizer(model_path, config.model.trust_remote_code, config.model.revision)
    template = resolve_template(config.template.name, tokenizer)
    install_template(template, tokenizer)
    if tokenizer.pad_token_id is None:
        # Safe even though pad == eos then: padding is masked by position, never by token id.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, template


def setup_data(config: Config, tokenizer: Any, template: ChatTemplate, run_dir: Path) -> PreparedData:
    """Read and build the training rows once: the data report checks the very examples that are then trained."""
    data_cfg = config.data
    conversations, rejections, formats = read_conversations(data_cfg.train, data_cfg)
    val_rejections: list[Rejection] = []
    if data_cfg.validation:
        validation_rows, val_rejections, _ = read_conversations(data_cfg.validation, data_cfg)
    else:
        conversations, validation_rows = split_validation(
            conversations, data_cfg.validation_fraction, config.train.seed
        )
    report = run_data_check(config, tokenizer, template, run_dir, conversations, rejections, formats)
    val_examples, val_rejected = build_examples(validation_rows, tokenizer, template, data_cfg, config.template)
    rows_in = report.rows_in + len(validation_rows) + len(val_rejections)
    # report.rejections = the train file's rows dropped on reading + the train rows its build dropped: each once.
    rejected = report.rejections + val_rejections + val_rejected
    data = PreparedData(report.examples, val_examples, rejected, rows_in, formats)
    data.validation_prompts = prompts_for_samples(validation_rows, config.eval.sample_prompts)
    write_rejections(run_dir / "rejected.jsonl", data.rejections)
    report_data(data, run_dir)
    check_trainable(data, data_cfg.max_length, allow_missing_end_token=data_cfg.proceed_on_failed_checks)
    return data


def run_data_check(
    config: Config,
    tokenizer: Any,
    template: ChatTemplate,
    run_dir: Path,
    conversations: list[Conversation],
    rejections: list[Rejection],
    formats: dict[str, int],
) -> DataReport:
    """Build and prove the rows to be trained (saved as data_report.json/.txt); its examples are the ones trained.

    A failed mask check stops the run unless data.proceed_on_failed_checks allows it.
    """
    model_config = load_model_config(resolve_model_path(config.model.name_or_path))
    report = build_report(conversations, rejections, formats, config, tokenizer, template, model_config)
    (run_dir / "data_report.json").write_text(report.to_json())
    (run_dir / "data_report.txt").write_text(report.to_text() + "\n")
    print(report.to_text())
    failed = report.failed_checks(MASK_CHECKS)
    if failed and not config.data.proceed_on_failed_checks:
        names = ", ".join(f"{c.name} ({c.failures} of {c.checked}, first: {c.first_source})" for c in failed)
        raise RunError(
            f"the loss mask fails checks: {names}. Training on it would teach the wrong tokens (see data_report.txt "
            "in the run folder, and `sftune data inspect` to look at examples): fix the template or data, or set "
            "data.proceed_on_failed_checks=true to train anyway"
        )
    return report


def write_rejections(path: Path, rejections: list[Rejection]) -> None:
    with path.open("w") as f:
        for r in rejections:
            f.write(json.dumps({"source": r.source, "reason": r.reason, "detail": r.detail, "row": r.row}, default=str))
            f.write("\n")


def report_data(data: PreparedData, run_dir: Path) -> None:
    counts = data.counts()
    (run_dir / "data_summary.json").write_text(json.dumps(counts, indent=2))
    rejected = ", ".join(f"{k}: {v}" for k, v in counts["rejected_by_reason"].items()) or "none"
    print(
        f"data: {counts['rows_in']} rows in = {counts['rows_trained']} train + {counts['rows_validation']} "
        f"validation + {counts['rows_rejected']} rejected ({rejected}); "
        f"{counts['supervised_tokens']} of {counts['tokens']} train tokens supervised"
    )


def check_trainable(data: PreparedData, max_length: int, allow_missing_end_token: bool = False) -> None:
    if not data.train:
        reasons = data.rejected_by_reason()
        raise RunError(
            f"no training examples left: {reasons}. See rejected.jsonl in the run folder; for 'too_long' raise "
            f"data.max_length (now {max_length}) or set data.truncation=truncate"
        )
    missing_end = [e for e in data.train if e.turns_without_end_token]
    if missing_end and not allow_missing_end_token:
        raise RunError(
            f"{len(missing_end)} examples (first: {missing_end[0].source}) have assistant turns that the template "
            "closes with no end-of-turn token: the model would never learn to stop. Use a template that ends "
            "assistant turns with an EOS / end-of-turn special token (e.g. template.name=chatml)"
        )


def setup_model(config: Config, tokenizer: Any, device: torch.device, precision: str) -> Any:
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    model: Any = load_model(
        resolve_model_path(config.model.name_or_path),
        dtype,
        device,
        config.model.trust_remote_code,
        config.model.revision,
    )
    base_vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > base_vocab:
        model.resize_token_embeddings(len(tokenizer))  # the template added special tokens
    if config.train.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    # full / lora / qlora: which parameters train, whether the base is 4-bit; added tokens' rows always train
    return prepare_model(model, config, added_token_ids=list(range(base_vocab, len(tokenizer))))


def count_total_steps(config: Config, num_examples: int) -> int:
    cfg = config.train
    if cfg.max_steps:
        return cfg.max_steps
    per_epoch = accumulation_windows(num_examples, cfg.micro_batch_size, cfg.gradient_accumulation_steps)
    return max(1, round(cfg.epochs * per_epoch))


def restore_state(resume: str | None, run_dir: Path, model: Any, optimizer: Any, scheduler: Any) -> TrainerState:
    checkpoint = find_resume_checkpoint(resume, run_dir / "checkpoints") if resume else None
    if checkpoint is None:
        return TrainerState(global_step=0, epoch=0, window=0)
    state = load_checkpoint(checkpoint, model, optimizer, scheduler)
    for log_name in ("metrics.jsonl", "samples.jsonl"):
        MetricsLog(run_dir / log_name).truncate_after(state.global_step)
    print(f"resumed from {checkpoint} at step {state.global_step} (epoch {state.epoch}, window {state.window})")
    return state


# ------------------------------------------------------------------------------------------ loop helpers


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def clip_gradients(model: Any, max_norm: float | None) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm is None:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def advance(state: TrainerState, steps_per_epoch: int, tokens: int) -> TrainerState:
    window, epoch = state.window + 1, state.epoch
    if window >= steps_per_epoch:
        window, epoch = 0, epoch + 1
    return TrainerState(state.global_step + 1, epoch, window, state.tokens_seen + tokens)


def log_step(
    log: MetricsLog, bar: Any, state: TrainerState, loss: float, lr: float, grad_norm: float, tokens_per_s: float
) -> None:
    log.write(
        {
            "step": state.global_step,
            "epoch": state.epoch,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "tokens_seen": state.tokens_seen,
        }
    )
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")


def evaluate_and_log(
    model: Any,
    examples: list[Example],
    micro_batch_size: int,
    pad_id: int,
    device: torch.device,
    autocast: Any,
    log: MetricsLog,
    state: TrainerState,
) -> float:
    val_loss = mean_token_loss(model, examples, micro_batch_size, pad_id, device, autocast)
    log.write({"step": state.global_step, "val_loss": val_loss, "val_ppl": perplexity(val_loss)})
    print(f"step {state.global_step}: validation loss {val_loss:.4f}, perplexity {perplexity(val_loss):.2f}")
    return val_loss


def prompts_for_samples(conversations: list[Conversation], count: int) -> list[list[dict[str, Any]]]:
    """The first `count` validation conversations up to their last assistant turn: fixed prompts to watch."""
    prompts = []
    for conversation in conversations[:count]:
        last = max((i for i, m in enumerate(conversation.messages) if m.role == "assistant"), default=None)
        if last:
            prompts.append([m.as_dict() for m in conversation.messages[:last]])
    return prompts


def log_samples(
    model: Any, tokenizer: Any, data: PreparedData, max_new_tokens: int, state: TrainerState, run_dir: Path
) -> None:
    """Greedy replies to the fixed validation prompts (eval.sample_prompts), appended to samples.jsonl."""
    if not data.validation_prompts:
        return
    was_training = model.training
    model.eval()
    replies = generate_replies(model, tokenizer, data.validation_prompts, max_new_tokens, stop_ids=data.end_token_ids())
    model.train(was_training)
    log = MetricsLog(run_dir / "samples.jsonl")
    for index, (prompt, reply) in enumerate(zip(data.validation_prompts, replies, strict=True)):
        record = {"step": state.global_step, "index": index, "prompt": prompt[-1]["content"], "output": reply.text}
        log.write({**record, "finished": reply.finished})


# -------------------------------------------------------------------------------------------------- save


def save_outputs(
    config: Config,
    run_dir: Path,
    model: Any,
    tokenizer: Any,
    template: ChatTemplate,
    data: PreparedData,
    state: TrainerState,
    device: torch.device,
    precision: str,
) -> Path:
    save_dtype_name = config.output.save_dtype if config.output.save_dtype != "auto" else config.model.dtype
    save_dtype = resolve_dtype(save_dtype_name, device)
    base_path = resolve_model_path(config.model.name_or_path)
    eos_ids = end_of_turn_ids(tokenizer, set(data.end_token_ids()))
    model_dir = save_trained(model, tokenizer, run_dir / "model", config.train.method, save_dtype, eos_ids, base_path)
    records = MetricsLog(run_dir / "metrics.jsonl").read()
    plot_loss_curve(records, run_dir / "loss.png")
    extra = {
        "template": {"name": template.name, "mask": config.template.mask, "masking": "incremental prefix rendering"},
        "device": str(device),
        "precision": precision,
        "save_dtype": str(save_dtype).removeprefix("torch."),
        "global_step": state.global_step,
        "tokens_seen": state.tokens_seen,
        "counts": data.counts(),
    }
    write_manifest(run_dir / "manifest.json", config, extra)
    print(f"saved model to {model_dir}")
    return model_dir
