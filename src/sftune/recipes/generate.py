"""`sftune generate`: replies from a trained model (or a base model with --template), rendered as training renders.

Top to bottom: check the inputs (prompt rows, output folder, model path) -> load the model -> generate -> write.
Nothing slow happens before every input has been read and found usable.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sftune.config import ConfigError, GenerateConfig
from sftune.data.types import Rejection
from sftune.infer.generate import (
    check_model_path,
    generate_replies,
    generate_rows,
    load_for_inference,
    write_generation_file,
)
from sftune.infer.prompts import PromptRow, PromptSettings, read_prompt_rows, to_prompt_row
from sftune.infer.run_settings import read_run_settings


def generate(model_path: str, settings: GenerateConfig, prompt: str | None = None) -> str:
    """The reply to one user message, with settings.system_prompt (else the run's data.system_prompt) as the
    system message."""
    if not prompt:
        raise ConfigError("give a prompt to answer (--prompt TEXT), or --input FILE --output FILE for many")
    check_model_path(model_path)
    run = read_run_settings(model_path, settings.system_prompt)  # the run's, as trained
    # The typed prompt is a user message whatever format the run's rows had; only the run's system prompt applies.
    typed = PromptSettings(system_prompt=run.prompts.system_prompt)
    row = to_prompt_row({"messages": [{"role": "user", "content": prompt}]}, "--prompt", settings=typed)
    if isinstance(row, Rejection):
        raise ConfigError(f"--prompt: {row.detail}")
    model, tokenizer = load_for_inference(model_path, settings.device, settings.dtype, settings.template)
    sampling = (settings.max_new_tokens, settings.temperature, settings.top_p)
    return generate_replies(model, tokenizer, [row.prompt], *sampling)[0].text


def generate_to_file(model_path: str, input_path: str, output_path: str, settings: GenerateConfig) -> dict[str, int]:
    """One JSONL line per prompt row of `input_path`, in batches of settings.batch_size; rejected rows counted
    and reported on stderr, never dropped silently. Rows become prompts as the run's training rows did (its
    columns, format and system prompt); the rows and the output folder are checked before the model loads."""
    check_model_path(model_path)
    rows, rejected = read_input_rows(input_path, model_path, settings)
    check_output_path(output_path)
    model, tokenizer = load_for_inference(model_path, settings.device, settings.dtype, settings.template)
    generations = generate_rows(
        model, tokenizer, rows, settings.batch_size, settings.max_new_tokens, settings.temperature, settings.top_p
    )
    write_generation_file(output_path, rows, generations)
    return {"written": len(rows), "rejected": rejected}


def read_input_rows(input_path: str, model_path: str, settings: GenerateConfig) -> tuple[list[PromptRow], int]:
    """The --input file's prompt rows, read as the run's training rows were; a missing or unreadable file is an
    error, a row without a prompt a counted rejection."""
    if not Path(input_path).is_file():
        kind = "is a folder, not a file" if Path(input_path).is_dir() else "does not exist"
        raise ConfigError(
            f"--input file '{input_path}' {kind}: give a .jsonl, .json, .csv or .parquet file of prompt rows "
            "(a relative path starts from the working directory)"
        )
    run = read_run_settings(model_path, settings.system_prompt)
    kept, rejected = read_prompt_rows(input_path, settings=run.prompts)
    for rejection in rejected:
        print(f"skipped {rejection.source}: {rejection.detail}", file=sys.stderr)
    return kept, len(rejected)


def check_output_path(output_path: str) -> None:
    folder = Path(output_path).resolve().parent
    if Path(output_path).is_dir():
        raise ConfigError(f"--output '{output_path}' is a folder: give the JSONL file to write the generations to")
    if not folder.is_dir():
        raise ConfigError(f"--output '{output_path}': its folder {folder} does not exist: create it first")
