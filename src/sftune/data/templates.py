"""Chat templates: the tokenizer's own, a built-in, or a Jinja file; resolved once, saved with the output."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from sftune.config import UserError

BUILTIN_TEMPLATES = ("alpaca", "chatml", "llama3", "mistral")

# Special tokens a built-in template needs in the vocabulary; added (and embeddings resized) when missing.
BUILTIN_SPECIAL_TOKENS: dict[str, list[str]] = {
    "alpaca": [],
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "mistral": [],
}


class TemplateError(UserError, ValueError):
    """A template that cannot be used to train correctly; the message says why and how to fix it."""


@dataclass(frozen=True)
class ChatTemplate:
    name: str  # "tokenizer", a built-in name, or the file path
    jinja: str
    special_tokens: tuple[str, ...] = ()

    @property
    def has_generation_markers(self) -> bool:
        return "{% generation %}" in self.jinja or "{%- generation %}" in self.jinja


def read_builtin(name: str) -> str:
    return resources.files("sftune.data").joinpath(f"templates/{name}.jinja").read_text()


def resolve_template(name: str, tokenizer: Any) -> ChatTemplate:
    """'auto' -> the tokenizer's own template, else alpaca (needs no new tokens); or a built-in; or a .jinja path."""
    own = getattr(tokenizer, "chat_template", None)
    if name == "auto":
        return ChatTemplate("tokenizer", own) if isinstance(own, str) and own else _builtin("alpaca")
    if name == "tokenizer":
        if not (isinstance(own, str) and own):
            raise TemplateError(
                "template.name=tokenizer but this tokenizer has no chat template: "
                f"use one of {', '.join(BUILTIN_TEMPLATES)} or a path to a .jinja file"
            )
        return ChatTemplate("tokenizer", own)
    if name in BUILTIN_TEMPLATES:
        return _builtin(name)
    path = Path(name)
    if path.suffix in (".jinja", ".j2") or path.exists():
        if not path.is_file():
            raise TemplateError(f"template file '{path}' does not exist")
        return ChatTemplate(str(path), path.read_text())
    raise TemplateError(
        f"unknown template '{name}': use auto, tokenizer, {', '.join(BUILTIN_TEMPLATES)} or a path to a .jinja file"
    )


def _builtin(name: str) -> ChatTemplate:
    return ChatTemplate(name, read_builtin(name), tuple(BUILTIN_SPECIAL_TOKENS[name]))


def missing_special_tokens(template: ChatTemplate, tokenizer: Any) -> list[str]:
    """Special tokens the template uses that the tokenizer does not know yet."""
    vocab = tokenizer.get_vocab()
    return [token for token in template.special_tokens if token not in vocab]


def install_template(template: ChatTemplate, tokenizer: Any) -> int:
    """Set the template on the tokenizer (so it is saved with it); add missing special tokens.

    Returns how many tokens were added: the caller must resize the model's embeddings when it is > 0.
    """
    missing = missing_special_tokens(template, tokenizer)
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    tokenizer.chat_template = template.jinja
    return len(missing)


def render(
    tokenizer: Any,
    template: ChatTemplate,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """Render messages to text with the template, exactly as training and inference both do."""
    text = tokenizer.apply_chat_template(
        messages,
        chat_template=template.jinja,
        tools=tools,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    return str(text)
