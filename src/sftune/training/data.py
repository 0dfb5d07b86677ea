"""A run's data: read the rows once, build the examples (or preference pairs) once, prove them, and write what was
kept and dropped.

A recipe calls `setup_data` (SFT) or `setup_pairs` (DPO and other pair objectives), which build and check without
writing, then `publish_data` once the run's settings are resolved (the data report carries the memory estimate they
used): one helper writes the report, the rejections and the summary, and stops on failed mask checks, for both.
`check_training_data` is the same check without a run (`sftune data check`). Examples are built through
`data.dataset.build_examples` and reported with `data.check.build_report`, so the report describes the very
examples that are trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
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
from sftune.data.pair_check import PairReport, build_pair_report
from sftune.data.preference import PairExample, build_pair_examples, read_pairs
from sftune.data.prompt import can_be_answered, prompt_for
from sftune.data.templates import ChatTemplate
from sftune.data.types import Conversation, Example, Prompt, Rejection
from sftune.model.load import resolve_device, resolve_model_path
from sftune.model.memory import estimate_memory, load_model_config, strategy_for
from sftune.training.distributed import launched_world_size
from sftune.training.run import RunError


def setup_data(config: Config, tokenizer: Any, template: ChatTemplate) -> PreparedData:
    """Read and build the training rows once (the data report checks the very examples that are then trained) and
    the validation rows, checked like them; nothing is written yet (`publish_data`)."""
    data_cfg = config.data
    conversations, rejections, formats = read_conversations(data_cfg.train, data_cfg)
    val_rejections: list[Rejection] = []
    if data_cfg.validation:
        validation_rows, val_rejections, _ = read_conversations(data_cfg.validation, data_cfg)
    else:
        conversations, validation_rows = split_validation(
            conversations, data_cfg.validation_fraction, config.train.seed
        )
    built = build_configured(conversations, tokenizer, template, config)
    report = build_report(built, rejections, formats, config, tokenizer, template)
    validation = build_configured(validation_rows, tokenizer, template, config)
    if validation_rows or val_rejections:  # checked like the training rows, before any training
        checks = check_mask(validation, tokenizer, template, config.template.mask)
        report.validation = summarize_validation(validation, val_rejections, checks)
    rows_in = report.rows_in + validation.rows_kept + len(val_rejections) + len(validation.rejections)
    # report.rejections = the train file's rows dropped on reading + the train rows its build dropped: each once.
    rejected = report.rejections + val_rejections + validation.rejections
    data = PreparedData(report.examples, validation.examples, rejected, rows_in, formats)
    data.train_rows, data.validation_rows = report.rows_kept, validation.rows_kept
    data.validation_prompts = prompts_for_samples(validation_rows, config.eval.sample_prompts)
    data.report = report
    return data


@dataclass
class PairData:
    """Preference pairs to train and validate on, their report and everything dropped, with the reason."""

    train: list[PairExample]
    validation: list[PairExample]
    rejections: list[Rejection]
    report: PairReport
    counts: dict[str, Any] = field(default_factory=dict)

    def end_token_ids(self) -> list[int]:
        return sorted({i for p in self.train for i in p.chosen.end_token_ids})


def setup_pairs(config: Config, tokenizer: Any, template: ChatTemplate) -> PairData:
    """Read and build the pairs once; the report checks the mask of each branch of the very pairs trained."""
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
    val_built = build_pair_examples(validation, tokenizer, template, data.max_length, data.truncation)
    rejections = [*rejected, *built.rejections, *val_built.rejections]
    counts = {
        "pairs_in": len(pairs) + len(validation) + len(rejected),
        "pairs_trained": len(built.pairs),
        "pairs_validation": len(val_built.pairs),
        "pairs_rejected": len(rejections),
        "rejected_by_reason": count_reasons(rejections),
        "prompts_truncated": built.prompts_truncated + val_built.prompts_truncated,
    }
    report = build_pair_report(built, [], tokenizer, template)
    return PairData(built.pairs, val_built.pairs, rejections, report, counts)


def publish_data(
    data: PreparedData | PairData, config: Config, run_dir: Path, memory: dict[str, Any] | None, write: bool = True
) -> None:
    """The data report (with the memory estimate the run's settings used), rejected.jsonl and data_summary.json into
    the run folder (`write`: rank 0 of a distributed run; the others only check), the summary line, then the
    gates: failed mask checks, nothing left to train, assistant turns without an end token."""
    report = data.report
    if isinstance(report, DataReport):
        report.memory = memory
        report.tokens_to_train = tokens_to_train(report.examples, config, launched_world_size())
    counts = data.counts if isinstance(data, PairData) else data.counts()
    if write:
        (run_dir / "data_report.json").write_text(report.to_json())
        (run_dir / "data_report.txt").write_text(report.to_text() + "\n")
        write_rejections(run_dir / "rejected.jsonl", data.rejections)
        (run_dir / "data_summary.json").write_text(json.dumps(counts, indent=2))
    if isinstance(report, DataReport):
        print(report.to_text())
    print(summary_line(counts, config))
    failed = [
        f"{c.name} ({c.failures} of {c.checked}, first: {c.first_source})" for c in report.failed_checks(MASK_CHECKS)
    ]
    if isinstance(report, DataReport) and report.validation and report.validation["failed_checks"]:
        failed.append(f"on the validation rows: {', '.join(report.validation['failed_checks'])}")
    stop_on_failed_checks(failed, config.data.proceed_on_failed_checks)
    if isinstance(data, PairData):
        if not data.train:
            raise RunError(
                f"no preference pairs left to train on: {counts['rejected_by_reason']}; see rejected.jsonl "
                "in the run folder"
            )
        return
    check_trainable(data, config.data.max_length, allow_missing_end_token=config.data.proceed_on_failed_checks)


def summary_line(counts: dict[str, Any], config: Config) -> str:
    rejected = ", ".join(f"{k}: {v}" for k, v in counts["rejected_by_reason"].items()) or "none"
    if "pairs_in" in counts:
        return (
            f"data: {counts['pairs_in']} pairs in = {counts['pairs_trained']} train + {counts['pairs_validation']} "
            f"validation + {counts['pairs_rejected']} rejected ({rejected}); {counts['prompts_truncated']} prompts "
            f"truncated from the left to fit data.max_length={config.data.max_length}"
        )
    return (
        f"data: {counts['rows_in']} rows in = {counts['rows_train']} train + {counts['rows_validation']} "
        f"validation + {counts['rows_rejected']} rejected ({rejected}); "
        f"{counts['supervised_tokens']} of {counts['tokens']} train tokens supervised"
    )


def stop_on_failed_checks(failed: list[str], proceed_on_failed_checks: bool) -> None:
    """A failed mask check stops the run (every rank) unless data.proceed_on_failed_checks allows it."""
    if failed and not proceed_on_failed_checks:
        raise RunError(
            f"the loss mask fails checks: {', '.join(failed)}. Training on it would teach the wrong tokens (see "
            "data_report.txt in the run folder, and `sftune data inspect` to look at examples): fix the template or "
            "data, or set data.proceed_on_failed_checks=true to train anyway"
        )


def count_reasons(rejections: list[Rejection]) -> dict[str, int]:
    reasons: dict[str, int] = {}
    for r in rejections:
        reasons[r.reason] = reasons.get(r.reason, 0) + 1
    return reasons


def check_training_data(
    config: Config,
    tokenizer: Any,
    template: ChatTemplate,
    world_size: int | None = None,
) -> DataReport:
    """`sftune data check`: build and check the training rows, with the memory estimate a run here would use (its
    settings resolved by the same function a run calls)."""
    from sftune.training.settings import resolve_settings

    report = check_data(config, tokenizer, template)
    world_size = launched_world_size() if world_size is None else world_size
    lengths = [len(e.input_ids) for e in report.examples]
    device = resolve_device(config.train.device)
    settings = resolve_settings(config, device, world_size, memory_estimator(lengths, world_size))
    report.memory = settings.memory
    report.tokens_to_train = tokens_to_train(report.examples, settings.config, world_size)
    return report


def memory_estimator(lengths: list[int], world_size: int) -> Any:
    """The estimate of a (resolved) config on these example lengths, for `resolve_settings`."""
    return lambda config: estimate_run_memory(config, lengths, world_size)


def estimate_run_memory(config: Config, lengths: list[int], world_size: int = 1) -> dict[str, Any] | None:
    """The memory estimate per process for the configured (resolved) model, method and strategy on the longest
    micro-batch of these examples, with and without checkpointing and the optimizer offload; None where the
    model's config cannot be read."""
    model_config = load_model_config(resolve_model_path(config.model.name_or_path))
    if model_config is None:
        return None
    device = resolve_device(config.train.device)
    batch = longest_micro_batch(lengths, config.train.micro_batch_size)
    memory = estimate_memory(model_config, config, *batch, world_size=world_size)
    checkpointed = config.model_copy(update={"train": config.train.model_copy(update={"gradient_checkpointing": True})})
    with_checkpointing = estimate_memory(model_config, checkpointed, *batch, world_size=world_size)
    memory["with_checkpointing_gib"] = {m: with_checkpointing[f"{m}_gib"] for m in ("full", "lora", "qlora")}
    offloaded = checkpointed.train.model_copy(update={"offload_optimizer_state": True})
    with_offload = estimate_memory(
        model_config, checkpointed.model_copy(update={"train": offloaded}), *batch, world_size=world_size
    )
    memory["with_offload_gib"] = {m: with_offload[f"{m}_gib"] for m in ("full", "lora", "qlora")}
    memory["device"] = device.type
    memory["strategy"] = strategy_for(config, world_size)
    return memory


def write_rejections(path: Path, rejections: list[Rejection]) -> None:
    with path.open("w") as f:
        for r in rejections:
            f.write(json.dumps({"source": r.source, "reason": r.reason, "detail": r.detail, "row": r.row}, default=str))
            f.write("\n")


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
