"""`sftune generate`: replies from a trained model, rendered with the template saved at training time."""

from __future__ import annotations

from sftune.config import ConfigError, GenerateConfig
from sftune.data.types import Rejection
from sftune.infer.generate import generate_file, generate_replies, load_for_inference
from sftune.infer.prompts import run_prompt_settings, to_prompt_row


def generate(model_path: str, settings: GenerateConfig, prompt: str | None = None) -> str:
    """The reply to one user message, with settings.system_prompt (else the run's data.system_prompt) as the
    system message."""
    if not prompt:
        raise ConfigError("give a prompt to answer (--prompt TEXT), or --input FILE --output FILE for many")
    model, tokenizer = load_for_inference(model_path, settings.device, settings.dtype)
    system = run_prompt_settings(model_path, settings.system_prompt).system_prompt  # the run's, as trained
    row = to_prompt_row({"messages": [{"role": "user", "content": prompt}]}, "--prompt", system)
    if isinstance(row, Rejection):
        raise ConfigError(f"--prompt: {row.detail}")
    sampling = (settings.max_new_tokens, settings.temperature, settings.top_p)
    return generate_replies(model, tokenizer, [row.prompt], *sampling)[0].text


def generate_to_file(model_path: str, input_path: str, output_path: str, settings: GenerateConfig) -> dict[str, int]:
    """One JSONL line per prompt row of `input_path`, in batches of settings.batch_size; rejected rows counted.
    Rows become prompts as the run's training rows did (its columns, format and system prompt)."""
    model, tokenizer = load_for_inference(model_path, settings.device, settings.dtype)
    prompts = run_prompt_settings(model_path, settings.system_prompt)
    return generate_file(model, tokenizer, input_path, output_path, settings, prompts)
