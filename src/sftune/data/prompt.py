"""The one prompt builder: what inference sends for a conversation, built from the conversation training rendered.

`sftune generate`, `eval`, `chat`, the sample generations during training and the data check's parity test all
call `prompt_for` and `prompt_ids`, so the prompt a model is asked with carries the same messages, system prompt,
tools and per-message extras (an alpaca row's input section, tool calls, names) that its training rows had.
"""

from __future__ import annotations

from typing import Any

from sftune.data.masking import tokenize_rendered
from sftune.data.templates import ChatTemplate, render
from sftune.data.types import Conversation, Prompt

PROMPT_END_ROLES = ("user", "tool")  # a reply answers a user turn, or follows a tool result


def prompt_for(conversation: Conversation, turn: int | None = None) -> Prompt:
    """The messages before assistant message `turn` (default: the last assistant message; a conversation with
    none is a prompt as it is), with the conversation's tools."""
    messages = conversation.messages
    if turn is None:
        turn = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=len(messages))
    return Prompt([m.as_dict() for m in messages[:turn]], conversation.tools)


def can_be_answered(prompt: Prompt) -> bool:
    return bool(prompt.messages) and prompt.messages[-1]["role"] in PROMPT_END_ROLES


def prompt_ids(tokenizer: Any, template: ChatTemplate, prompt: Prompt) -> list[int]:
    """Token ids of the prompt rendered with the generation prompt, tokenized exactly as training tokenizes."""
    text = render(tokenizer, template, prompt.messages, add_generation_prompt=True, tools=prompt.tools)
    ids, _ = tokenize_rendered(tokenizer, text)
    return ids
