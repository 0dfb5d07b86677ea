"""What generation returns: a reply, and a reply to one prompt row with its id and reference (for scoring)."""

from __future__ import annotations

from dataclasses import dataclass

# The fields of each line `sftune generate --input ... --output` writes (reference only where the row has one);
# its --help lists these.
GENERATION_FIELDS = ("id", "prompt", "messages", "output", "finished", "num_tokens", "reference")


@dataclass(frozen=True)
class Reply:
    text: str
    finished: bool  # ended with an end-of-turn token, not cut by max_new_tokens
    num_tokens: int  # generated tokens, the end-of-turn token not counted


@dataclass(frozen=True)
class Generation:
    id: str
    prompt: str  # the last user message, for the report
    reference: str | None
    output: str
    finished: bool  # ended with an end-of-turn token before the max_new_tokens limit
    num_tokens: int  # generated tokens (without the end-of-turn token)
