"""Chat-template families written as Jinja (Llama 3, ChatML/Qwen, Gemma, Phi-3, Mistral), each on a real tokenizer
from ../shared with the family's special tokens added as a model of that family ships them."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoTokenizer

from sftune.data.templates import ChatTemplate
from tests.conftest import shared_path


@dataclass(frozen=True)
class Family:
    name: str
    tokenizer: str  # folder in ../shared/tokenizers
    jinja: str | None  # None: the tokenizer's own template
    special_tokens: tuple[str, ...]
    end_token: str  # the text of the token that closes an assistant turn


FAMILIES = [
    Family(
        "llama3",
        "qwen2.5",  # its pre-tokenizer splits newline runs as Llama 3's does: the prompt's '\n\n' stays one token
        "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
        "{{ m.content | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|eot_id|>",
    ),
    Family("qwen-chatml", "qwen2.5", None, (), "<|im_end|>"),
    Family(
        "gemma",
        "llama2",
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
        "{{ m.content | trim }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
        ("<start_of_turn>", "<end_of_turn>"),
        "<end_of_turn>",
    ),
    Family(
        "phi3",
        "smollm2",
        "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}",
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        "<|end|>",
    ),
    Family(
        "mistral",
        "llama2",
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
        "{% else %}{{ ' ' + m.content + eos_token }}{% endif %}{% endfor %}",
        (),
        "</s>",
    ),
]


def family_tokenizer_and_template(family: Family):
    """A fresh tokenizer (adding tokens changes it) with the family's special tokens, and its template."""
    tokenizer = AutoTokenizer.from_pretrained(shared_path("tokenizers", family.tokenizer))
    if family.special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(family.special_tokens)})
    own = tokenizer.chat_template
    return tokenizer, ChatTemplate(family.name, family.jinja if family.jinja is not None else own)
