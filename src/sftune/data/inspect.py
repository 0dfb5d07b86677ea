"""Show which tokens of an example are trained: ANSI colour for the terminal, or a self-contained HTML page.

Consecutive tokens with the same supervision are decoded together, so the text reads exactly as the model sees
it; `boundaries` decodes token by token instead and marks where each one starts, `ids` adds the token ids. A
preference pair is shown as its two branches, chosen then rejected.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sftune.data.types import IGNORE_INDEX, Example

if TYPE_CHECKING:
    from sftune.data.preference import PairExample

SUPERVISED_ANSI = "\x1b[1;42;30m"  # black on green: trained
PROMPT_ANSI = "\x1b[2m"  # dim: context only
RESET_ANSI = "\x1b[0m"
LEGEND = "legend: {sup}supervised (trained){reset}  {dim}context (not trained){reset}"
# Without colour (output to a file or a pipe, NO_COLOR set, --color never), trained text is bracketed instead.
SUPERVISED_PLAIN = ("«", "»")


@dataclass(frozen=True)
class Piece:
    """A run of text that is either all supervised or all context, with the token ids it decodes from."""

    text: str
    supervised: bool
    token_ids: tuple[int, ...]


def split_pieces(example: Example, tokenizer: Any, boundaries: bool = False) -> list[Piece]:
    """Runs of equally supervised tokens (one piece per token when `boundaries`), decoded with special tokens."""
    pieces: list[Piece] = []
    current: list[int] = []
    flags = [label != IGNORE_INDEX for label in example.labels]
    for index, token in enumerate(example.input_ids):
        current.append(token)
        last = index + 1 == len(example.input_ids)
        if boundaries or last or flags[index + 1] != flags[index]:
            pieces.append(Piece(tokenizer.decode(current), flags[index], tuple(current)))
            current = []
    return pieces


def supervised_text(example: Example, tokenizer: Any) -> list[str]:
    """The decoded supervised runs of an example: what the highlighting marks."""
    return [piece.text for piece in split_pieces(example, tokenizer) if piece.supervised]


def pair_branches(pair: PairExample) -> list[Example]:
    """The chosen and the rejected branch of a preference pair, each named as such, to show one after the other."""
    return [
        replace(pair.chosen, source=f"{pair.source} [chosen]"),
        replace(pair.rejected, source=f"{pair.source} [rejected]"),
    ]


def render_example_ansi(
    example: Example, tokenizer: Any, ids: bool = False, boundaries: bool = False, colour: bool = True
) -> str:
    """The example as text: supervised pieces in colour, or between « and » when `colour` is off."""
    parts = [f"── {example.source or 'example'}: {len(example.input_ids)} tokens, {example.num_supervised} supervised"]
    body = []
    for piece in split_pieces(example, tokenizer, boundaries):
        start, end = _marks(piece.supervised, colour)
        body.append(f"{start}{_decorate(piece, ids, boundaries)}{end}")
    parts.append("".join(body))
    return "\n".join(parts)


def render_legend_ansi(colour: bool = True) -> str:
    if not colour:
        return "legend: «supervised (trained)»  context (not trained), unmarked"
    return LEGEND.format(sup=SUPERVISED_ANSI, dim=PROMPT_ANSI, reset=RESET_ANSI)


def use_colour(choice: str, stream: Any) -> bool:
    """--color auto: colour only on a terminal, and never with NO_COLOR set (https://no-color.org)."""
    if choice != "auto":
        return choice == "always"
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")


def _marks(supervised: bool, colour: bool) -> tuple[str, str]:
    if colour:
        return (SUPERVISED_ANSI if supervised else PROMPT_ANSI), RESET_ANSI
    return SUPERVISED_PLAIN if supervised else ("", "")


def _decorate(piece: Piece, ids: bool, boundaries: bool) -> str:
    text = piece.text
    if ids:
        text = f"{text}[{' '.join(map(str, piece.token_ids))}]"
    return f"|{text}" if boundaries else text


def render_examples_html(examples: list[Example], tokenizer: Any, ids: bool = False, boundaries: bool = False) -> str:
    """A self-contained page: supervised tokens on green, context greyed, one block per example."""
    blocks = []
    for example in examples:
        spans = []
        for piece in split_pieces(example, tokenizer, boundaries):
            title = " ".join(map(str, piece.token_ids))
            css = "sup" if piece.supervised else "ctx"
            spans.append(f'<span class="{css}" title="{title}">{html.escape(_decorate(piece, ids, boundaries))}</span>')
        header = html.escape(f"{example.source}: {len(example.input_ids)} tokens, {example.num_supervised} supervised")
        blocks.append(f"<h2>{header}</h2>\n<pre>{''.join(spans)}</pre>")
    return HTML_PAGE.format(body="\n".join(blocks))


HTML_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>sftune data inspect</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
pre {{ white-space: pre-wrap; font-size: 14px; line-height: 1.5; border: 1px solid #ccc; padding: 1em; }}
.sup {{ background: #b6f2b6; }}
.ctx {{ color: #888; }}
h2 {{ font-size: 15px; }}
</style></head><body>
<p>legend: <span class="sup">supervised (trained)</span> <span class="ctx">context (not trained)</span>;
hover a span for its token ids</p>
{body}
</body></html>
"""
