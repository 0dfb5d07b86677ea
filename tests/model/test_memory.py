"""The memory estimate, from the model config alone: parameter counts, method ordering, and what LoRA targets."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from sftune.config import load_config
from sftune.model.memory import count_lora_parameters, count_model_parameters, estimate_memory, lora_targets

SMOLLM2 = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "tie_word_embeddings": True,
}


def test_parameter_count_matches_a_real_model():
    for tied in (True, False):
        config = LlamaConfig(
            vocab_size=101,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=tied,
        )
        model = LlamaForCausalLM(config)
        assert count_model_parameters(config)["total"] == sum(p.numel() for p in model.parameters())
    assert count_lora_parameters(config, 8) == 3 * 8 * ((32 + 32) * 2 + (32 + 16) * 2 + (32 + 48) * 3)


def test_memory_estimate_orders_full_lora_qlora():
    model_config = LlamaConfig(**SMOLLM2)  # SmolLM2-135M
    config = load_config({"data": {"train": "x.json"}, "lora": {"dropout": 0.0}})
    memory = estimate_memory(model_config, config, micro_batch_tokens=2048)
    assert 130e6 < memory["parameters"] < 140e6 and memory["lora_rank"] == config.lora.r
    assert memory["full_gib"] > memory["lora_gib"] >= memory["qlora_gib"] > memory["activations_gib"] > 0
    for method in ("full", "lora", "qlora"):  # the CPU load peak (mapped file + weights) is a floor for every method
        assert memory[f"{method}_gib"] >= memory["runtime_gib"] + memory["loading_gib"] - 1e-3

    # LoRA dropout keeps a copy of every adapted input (PEFT: one per adapter), q/k/v/gate/up/o 576 values each and
    # down 1536 = (6 x 576 + 1536) values + mask bytes per layer and token.
    dropout = load_config({"data": {"train": "x.json"}, "lora": {"dropout": 0.05}})
    with_dropout = estimate_memory(model_config, dropout, micro_batch_tokens=2048)
    added = 2048 * 30 * (6 * 576 + 1536) * 5 / 2**30
    assert with_dropout["lora_gib"] - memory["lora_gib"] == pytest.approx(added, abs=2e-3)
    assert with_dropout["full_gib"] == memory["full_gib"]

    checkpointed = load_config({"data": {"train": "x.json"}, "train": {"gradient_checkpointing": True}})
    assert estimate_memory(model_config, checkpointed, 2048)["activations_gib"] < memory["activations_gib"] / 4


def test_memory_estimate_counts_only_the_modules_lora_targets():
    model_config = LlamaConfig(**SMOLLM2)
    hidden, inter, layers, rank, kv = 576, 1536, 30, 16, 3 * 64

    def memory(targets, dropout=0.05):
        config = load_config({"data": {"train": "x.json"}, "lora": {"target_modules": targets, "dropout": dropout}})
        return estimate_memory(model_config, config, micro_batch_tokens=2048)

    every, attention, q_v = (
        memory("all-linear"),
        memory(["q_proj", "k_proj", "v_proj", "o_proj"]),
        memory(["q_proj", "v_proj"]),
    )
    # Adapter weights: r x (in + out) per targeted linear and layer.
    assert q_v["lora_parameters"] == layers * rank * ((hidden + hidden) + (hidden + kv))
    assert every["lora_parameters"] > attention["lora_parameters"] > q_v["lora_parameters"]
    assert every["lora_gib"] > attention["lora_gib"] > q_v["lora_gib"]
    assert every["qlora_gib"] > q_v["qlora_gib"]
    assert every["full_gib"] == q_v["full_gib"]  # full fine-tuning has no adapters
    assert q_v["lora_target_modules"] == ["q_proj", "v_proj"]
    # Dropout copies: in_features per adapted linear (PEFT keeps one per adapter), 5 bytes per value.
    no_dropout = memory(["q_proj", "v_proj"], dropout=0.0)
    added = 2048 * layers * 2 * hidden * 5 / 2**30  # a dropout copy of the input of q and of v (PEFT: one each)
    assert q_v["lora_gib"] - no_dropout["lora_gib"] == pytest.approx(added, abs=2e-3)
    # A path suffix matches as PEFT matches it; a name that is no block linear is reported, not silently counted.
    assert lora_targets(model_config, ["self_attn.q_proj", "c_attn"]) == (["q_proj"], ["c_attn"])
    assert memory(["c_attn"])["lora_targets_not_counted"] == ["c_attn"]
    assert count_lora_parameters(model_config, rank, ["down_proj"]) == layers * rank * (inter + hidden)


def test_memory_per_process_follows_the_strategy_and_world_size():
    """fsdp2 shards weights, gradients and optimizer state (per-process memory falls with more ranks, by at most the
    sharded part); ddp keeps a full replica plus gradient buckets on every rank."""
    model_config = LlamaConfig(**SMOLLM2)
    estimates = {}
    for strategy, world in (("auto", 1), ("ddp", 2), ("fsdp2", 2), ("fsdp2", 4)):
        config = load_config({"data": {"train": "x.json"}, "train": {"strategy": strategy}})
        estimates[strategy, world] = estimate_memory(model_config, config, 2048, world_size=world)
    single, ddp, fsdp2, fsdp4 = estimates.values()
    assert (single["strategy"], ddp["strategy"], fsdp2["strategy"]) == ("single", "ddp", "fsdp2")
    for method in ("full", "lora", "qlora"):
        assert ddp[f"{method}_gib"] >= single[f"{method}_gib"]
        assert fsdp4[f"{method}_gib"] <= fsdp2[f"{method}_gib"] <= single[f"{method}_gib"] + 0.1
    params = count_model_parameters(model_config)["total"]
    # full: 16 bytes per weight (weights, 2 states, gradients) split over 4 ranks saves at least 3/4 x 12 bytes
    assert single["full_gib"] - fsdp4["full_gib"] >= params * 12 * 0.75 / 2**30 - 0.05
    assert ddp["full_gib"] - single["full_gib"] == pytest.approx(params * 4 / 2**30, abs=0.01)  # the buckets


def test_a_bf16_frozen_base_halves_the_block_linears_in_the_lora_estimate():
    model_config = LlamaConfig(**SMOLLM2)
    estimates = {}
    for base in ("fp32", "bf16"):
        config = load_config({"data": {"train": "x.json"}, "train": {"method": "lora"}, "lora": {"base_dtype": base}})
        estimates[base] = estimate_memory(model_config, config, micro_batch_tokens=8192)  # training above loading
    saved = count_model_parameters(model_config)["linear"] * 2 / 2**30  # 4 -> 2 bytes per block-linear weight
    assert estimates["fp32"]["lora_gib"] - estimates["bf16"]["lora_gib"] == pytest.approx(saved, abs=2e-3)
    assert estimates["fp32"]["full_gib"] == estimates["bf16"]["full_gib"]  # full trains every weight in fp32


def test_the_estimate_counts_the_chunk_the_loss_holds():
    """The estimate's logits are the chunked loss's chunk: one size, kept in two modules that must agree."""
    from sftune.model import memory
    from sftune.training import loss

    assert memory.CHUNK_LOGITS_BYTES == loss.CHUNK_LOGITS * 4  # fp32 values


def test_offloaded_moments_leave_the_estimate(capsys, monkeypatch):
    """Offloading AdamW's moments removes 8 bytes per trainable weight from the peak, less the one slice the update
    holds (when 'auto' turns it on: tests/training/test_settings.py)."""
    model_config = LlamaConfig(**SMOLLM2)

    def config(**train):
        return load_config({"data": {"train": "x.json"}, "train": {"gradient_checkpointing": True, **train}})

    kept = estimate_memory(model_config, config(offload_optimizer_state=False), 2048)
    offloaded = estimate_memory(model_config, config(offload_optimizer_state=True), 2048)
    params = count_model_parameters(model_config)["total"]
    largest_slice = SMOLLM2["vocab_size"] * SMOLLM2["hidden_size"] * 8  # the embedding's moments
    assert offloaded["optimizer_state_offloaded"] and not kept["optimizer_state_offloaded"]
    assert kept["full_gib"] - offloaded["full_gib"] == pytest.approx((params * 8 - largest_slice) / 2**30, abs=2e-3)


def test_moment_slice_constant_matches_the_optimizer():
    from sftune.host.offload import MOMENT_SLICE_BYTES as OPTIMIZER_SLICE
    from sftune.model.memory import MOMENT_SLICE_BYTES

    assert MOMENT_SLICE_BYTES == OPTIMIZER_SLICE
