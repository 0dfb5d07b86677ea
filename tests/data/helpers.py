"""Helpers of the data tests: a two-turn conversation with a system prompt, the Llama 2 chat template from
../shared, and a tool (get_weather) with a call to it."""

from __future__ import annotations

from sftune.data.templates import ChatTemplate
from sftune.data.types import Conversation, Message
from tests.conftest import shared_path

CONVERSATION = Conversation(
    [
        Message("system", "You answer briefly."),
        Message("user", "Hi there, who are you?"),
        Message("assistant", "I am a small assistant."),
        Message("user", "What is 2+2?"),
        Message("assistant", "2+2 is 4."),
    ],
    source="test:1",
)
ASSISTANT = [m.content for m in CONVERSATION.messages if m.role == "assistant"]

TOOL_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]

# A tool call and its result, then the answer: one row of the glaive tool-call data, by hand.
TOOL_CONVERSATION = Conversation(
    [
        Message("user", "What is the weather in Paris?"),
        Message("assistant", "", {"tool_calls": [TOOL_CALL]}),
        Message("tool", '{"temperature": 21, "sky": "clear"}'),
        Message("assistant", "It is 21 degrees and clear in Paris."),
    ],
    source="tool:1",
    tools=TOOLS,
)


def llama2_template() -> ChatTemplate:
    raw = shared_path("tokenizers", "llama2", "llama-2-chat.jinja").read_text()
    return ChatTemplate("llama-2-chat", "".join(line.strip() for line in raw.splitlines()))
