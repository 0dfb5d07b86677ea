"""Fuzzed inputs never end in a traceback: every generated row of every format is kept or rejected with a reason
(rows in == kept + rejected), and every generated config or override is a Config or a ConfigError."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from sftune.config import Config, ConfigError, load_config
from sftune.data.dataset import build_examples
from sftune.data.formats import DataError, read_conversations
from sftune.data.templates import resolve_template

CASES = 300  # per format
TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40) | st.sampled_from(
    ["", " ", "\udfff", "</s>", "<|im_end|>", "{{ x }}", "\x00", "a" * 200]
)
SCALAR = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | TEXT
VALUE = st.recursive(
    SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8
)
ROLE = st.sampled_from(["system", "user", "assistant", "tool", "human", "gpt", "function_call", "observation"]) | VALUE
MESSAGE = st.fixed_dictionaries({"role": ROLE, "content": TEXT | VALUE}, optional={"tool_calls": VALUE, "name": VALUE})
TURN = st.fixed_dictionaries({"from": ROLE, "value": TEXT | VALUE})
ROWS = {
    "alpaca": st.fixed_dictionaries(
        {"instruction": TEXT | VALUE, "output": TEXT | VALUE},
        optional={
            "input": TEXT | VALUE,
            "system": TEXT | VALUE,
            "history": VALUE | st.lists(st.lists(TEXT, max_size=3)),
        },
    ),
    "messages": st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=5) | VALUE}, optional={"tools": VALUE}),
    "sharegpt": st.fixed_dictionaries(
        {"conversations": st.lists(TURN, max_size=5) | VALUE}, optional={"system": VALUE, "tools": VALUE}
    ),
    "prompt_completion": st.fixed_dictionaries(
        {
            "prompt": TEXT | st.lists(MESSAGE, max_size=3) | VALUE,
            "completion": TEXT | st.lists(MESSAGE, max_size=2) | VALUE,
        }
    ),
    "text": st.fixed_dictionaries({"text": TEXT | VALUE}),
}
GOOD = {
    "alpaca": {"instruction": "Say hi", "output": "hi"},
    "messages": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    "prompt_completion": {"prompt": "Hi", "completion": "Hello"},
    "text": {"text": "Some text."},
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("fmt", list(ROWS))
def test_every_fuzzed_row_is_kept_or_rejected_with_a_reason(fmt, tokenizer, tmp_path):
    template = resolve_template("chatml", tokenizer)
    seen = {"cases": 0}

    @settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(rows=st.lists(ROWS[fmt], min_size=1, max_size=4), auto=st.booleans())
    def check(rows, auto):
        seen["cases"] += 1
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "rows.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in [GOOD[fmt], *rows]))  # a good first row
            config = load_config({"data": {"train": str(path), "format": "auto" if auto else fmt}})
            try:
                conversations, rejected, _ = read_conversations(str(path), config.data)
            except DataError:
                return  # a whole-file problem, reported as one message
            built = build_examples(conversations, tokenizer, template, max_length=256)
            assert len(rows) + 1 == len(rejected) + built.rows_kept + len(built.rejections)
            assert all(r.reason for r in [*rejected, *built.rejections])

    check()
    assert seen["cases"] >= CASES


KEYS = st.sampled_from(
    ["train.seed", "train.learning_rate", "train.max_grad_norm", "train.adam_betas", "data.max_length", "lora.r",
     "model.dtype", "template.name", "eval.metrics", "nope.key", "train", "train.", ".x", "data.columns"]
)  # fmt: skip
OVERRIDE = st.builds(lambda k, v: f"{k}={v}", KEYS, TEXT) | TEXT


@settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(document=VALUE, overrides=st.lists(OVERRIDE, max_size=3), encoding=st.sampled_from(["utf-8", "utf-16"]))
def test_every_fuzzed_config_is_a_config_or_a_config_error(document, overrides, encoding):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.yaml"
        try:
            text = (
                json.dumps({"data": {"train": "x.json"}, "train": document})
                if isinstance(document, dict)
                else json.dumps(document)
            )
            path.write_bytes(text.encode(encoding, errors="surrogatepass"))
        except UnicodeEncodeError:
            return
        try:
            assert isinstance(load_config(path, overrides), Config)
        except ConfigError as error:
            assert str(error)
