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


class TemplateRenderError(TemplateError):
    """The template itself raised on a conversation (its own raise_exception, a Jinja error): a problem of that row."""


@dataclass(frozen=True)
class ChatTemplate:
    name: str  # "tokenizer", "tokenizer:<named template>", a built-in name, or the file path
    jinja: str  # for every row (rows without tools, where the tokenizer ships a separate tool_use template)
    special_tokens: tuple[str, ...] = ()
    tools_jinja: str | None = None  # the tokenizer's named 'tool_use' template: rendered for rows with tools

    @property
    def has_generation_markers(self) -> bool:
        return any("{% generation %}" in j or "{%- generation %}" in j for j in (self.jinja, self.tools_jinja or ""))

    def source_for(self, tools: list[dict[str, Any]] | None) -> str:
        """The Jinja text that renders a conversation with (or without) tools."""
        return self.tools_jinja if tools and self.tools_jinja else self.jinja

    @property
    def saved(self) -> str | dict[str, str]:
        """What goes on tokenizer.chat_template (and into the saved model): both named templates where there are
        two, so inference picks tool_use for prompts with tools and default otherwise, exactly as training did."""
        return {"default": self.jinja, "tool_use": self.tools_jinja} if self.tools_jinja else self.jinja

    def describe(self) -> str:
        if self.tools_jinja:
            return f"{self.name} (named templates: tool_use for rows with tools, default for the others)"
        return self.name


def read_builtin(name: str) -> str:
    return resources.files("sftune.data").joinpath(f"templates/{name}.jinja").read_text()


def resolve_template(name: str, tokenizer: Any) -> ChatTemplate:
    """'auto' -> the tokenizer's own template, else alpaca (needs no new tokens); or a built-in; or a .jinja path;
    or, for a tokenizer that ships named templates ({"default": ..., "tool_use": ...}), one of those names."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict) and name in own and name not in ("auto", "tokenizer"):
        return ChatTemplate(f"tokenizer:{name}", own[name])
    if name == "auto" and not own:
        return _builtin("alpaca")
    if name in ("auto", "tokenizer"):
        if not own:
            raise TemplateError(
                "template.name=tokenizer but this tokenizer has no chat template: "
                f"use one of {', '.join(BUILTIN_TEMPLATES)} or a path to a .jinja file"
            )
        return tokenizer_template(own)
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


def tokenizer_template(own: str | dict[str, str]) -> ChatTemplate:
    """The tokenizer's own template; of named ones, 'default' for rows without tools and 'tool_use' for rows with."""
    if isinstance(own, str):
        return ChatTemplate("tokenizer", own)
    default = own.get("default") or (next(iter(own.values())) if len(own) == 1 else None)
    if not default:
        raise TemplateError(
            f"this tokenizer ships the named chat templates {sorted(own)} and none is called 'default': choose one "
            "with template.name=<name>"
        )
    return ChatTemplate("tokenizer", default, tools_jinja=own.get("tool_use"))


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
    tokenizer.chat_template = template.saved
    return len(missing)


def render(
    tokenizer: Any,
    template: ChatTemplate,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """Render messages to text with the template, exactly as training and inference both do. Whatever the template
    raises (its own raise_exception, a missing field, a type error in Jinja) becomes a TemplateError with its message:
    the caller turns it into a rejection of that row."""
    try:
        text = tokenizer.apply_chat_template(
            messages,
            chat_template=template.source_for(tools),
            tools=tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as error:  # jinja2's TemplateError, and what a template's own code raises
        raise TemplateRenderError(f"template '{template.name}' raised {type(error).__name__}: {error}") from error
    return str(text)
