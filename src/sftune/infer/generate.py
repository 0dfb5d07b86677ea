"""Generation with the template saved at training time, rendered and tokenized exactly as in training."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sftune.config import GenerateConfig
from sftune.data.prompt import prompt_ids as render_prompt_ids
from sftune.data.templates import ChatTemplate, TemplateError, tokenizer_template
from sftune.data.types import Prompt
from sftune.infer.prompts import PromptRow, PromptSettings, read_prompt_rows
from sftune.infer.types import Generation, Reply
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
    """The template saved with the model at training (both named templates where training used two)."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("this model's tokenizer has no chat template: it was not saved by sftune train")
    return replace(tokenizer_template(tokenizer.chat_template), name="saved")


def prompt_ids(tokenizer: Any, prompt: Prompt | list[dict[str, Any]]) -> list[int]:
    """What generation feeds the model: the prompt through the one prompt builder, with the saved template."""
    prompt = prompt if isinstance(prompt, Prompt) else Prompt(list(prompt))
    return render_prompt_ids(tokenizer, saved_template(tokenizer), prompt)


def sampling_arguments(temperature: float, top_p: float) -> dict[str, Any]:
    """Greedy at temperature 0, else nucleus sampling."""
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p}
    return {"do_sample": False}


def stop_token_ids(model: Any) -> list[int]:
    """The ids generation stops at: the saved generation_config's eos (sftune puts the end-of-turn token there)."""
    eos = model.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


@torch.no_grad()
def generate_replies(
    model: Any,
    tokenizer: Any,
    prompts: list[Prompt] | list[list[dict[str, Any]]],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: list[int] | None = None,
) -> list[Reply]:
    """Replies to each conversation, in one batch; greedy when temperature == 0. Stops at any end-of-turn id
    (`stop_ids`, by default the model's generation_config eos, where sftune saves the end-of-turn token)."""
    prompt_tokens = [prompt_ids(tokenizer, prompt) for prompt in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompt_tokens)
    device = next(model.parameters()).device
    # Left padding: every prompt then ends where generation starts.
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompt_tokens], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_tokens], device=device)
    stop_ids = stop_ids or stop_token_ids(model)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=stop_ids or None,
        use_cache=True,
        **sampling_arguments(temperature, top_p),
    )
    return [reply_from_tokens(tokenizer, row[width:].tolist(), stop_ids) for row in output]


def reply_from_tokens(tokenizer: Any, tokens: list[int], stop_ids: list[int]) -> Reply:
    """Cut at the first end-of-turn id (what follows it in a batch is padding)."""
    end = next((i for i, t in enumerate(tokens) if t in stop_ids), None)
    kept = tokens if end is None else tokens[:end]
    return Reply(tokenizer.decode(kept, skip_special_tokens=True).strip(), end is not None, len(kept))


def generate_rows(
    model: Any,
    tokenizer: Any,
    rows: list[PromptRow],
    batch_size: int = 16,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    progress: bool = True,
    desc: str = "generate",
) -> list[Generation]:
    """Batched generation over every row, with a progress bar; results keep the rows' ids and order."""
    generations: list[Generation] = []
    with tqdm(total=len(rows), desc=desc, unit="row", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            replies = generate_replies(model, tokenizer, [r.prompt for r in chunk], max_new_tokens, temperature, top_p)
            for row, reply in zip(chunk, replies, strict=True):
                generations.append(
                    Generation(row.id, row.prompt_text, row.reference, reply.text, reply.finished, reply.num_tokens)
                )
            bar.update(len(chunk))
    return generations


def generate_file(
    model: Any,
    tokenizer: Any,
    input_path: str,
    output_path: str,
    settings: GenerateConfig,
    prompt_settings: PromptSettings | None = None,
) -> dict[str, int]:
    """`sftune generate --input`: one output line per readable row, in order, with the row's id; rejected rows
    (no prompt to answer) are counted and reported on stderr, never dropped silently."""
    prompt_settings = prompt_settings or PromptSettings(system_prompt=settings.system_prompt)
    rows, rejected = read_prompt_rows(input_path, settings=prompt_settings)
    for rejection in rejected:
        print(f"skipped {rejection.source}: {rejection.detail}", file=sys.stderr)
    generations = generate_rows(
        model, tokenizer, rows, settings.batch_size, settings.max_new_tokens, settings.temperature, settings.top_p
    )
    with Path(output_path).open("w") as f:
        for row, g in zip(rows, generations, strict=True):
            record = {"id": row.id, "messages": row.messages, "output": g.output, "finished": g.finished}
            record |= {
                "num_tokens": g.num_tokens,
                **({"reference": row.reference} if row.reference is not None else {}),
            }
            f.write(json.dumps(record) + "\n")
    return {"written": len(rows), "rejected": len(rejected)}
