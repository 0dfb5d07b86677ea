"""Generation with the template saved at training time, rendered and tokenized exactly as in training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sftune.data.masking import tokenize_rendered
from sftune.data.templates import ChatTemplate, TemplateError, render
from sftune.model.load import load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_model_path
from sftune.model.lora import is_adapter_folder, load_merged


def resolve_model_dir(path: str) -> str:
    """A run folder holds its model in model/; accept either, and the named/hub/gguf models too."""
    candidate = Path(path) / "model"
    if (candidate / "config.json").is_file() or is_adapter_folder(candidate):
        return str(candidate)
    return path if is_adapter_folder(path) else resolve_model_path(path)


def load_for_inference(path: str, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    model_dir = resolve_model_dir(path)
    torch_device = resolve_device(device)
    if is_adapter_folder(model_dir):  # a LoRA/QLoRA run: the base named in it, in full precision, + the adapter
        model, tokenizer = load_merged(model_dir, resolve_dtype(dtype, torch_device), torch_device)
    else:
        tokenizer = load_tokenizer(model_dir)
        model = load_model(model_dir, resolve_dtype(dtype, torch_device), torch_device)
    model.eval()
    return model, tokenizer


def saved_template(tokenizer: Any) -> ChatTemplate:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("this model's tokenizer has no chat template: it was not saved by sftune train")
    return ChatTemplate("saved", tokenizer.chat_template)


def prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    text = render(tokenizer, saved_template(tokenizer), messages, add_generation_prompt=True)
    ids, _ = tokenize_rendered(tokenizer, text)
    return ids


@torch.no_grad()
def generate_batch(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict[str, Any]]],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> list[str]:
    """Replies to each conversation; greedy when temperature == 0. Stops at any end-of-turn id."""
    prompts = [prompt_ids(tokenizer, messages) for messages in conversations]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    # Left padding: every prompt then ends where generation starts.
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=model.generation_config.eos_token_id,
        **sampling,
    )
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in output]
