"""Interactive multi-turn chat in the terminal, rendered with the template saved at training time."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

import torch
from transformers import TextStreamer

from sftune.config import GenerateConfig
from sftune.infer.generate import prompt_ids, reply_from_tokens, sampling_arguments, stop_token_ids
from sftune.infer.types import Reply

Message = dict[str, Any]
Read = Callable[[str], str]
Write = Callable[[str], None]

EXIT_COMMANDS = frozenset({"/exit", "/quit"})
RESET_COMMAND = "/reset"
PROMPT = "you> "
REPLY_PREFIX = "assistant> "


class WriteStreamer(TextStreamer):
    """TextStreamer that hands its text to `write` instead of print, so tests and callers choose where it goes."""

    def __init__(self, tokenizer: Any, write: Write) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.write = write

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.write(text + "\n" if stream_end else text)


def write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()  # streamed tokens must show up as they come, not at the next newline


@torch.no_grad()
def stream_reply(
    model: Any, tokenizer: Any, messages: list[Message], settings: GenerateConfig, write: Write = write_stdout
) -> Reply:
    """Generate the assistant's next turn, writing its text as it comes; stops at any end-of-turn id."""
    prompt = prompt_ids(tokenizer, messages)
    input_ids = torch.tensor([prompt], device=next(model.parameters()).device)  # [1, prompt]
    stop_ids = stop_token_ids(model)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=settings.max_new_tokens,
        # One unpadded prompt: pad_token_id only keeps generate from warning that it is unset.
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=stop_ids or None,
        streamer=WriteStreamer(tokenizer, write),
        **sampling_arguments(settings.temperature, settings.top_p),
    )
    return reply_from_tokens(tokenizer, output[0, len(prompt) :].tolist(), stop_ids)


def start_history(system: str | None) -> list[Message]:
    return [{"role": "system", "content": system}] if system else []


def take_turn(
    model: Any, tokenizer: Any, history: list[Message], user_text: str, settings: GenerateConfig, write: Write
) -> list[Message]:
    """One exchange; returns the history with it, or unchanged when the user interrupted the reply."""
    messages = [*history, {"role": "user", "content": user_text}]
    write(REPLY_PREFIX)
    try:
        reply = stream_reply(model, tokenizer, messages, settings, write)
    except KeyboardInterrupt:
        # A half reply would teach the next turn a truncated answer: drop the whole exchange.
        write("\n[reply interrupted; this exchange is not kept]\n")
        return history
    if not reply.finished:  # cut at max_new_tokens before the model closed its turn
        write(f"[stopped at max_new_tokens={settings.max_new_tokens} without end-of-turn]\n")
    return [*messages, {"role": "assistant", "content": reply.text}]


def chat_loop(
    model: Any,
    tokenizer: Any,
    system: str | None,
    settings: GenerateConfig,
    read: Read = input,
    write: Write = write_stdout,
) -> int:
    """Read a line, answer it with the whole conversation so far; /reset, /exit, Ctrl-D and Ctrl-C at the prompt."""
    history = start_history(system)
    while True:
        try:
            line = read(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return 0
        if line in EXIT_COMMANDS:
            return 0
        if line == RESET_COMMAND:
            history = start_history(system)
            write("[history cleared]\n")
        elif line:
            history = take_turn(model, tokenizer, history, line, settings, write)


def enable_line_editing() -> None:
    """input() gets arrow keys and recall of earlier lines once readline is imported (absent on some platforms)."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401
