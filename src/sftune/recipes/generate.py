"""`sftune generate`: replies from a trained model, rendered with the template saved at training time."""

from __future__ import annotations

from sftune.config import ConfigError, GenerateConfig
from sftune.infer.generate import generate_file, generate_replies, load_for_inference


def generate(model_path: str, settings: GenerateConfig, prompt: str | None = None) -> str:
    """The reply to one user message (with settings.system_prompt as the system message, if set)."""
    if not prompt:
        raise ConfigError("give a prompt to answer (--prompt TEXT), or --input FILE --output FILE for many")
    model, tokenizer = load_for_inference(model_path, settings.device, settings.dtype)
    system = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []
    messages = [*system, {"role": "user", "content": prompt}]
    replies = generate_replies(
        model, tokenizer, [messages], settings.max_new_tokens, settings.temperature, settings.top_p
    )
    return replies[0].text


def generate_to_file(model_path: str, input_path: str, output_path: str, settings: GenerateConfig) -> dict[str, int]:
    """One JSONL line per prompt row of `input_path`, in batches of settings.batch_size; rejected rows counted."""
    model, tokenizer = load_for_inference(model_path, settings.device, settings.dtype)
    return generate_file(model, tokenizer, input_path, output_path, settings)
