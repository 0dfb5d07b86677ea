"""A run's data: read the rows once, build the examples once, prove them, and write what was kept and dropped.

`setup_data` is what a training recipe calls; `check_training_data` is the same check without a run
(`sftune data check`). Both build examples through `data.dataset.build_examples` and report with
`data.check.build_report`, so the report describes the very examples that are trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sftune.config import Config
from sftune.data.batching import longest_micro_batch
from sftune.data.check import (
    MASK_CHECKS,
    DataReport,
    build_configured,
    build_report,
    check_data,
    check_mask,
    summarize_validation,
    tokens_to_train,
)
from sftune.data.dataset import PreparedData
from sftune.data.formats import read_conversations, split_validation
from sftune.data.prompt import can_be_answered, prompt_for
from sftune.data.templates import ChatTemplate
from sftune.data.types import Conversation, Example, Prompt, Rejection
from sftune.model.load import resolve_device, resolve_model_path
from sftune.model.memory import estimate_memory, load_model_config, strategy_for
from sftune.training.distributed import launched_world_size
from sftune.training.run import RunError, resolve_auto_settings, resolve_precision


def setup_data(
    config: Config, tokenizer: Any, template: ChatTemplate, run_dir: Path, write_files: bool = True
) -> PreparedData:
    """Read and build the training rows once: the data report checks the very examples that are then trained.
    `write_files`: write the data report, rejections and summary into the run folder (rank 0 of a distributed
    run; the other ranks build the same examples and write nothing)."""
    data_cfg = config.data
    conversations, rejections, formats = read_conversations(data_cfg.train, data_cfg)
    val_rejections: list[Rejection] = []
    if data_cfg.validation:
        validation_rows, val_rejections, _ = read_conversations(data_cfg.validation, data_cfg)
    else:
        conversations, validation_rows = split_validation(
            conversations, data_cfg.validation_fraction, config.train.seed
        )
    report = check_training_data(config, tokenizer, template, conversations, rejections, formats)
    validation = build_configured(validation_rows, tokenizer, template, config)
    if validation_rows or val_rejections:  # checked like the training rows, before any training
        checks = check_mask(validation, tokenizer, template, config.template.mask)
        report.validation = summarize_validation(validation, val_rejections, checks)
    if write_files:
        write_data_report(report, run_dir)
    stop_on_failed_checks(report, config)
    rows_in = report.rows_in + validation.rows_kept + len(val_rejections) + len(validation.rejections)
    # report.rejections = the train file's rows dropped on reading + the train rows its build dropped: each once.
    rejected = report.rejections + val_rejections + validation.rejections
    data = PreparedData(report.examples, validation.examples, rejected, rows_in, formats, memory=report.memory)
    data.train_rows, data.validation_rows = report.rows_kept, validation.rows_kept
    data.validation_prompts = prompts_for_samples(validation_rows, config.eval.sample_prompts)
    if write_files:
        write_rejections(run_dir / "rejected.jsonl", data.rejections)
        report_data(data, run_dir)
    check_trainable(data, data_cfg.max_length, allow_missing_end_token=data_cfg.proceed_on_failed_checks)
    return data


def check_training_data(
    config: Config,
    tokenizer: Any,
    template: ChatTemplate,
    conversations: list[Conversation] | None = None,
    rejections: list[Rejection] | None = None,
    formats: dict[str, int] | None = None,
    world_size: int | None = None,
) -> DataReport:
    """Build and check the training rows (read from config.data.train unless given), with the memory estimate
    for the configured model on their longest micro-batch."""
    if conversations is None:
        report = check_data(config, tokenizer, template)
    else:
        built = build_configured(conversations, tokenizer, template, config)
        report = build_report(built, rejections or [], formats or {}, config, tokenizer, template)
    world_size = launched_world_size() if world_size is None else world_size
    report.memory = estimate_run_memory(config, [len(e.input_ids) for e in report.examples], world_size)
    report.tokens_to_train = tokens_to_train(report.examples, config, world_size)
    return report


def estimate_run_memory(config: Config, lengths: list[int], world_size: int | None = None) -> dict[str, Any] | None:
    """The memory estimate per process for the configured model, method and strategy on the longest micro-batch
    of these examples (`world_size`: the processes of the run; None = as launched); None where the model's
    config cannot be read."""
    model_config = load_model_config(resolve_model_path(config.model.name_or_path))
    if model_config is None:
        return None
    world_size = launched_world_size() if world_size is None else world_size
    device = resolve_device(config.train.device)  # the 'auto' settings as a run here would resolve them
    config = resolve_auto_settings(config, device, resolve_precision(config, device), strategy_for(config, world_size))
    batch = longest_micro_batch(lengths, config.train.micro_batch_size)
    memory = estimate_memory(model_config, config, *batch, world_size=world_size)
    checkpointed = config.model_copy(update={"train": config.train.model_copy(update={"gradient_checkpointing": True})})
    with_checkpointing = estimate_memory(model_config, checkpointed, *batch, world_size=world_size)
    memory["with_checkpointing_gib"] = {m: with_checkpointing[f"{m}_gib"] for m in ("full", "lora", "qlora")}
    offloaded = checkpointed.train.model_copy(update={"offload_optimizer_state": True})
    with_offload = estimate_memory(model_config, checkpointed.model_copy(update={"train": offloaded}), *batch,
                                   world_size=world_size)  # fmt: skip
    memory["with_offload_gib"] = {m: with_offload[f"{m}_gib"] for m in ("full", "lora", "qlora")}
    memory["device"] = device.type
    return memory


def write_data_report(report: DataReport, run_dir: Path) -> None:
    (run_dir / "data_report.json").write_text(report.to_json())
    (run_dir / "data_report.txt").write_text(report.to_text() + "\n")
    print(report.to_text())


def stop_on_failed_checks(report: DataReport, config: Config) -> None:
    """A failed mask check stops the run unless data.proceed_on_failed_checks allows it."""
    failed = report.failed_checks(MASK_CHECKS)
    failed_validation = report.validation["failed_checks"] if report.validation else []
    if (failed or failed_validation) and not config.data.proceed_on_failed_checks:
        names = ", ".join(f"{c.name} ({c.failures} of {c.checked}, first: {c.first_source})" for c in failed)
        if failed_validation:
            names += f"{', ' if names else ''}on the validation rows: {', '.join(failed_validation)}"
        raise RunError(
            f"the loss mask fails checks: {names}. Training on it would teach the wrong tokens (see data_report.txt "
            "in the run folder, and `sftune data inspect` to look at examples): fix the template or data, or set "
            "data.proceed_on_failed_checks=true to train anyway"
        )


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
    missing_end: list[Example] = [e for e in data.train if e.turns_without_end_token]
    if missing_end and not allow_missing_end_token:
        raise RunError(
            f"{len(missing_end)} examples (first: {missing_end[0].source}) have assistant turns that the template "
            "closes with no end-of-turn token: the model would never learn to stop. Use a template that ends "
            "assistant turns with an EOS / end-of-turn special token (e.g. template.name=chatml)"
        )


def prompts_for_samples(conversations: list[Conversation], count: int) -> list[Prompt]:
    """The first `count` validation conversations up to their last assistant turn, through the one prompt builder
    (tools, system prompt and extras as trained): fixed prompts to watch."""
    prompts = [prompt_for(c) for c in conversations[:count] if c.text is None]
    return [p for p in prompts if can_be_answered(p)]
