"""Evaluate a model on held-out rows, optionally beside a baseline: `sftune eval` and the demo both call this.

Top to bottom: read the rows once -> for each model: load, response-token loss, generate, score -> write
results, generations and the report. Both models see the same rows, each rendered with its own saved template.
"""

from __future__ import annotations

import contextlib
import gc
import json
import time
from pathlib import Path
from typing import Any

from sftune.config import ConfigError, EvalConfig, load_config, validate_section
from sftune.data.dataset import build_examples
from sftune.data.sources import SUPPORTED_EXTENSIONS
from sftune.data.types import Conversation, Message
from sftune.eval.metrics import check_extractor, score_generations
from sftune.eval.report import ModelEval, write_report
from sftune.infer.generate import check_model_path, generate_rows, load_for_inference, saved_template
from sftune.infer.prompts import PromptRow, read_prompt_rows
from sftune.infer.run_settings import read_run_settings, run_folder_of
from sftune.training.loss import TokenLoss, mean_token_loss
from sftune.training.metrics import perplexity

LOSS_MAX_LENGTH = 4096  # longer rows are truncated for the loss only; generation sees the whole prompt


def evaluate(
    model: str,
    data: str,
    config: EvalConfig,
    out_dir: str | Path,
    baseline: str | None = None,
    run_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score `model` (and `baseline`) on `data`; write eval_results.json, generations.jsonl and report.md/html."""
    if "exact_match" in config.metrics:
        check_extractor(config.extractor, config.answer_pattern)  # a bad regex fails before any model loads
    for path in (model, baseline) if baseline else (model,):
        check_model_path(path)
    check_data_path(data)
    started = time.perf_counter()
    # Rows become prompts as the run's training rows did: its columns, format and system prompt.
    rows, rejected = read_prompt_rows(data, config.max_rows, settings=read_run_settings(model).prompts)
    tuned = evaluate_one("model", model, rows, config, progress)
    # A base model with no chat template of its own is prompted with the tuned model's: the same prompts.
    evaluated = (
        [evaluate_one("baseline", baseline, rows, config, progress, tuned.template), tuned] if baseline else [tuned]
    )
    results = {
        "data": data,
        "rows": len(rows),
        "rows_with_reference": sum(r.reference is not None for r in rows),
        "rejected": [{"source": r.source, "reason": r.reason, "detail": r.detail} for r in rejected],
        "settings": config.model_dump(),
        "models": {e.label: {"path": e.path, **e.metrics} for e in evaluated},
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_results.json").write_text(json.dumps(results, indent=2))
    write_generations(out / "generations.jsonl", rows, evaluated)
    results["report"] = [str(p) for p in write_report(out, results, rows, evaluated, config.report_samples, run_dir)]
    return results


def resolve_eval_settings(
    model: str, config_path: str | None, overrides: list[str], out: str | None, flags: dict[str, Any] | None = None
) -> tuple[EvalConfig, Path, Path | None]:
    """The eval section (from --config, else the run's own, as its config.yaml or its model folder's
    sftune_inference.json keeps it, else defaults) with overrides, then flags, applied; the output folder; and the
    run folder when `model` is one or is its model/ (the run's curves go into the report)."""
    check_model_path(model)
    run_dir = run_folder_of(model)
    if config_path:
        config = load_config(config_path, overrides).eval
    else:
        config = load_config({"data": {"train": "unused"}, "eval": read_run_settings(model).eval}, overrides).eval
    if flags:
        config = validate_section(EvalConfig, {**config.model_dump(), **flags}, "sftune eval")
    if out is None and run_dir is None:
        raise ConfigError(f"'{model}' is not a run folder: pass --out DIR for the results and report")
    return config, Path(out) if out else Path(run_dir or model) / "eval", run_dir


def check_data_path(data: str) -> None:
    """A --data value that names a file must be one (else it is read as a datasets name)."""
    if Path(data).suffix.lower() in SUPPORTED_EXTENSIONS and not Path(data).is_file():
        raise ConfigError(f"--data file '{data}' does not exist (a relative path starts from the working directory)")


def evaluate_one(
    label: str, path: str, rows: list[PromptRow], config: EvalConfig, progress: bool, fallback_template: str = ""
) -> ModelEval:
    print(f"evaluating {label}: {path} on {len(rows)} rows")
    # --template prompts both models with it; else each its own, a baseline with none the tuned model's.
    require = config.template is not None or not fallback_template
    model, tokenizer = load_for_inference(path, config.device, config.dtype, config.template, require)
    template_source = f"--template {config.template}" if config.template else "its own"
    if not getattr(tokenizer, "chat_template", None) and fallback_template:
        tokenizer.chat_template, template_source = fallback_template, "the tuned model's (it has none)"
    loss = response_loss(model, tokenizer, rows)
    generations = generate_rows(
        model,
        tokenizer,
        rows,
        config.batch_size,
        config.max_new_tokens,
        config.temperature,
        config.top_p,
        progress,
        label,
    )
    aggregate, per_row = score_generations(generations, config.metrics, config.extractor, config.answer_pattern)
    metrics: dict[str, Any] = {**aggregate, "loss": loss, "perplexity": perplexity(loss) if loss is not None else None}
    metrics["template"] = template_source
    del model
    gc.collect()
    return ModelEval(label, path, metrics, generations, per_row, tokenizer.chat_template)


def response_loss(model: Any, tokenizer: Any, rows: list[PromptRow]) -> float | None:
    """Cross-entropy per reference token (the reply and its end-of-turn token), as training measures it."""
    conversations = [as_conversation(row) for row in rows if row.reference is not None]
    if not conversations:
        return None
    built = build_examples(
        conversations, tokenizer, saved_template(tokenizer), "last_assistant", LOSS_MAX_LENGTH, "truncate"
    )
    if not built.examples:
        return None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    loss = TokenLoss.for_model(model)
    return mean_token_loss(loss, built.examples, 8, pad_id, device, contextlib.nullcontext())


def as_conversation(row: PromptRow) -> Conversation:
    """The prompt and its reference as the conversation training would have built: same messages, extras, tools."""
    messages = [
        Message(
            role=m["role"], content=m["content"], extra={k: v for k, v in m.items() if k not in ("role", "content")}
        )
        for m in row.messages
    ]
    reply = Message(role="assistant", content=row.reference or "")
    return Conversation([*messages, reply], source=row.id, tools=row.prompt.tools)


def write_generations(path: Path, rows: list[PromptRow], evaluated: list[ModelEval]) -> None:
    """One line per row: its id, prompt, reference, and each model's output with its per-row scores."""
    with path.open("w") as f:
        for index, row in enumerate(rows):
            record: dict[str, Any] = {"id": row.id, "prompt": row.prompt_text, "reference": row.reference}
            for e in evaluated:
                g = e.generations[index]
                scores = {k: v for k, v in e.per_row[index].items() if k != "id"}
                record[e.label] = {"output": g.output, "finished": g.finished, "num_tokens": g.num_tokens, **scores}
            f.write(json.dumps(record) + "\n")
