"""Every `auto` resolved in one function (training/settings.py): the hardware rules, the memory budget, the optimizer
offload, the DPO reference, and each decision printed and written into the run folder's config.yaml."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import LlamaConfig

from sftune.config import load_config
from sftune.model.memory import ESTIMATE_MARGIN, count_model_parameters, estimate_memory
from sftune.recipes.dpo import train_dpo
from sftune.recipes.sft import train
from sftune.training import settings
from sftune.training.settings import resolve_settings
from tests.helpers import dpo_config, tiny_config

CPU = torch.device("cpu")
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)  # fmt: skip


def config(method: str = "lora", **train):
    return load_config({"data": {"train": "x.json"}, "train": {"method": method, **train}})


def decided(result: settings.Settings) -> dict[str, object]:
    return {d.key: d.value for d in result.decisions}


@pytest.mark.parametrize("native", [True, False])
def test_hardware_settings_resolve_to_concrete_values(monkeypatch, native):
    """lora.base_dtype bf16 exactly where bf16 is native; checkpointing auto = on, on a CPU, for lora on a bf16 base
    and for full fine-tuning; explicit choices are kept; resolving twice changes nothing."""
    monkeypatch.setattr(settings, "bf16_supported", lambda device: native)
    lora = resolve_settings(config(), CPU)
    assert lora.config.lora.base_dtype == ("bf16" if native else "fp32")
    assert lora.config.train.gradient_checkpointing is native
    assert lora.precision == lora.config.train.precision == ("bf16-mixed" if native else "fp32")
    full = resolve_settings(config("full"), CPU)
    assert full.config.train.gradient_checkpointing is True and full.config.lora.base_dtype == "auto"  # unused
    kept = resolve_settings(config(gradient_checkpointing=False), CPU)
    assert kept.config.train.gradient_checkpointing is False
    assert "train.gradient_checkpointing" not in decided(kept)  # nothing to decide: nothing said
    again = resolve_settings(lora.config, CPU)
    assert again.config.train == lora.config.train and again.config.lora == lora.config.lora
    assert resolve_settings(config(), CPU, world_size=2, estimate=None).config.train.strategy == "ddp"
    sharded = resolve_settings(config(strategy="fsdp2"), CPU, world_size=2)
    assert sharded.config.lora.base_dtype == "fp32"  # FSDP2 shards a layer in one dtype


def test_on_a_gpu_no_recompute(monkeypatch):
    monkeypatch.setattr(settings, "bf16_supported", lambda device: True)
    on_gpu = resolve_settings(config(), torch.device("cuda"))
    assert on_gpu.config.lora.base_dtype == "bf16" and on_gpu.config.train.gradient_checkpointing is False


def lora_memory():
    model_config = LlamaConfig(**SMOLLM2)
    plain = estimate_memory(model_config, config(gradient_checkpointing=False), micro_batch_tokens=4096)
    checkpointed = estimate_memory(model_config, config(gradient_checkpointing=True), micro_batch_tokens=4096)
    return {**plain, "with_checkpointing_gib": {"lora": checkpointed["lora_gib"]}}


def test_memory_budget_switches_on_activation_checkpointing_only_where_needed():
    memory = lora_memory()
    assert memory["with_checkpointing_gib"]["lora"] < memory["lora_gib"]

    def checkpointing(**train):
        result = resolve_settings(config(gradient_checkpointing=False, **train), CPU, estimate=lambda c: memory)
        return result.config.train.gradient_checkpointing, decided(result)

    assert checkpointing(memory_budget_gib=memory["lora_gib"] + 1) == (False, checkpointing()[1])
    on, decisions = checkpointing(memory_budget_gib=memory["lora_gib"] - 0.01)
    assert on is True and decisions["train.gradient_checkpointing"] is True  # said, with its reason
    assert checkpointing()[0] is False  # no budget, no change


def test_offload_auto_is_on_only_where_the_estimate_does_not_fit(monkeypatch):
    model_config = LlamaConfig(**SMOLLM2)
    cfg = config("full", gradient_checkpointing=True)
    kept = estimate_memory(model_config, cfg, 2048)
    offloaded = estimate_memory(model_config, config("full", offload_optimizer_state=True), 2048)
    memory = {**kept, "with_checkpointing_gib": {"full": kept["full_gib"]},
              "with_offload_gib": {"full": offloaded["full_gib"]}}  # fmt: skip

    def resolved(available_gib, method="full", device=CPU, world_size=1, **train):
        base = config(method, gradient_checkpointing=True, **train)
        result = resolve_settings(base, device, world_size, lambda c: memory,
                                  available_bytes=int(available_gib * 2**30))  # fmt: skip
        return result.config.train.offload_optimizer_state

    assert resolved(100) is False  # roomy: no budget, plenty available
    assert resolved(kept["full_gib"] - 0.1) is True
    assert resolved(100, memory_budget_gib=kept["full_gib"] - 0.1) is True
    assert resolved(100, memory_budget_gib=kept["full_gib"] * ESTIMATE_MARGIN + 0.1) is False
    assert resolved(kept["full_gib"] * ESTIMATE_MARGIN - 0.1) is True  # within the estimate's margin: offloaded
    assert resolved(1, offload_optimizer_state=False) is False  # an explicit setting is kept
    assert resolved(1, method="lora") is False  # adapters' optimizer state: nothing worth a file
    assert resolved(1, world_size=2, strategy="fsdp2") is False  # shards divide the state already
    no_estimate = resolve_settings(config("full"), CPU, estimate=None, available_bytes=2**30)
    assert no_estimate.config.train.offload_optimizer_state is False
    monkeypatch.setattr(settings, "is_ram_backed", lambda folder: True)
    assert resolved(1) is False  # a run folder on tmpfs: the file would stay in RAM
    assert count_model_parameters(model_config)["total"] > 0


def test_dpo_reference_auto_follows_the_adapter():
    lora = resolve_settings(config("lora"), CPU, objective="dpo")
    assert lora.config.dpo.reference == "adapter_off"
    continued = resolve_settings(config("lora"), CPU, continued_adapter=True, objective="dpo")
    assert continued.config.dpo.reference == "precomputed"
    assert resolve_settings(config("full"), CPU, objective="dpo").config.dpo.reference == "precomputed"
    assert resolve_settings(config("lora"), CPU).config.dpo.reference == "auto"  # an SFT run has no reference


def test_deprecated_release_freed_memory_is_ignored_and_said():
    result = resolve_settings(config(release_freed_memory=True), CPU)
    assert result.config.train.release_freed_memory is False
    assert "deprecated" in {d.key: d.reason for d in result.decisions}["train.release_freed_memory"]
    fused = resolve_settings(load_config({"data": {"train": "x.json"}, "lora": {"fuse_shared_inputs": True}}), CPU)
    assert fused.config.lora.fuse_shared_inputs is False and "lora.fuse_shared_inputs" in decided(fused)


@pytest.mark.integration
def test_a_run_prints_and_records_every_decision(tmp_path, tiny_model_dir, capsys):
    """The run log says each `auto` with its reason; config.yaml holds the value the run used with the same reason
    beside it, and loads back as a config."""
    result = train(tiny_config(tmp_path, tiny_model_dir, checkpoint_every=None, max_steps=1))
    out = capsys.readouterr().out
    for key in (
        "train.precision",
        "train.gradient_checkpointing",
        "train.offload_optimizer_state",
        "output.save_dtype",
    ):
        assert f"setting {key}: auto -> " in out
    text = (result.run_dir / "config.yaml").read_text()
    written = yaml.safe_load(text)
    assert written["train"]["precision"] in ("fp32", "bf16-mixed")
    assert written["train"]["gradient_checkpointing"] in (True, False)
    assert written["train"]["offload_optimizer_state"] in (True, False)
    assert "gradient_checkpointing: " in text and "# auto -> " in text
    assert load_config(str(result.run_dir / "config.yaml")).train.precision == written["train"]["precision"]


@pytest.mark.integration
def test_a_dpo_run_records_its_reference_decision(tmp_path, tiny_model_dir, capsys):
    result = train_dpo(dpo_config(tmp_path, tiny_model_dir, max_steps=1))
    assert "setting dpo.reference: auto -> adapter_off" in capsys.readouterr().out
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["dpo"]["reference"] == "adapter_off"
