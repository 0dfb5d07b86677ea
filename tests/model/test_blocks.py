"""The decoder blocks a model is sharded and compiled by (model/blocks.py). Compiling itself is opt-in and costs a
cold process about a minute, so these tests check what is compiled, not the compiled run (bench/compare.py does)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sftune.config import UserError, load_config
from sftune.model.blocks import compile_blocks, decoder_layers
from sftune.model.lora import prepare_model


def test_the_blocks_are_the_decoder_layers_under_lora_too(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    layers = decoder_layers(model)
    assert layers == list(model.model.layers)
    config = load_config({"data": {"train": "x.json"}, "train": {"method": "lora"}, "lora": {"r": 4}})
    adapted = prepare_model(model, config)
    assert decoder_layers(adapted) == layers  # found through PEFT's wrapper, the same module objects


def test_compile_marks_every_block_and_nothing_else(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    state_before = set(model.state_dict())
    assert compile_blocks(model) == model.config.num_hidden_layers
    compiled = [name for name, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled == [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)]
    assert set(model.state_dict()) == state_before  # in place: saved names unchanged (no _orig_mod prefix)


def test_a_model_without_named_blocks_is_refused_with_the_way_out():
    with pytest.raises(UserError, match="train.compile=false"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_compile_is_off_by_default():
    assert load_config({"data": {"train": "x.json"}}).train.compile is False
