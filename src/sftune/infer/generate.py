"""Generation with the template saved at training time (or one given with --template, installed as training
installs it), rendered and tokenized exactly as in training."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from sftune.data.masking import build_example
from sftune.data.prompt import prompt_ids as render_prompt_ids
from sftune.data.templates import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    TemplateError,
    install_template,
    resolve_template,
    tokenizer_template,
)
from sftune.data.types import Conversation, Example, Message, Prompt
from sftune.infer.prompts import PromptRow
from sftune.infer.types import Generation, Reply
from sftune.model.load import (
    DEFAULT_MODELS,
    ModelLoadError,
    load_model,
    load_tokenizer,
    looks_like_local_path,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)
from sftune.model.lora import is_adapter_folder, load_merged
from sftune.model.save import generation_eos_ids


def check_model_path(path: str) -> None:
    """A model path that does not exist is reported as such, before anything reads it as a run or a hub id."""
    if Path(path).expanduser().exists() or not (looks_like_local_path(path) or path.endswith(".gguf")):
        return
    kind = "file" if path.endswith(".gguf") else "folder"
    raise ModelLoadError(
        f"no such {kind}: {path}: give a run folder, a model or adapter folder, a .gguf file, a named model "
        f"('{next(iter(DEFAULT_MODELS))}') or a hub id (org/name)"
    )


def resolve_model_dir(path: str) -> str:
    """A run folder holds its model in model/; accept either, and the named/hub/gguf models too."""
    check_model_path(path)
    candidate = Path(path) / "model"
    if (candidate / "config.json").is_file() or is_adapter_folder(candidate):
        return str(candidate)
    return path if is_adapter_folder(path) else resolve_model_path(path)


def load_for_inference(
    path: str, device: str = "auto", dtype: str = "auto", template: str | None = None, require_template: bool = True
) -> tuple[Any, Any]:
    """The model and tokenizer at `path`, ready to prompt: with `template` (a template.name as training takes it:
    a built-in or a .jinja file) installed exactly as training installs it, else with the template saved at
    training; checked before the weights load. `require_template=False` lets a caller supply one afterwards."""
    model_dir = resolve_model_dir(path)
    torch_device = resolve_device(device)
    tokenizer = read_tokenizer(model_dir)
    chosen = inference_template(tokenizer, template, path, require_template)
    if is_adapter_folder(model_dir):  # a LoRA/QLoRA run: the base named in it, in full precision, + the adapter
        model, tokenizer = load_merged(model_dir, resolve_dtype(dtype, torch_device), torch_device)
    else:
        model = load_model(model_dir, resolve_dtype(dtype, torch_device), torch_device)
    if template is not None and chosen is not None:
        use_template(model, tokenizer, chosen)
    model.eval()
    return model, tokenizer


def read_tokenizer(model_dir: str) -> Any:
    # An adapter folder has no config.json, so not load_tokenizer: its tokenizer is read directly (as load_merged).
    return AutoTokenizer.from_pretrained(model_dir) if is_adapter_folder(model_dir) else load_tokenizer(model_dir)


def no_template_message(model_path: str) -> str:
    return (
        f"'{model_path}' has no chat template (its tokenizer has none: a base model, or a model sftune train did "
        f"not save): pass --template NAME_OR_FILE to prompt it as training with template.name=NAME renders it, "
        f"NAME one of {', '.join(BUILTIN_TEMPLATES)}, or a path to a .jinja file"
    )


def inference_template(tokenizer: Any, name: str | None, model_path: str, required: bool = True) -> ChatTemplate | None:
    """`name` resolved exactly as training resolves template.name, else the template saved with the model."""
    if name is not None:
        return resolve_template(name, tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        if required:
            raise TemplateError(no_template_message(model_path))
        return None
    return saved_template(tokenizer)


def use_template(model: Any, tokenizer: Any, template: ChatTemplate) -> None:
    """Install `template` as training does (its special tokens added, the embeddings grown for them) and stop
    generation at its end-of-turn token too, found as the training mask finds it."""
    replaced = getattr(tokenizer, "chat_template", None)
    added = install_template(template, tokenizer)
    note = "; replaces the model's own chat template" if replaced and replaced != tokenizer.chat_template else ""
    print(f"template: {template.describe()} (--template{note})", file=sys.stderr)
    if added:
        model.resize_token_embeddings(len(tokenizer))
        print(
            f"warning: template '{template.name}' adds {added} special tokens this model has never seen; their "
            "embeddings are new, untrained rows (training with this template trains them)",
            file=sys.stderr,
        )
    eos_ids = set(stop_token_ids(model)) | set(generation_eos_ids(tokenizer, template_end_ids(tokenizer, template)))
    model.generation_config.eos_token_id = sorted(eos_ids)


def template_end_ids(tokenizer: Any, template: ChatTemplate) -> set[int]:
    """The end-of-turn token(s) the training mask supervises after a reply, on a probe conversation; none when
    the template cannot render it (rendering the real prompt then reports why)."""
    probe = Conversation([Message("user", "Say hello."), Message("assistant", "Hello there.")], source="probe")
    try:
        example = build_example(tokenizer, template, probe)
    except TemplateError:
        return set()
    return set(example.end_token_ids) if isinstance(example, Example) else set()


def saved_template(tokenizer: Any) -> ChatTemplate:
    """The template saved with the model at training (both named templates where training used two)."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(no_template_message(str(getattr(tokenizer, "name_or_path", "this model"))))
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


def generation_record(row: PromptRow, generation: Generation) -> dict[str, Any]:
    """One line of `sftune generate --output`: the fields GENERATION_FIELDS lists, reference only where the row
    has one."""
    record = {
        "id": row.id,
        "prompt": row.prompt_text,
        "messages": row.messages,
        "output": generation.output,
        "finished": generation.finished,
        "num_tokens": generation.num_tokens,
    }
    return record | ({"reference": row.reference} if row.reference is not None else {})


def write_generation_file(path: str | Path, rows: list[PromptRow], generations: list[Generation]) -> None:
    with Path(path).open("w") as f:
        for row, generation in zip(rows, generations, strict=True):
            f.write(json.dumps(generation_record(row, generation)) + "\n")
