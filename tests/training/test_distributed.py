"""torch.distributed on CPU (gloo), 2 processes launched by `sftune train --nproc 2` (torchrun): the same run as one
process with the same global batch. 2 ranks x micro-batch 2 give the per-step losses and final weights of 1 rank x
micro-batch 4 (DDP and FSDP2, full and LoRA), with examples of different lengths and a last window smaller than the
world size (a rank runs a placeholder); a 2-process run killed with SIGKILL and resumed ends with the weights of the
uninterrupted one; the FSDP2 outputs load and generate in one process exactly as the one-process model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sftune.config import GenerateConfig, load_config
from sftune.data.types import Example
from sftune.model.lora import quantize_base_to_nf4
from sftune.recipes.generate import generate
from sftune.recipes.sft import train
from sftune.training.checkpoint import CheckpointError
from sftune.training.distributed import (
    Distributed,
    DistributedError,
    check_nf4_shardable,
    placeholder,
    rank_examples,
    split_micro_batch,
)
from tests.conftest import REPO, build_tiny_model, build_tiny_tokenizer

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
PROMPTS = ["Say word word word", "Say word"]


def write_data(path: Path) -> Path:
    """21 rows of very different lengths: 17 train + 4 validation; 17 = 2 windows of 8 and a last one of 1."""
    rows = [
        {"instruction": "Say " + " ".join(["word"] * (1 + (i * 7) % 23)), "input": "", "output": "ok " * (1 + i % 5)}
        for i in range(21)
    ]
    path.write_text(json.dumps(rows))
    return path


def write_config(tmp_path: Path, model_dir: Path, name: str, method: str, **train: object) -> Path:
    settings = {
        "method": method,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 6,  # 3 epochs of 3 windows: epoch ends, a window of one example
        "learning_rate": 1e-3,
        "warmup_steps": 1,
        "progress": False,
        "precision": "fp32",
        "num_threads": 1,
        "checkpoint_every": 1,
        "keep_checkpoints": 2,
        **train,
    }
    config = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(write_data(tmp_path / "data.json")), "validation_fraction": 0.2},
        "lora": {"r": 4, "alpha": 8, "base_dtype": "fp32"},  # exact equality: no bf16 rounding
        "train": settings,
        "output": {"dir": str(tmp_path / name), "save_dtype": "fp32"},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(config: Path, *args: str) -> subprocess.Popen[str]:
    """`sftune train CONFIG --nproc 2`, its output to CONFIG.log."""
    command = [sys.executable, "-m", "sftune.cli", "train", str(config), *args, "--nproc", "2"]
    with config.with_suffix(".log").open("a") as log:
        return subprocess.Popen(command, cwd=config.parent, env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True)


def run_two_processes(config: Path, *args: str) -> Path:
    child = launch(config, *args)
    child.wait(timeout=600)
    assert child.returncode == 0, config.with_suffix(".log").read_text()[-4000:]
    return config.parent / config.stem


def step_losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def weights(run: Path) -> dict:
    folder = run / "model"
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(folder / name))


def max_difference(ours: dict, theirs: dict) -> float:
    assert ours.keys() == theirs.keys()
    return max(float((ours[name] - theirs[name]).abs().max()) for name in ours)


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """The references: one process, micro-batch 4 (= 2 ranks x 2)."""
    root = tmp_path_factory.mktemp("single")
    runs = {}
    for method in ("full", "lora"):
        config = load_config(str(write_config(root, tiny_model_dir, method, method, micro_batch_size=4)))
        runs[method] = train(config).run_dir
    return runs


@pytest.mark.integration
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_ranks_equal_one_rank_with_the_same_global_batch(tmp_path, tiny_model_dir, single_runs, strategy, method):
    config = write_config(tmp_path, tiny_model_dir, "run", method, strategy=strategy)
    run = run_two_processes(config)
    reference = single_runs[method]
    ours, theirs = step_losses(run), step_losses(reference)
    assert len(ours) == len(theirs) == 6
    assert max(abs(a - b) / abs(b) for a, b in zip(ours, theirs, strict=True)) <= 1e-5
    difference = max_difference(weights(run), weights(reference))
    print(f"{strategy} {method}: max |weight difference| {difference:.2e}, losses {ours}")
    assert difference <= 1e-5
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["global_step"] == 6
    report, report_ref = (json.loads((r / "data_report.json").read_text()) for r in (run, reference))
    assert report["tokens_to_train"] == report_ref["tokens_to_train"]  # the same epochs: micro-batch x world size
    # the validation loss too: sharded over the ranks, summed, the same as one process's
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    val_ref = [
        json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines() if "val_loss" in line
    ]
    assert abs(val[-1]["val_loss"] - val_ref[-1]["val_loss"]) <= 1e-5 * val_ref[-1]["val_loss"]
    if strategy == "fsdp2":  # the gathered outputs load in one process and generate as the one-process model does
        settings = GenerateConfig(max_new_tokens=8, device="cpu", dtype="fp32")
        for prompt in PROMPTS:
            assert generate(str(run / "model"), settings, prompt) == generate(
                str(reference / "model"), settings, prompt
            )


@pytest.mark.integration
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_qlora_on_two_ranks_equals_one_rank(tmp_path, tmp_path_factory, strategy):
    """QLoRA: DDP keeps the 4-bit base on every rank (never broadcast: NF4 would not survive it); FSDP2 shards it
    where its packed parts divide by the world size (a model wide enough to have several scale groups per weight)."""
    root = tmp_path_factory.mktemp("wide")
    model_dir = build_tiny_model(
        root / "model", build_tiny_tokenizer(root / "tok"), hidden_size=256, intermediate_size=512, head_dim=64
    )
    single = train(
        load_config(str(write_config(tmp_path, model_dir, "single", "qlora", micro_batch_size=4, max_steps=3)))
    )
    run = run_two_processes(write_config(tmp_path, model_dir, "run", "qlora", strategy=strategy, max_steps=3))
    ours, theirs = step_losses(run), step_losses(single.run_dir)
    assert max(abs(a - b) / abs(b) for a, b in zip(ours, theirs, strict=True)) <= 1e-5
    assert max_difference(weights(run), weights(single.run_dir)) <= 1e-5


def test_fsdp2_refuses_4bit_weights_it_cannot_shard_evenly(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    quantize_base_to_nf4(model)  # 32 x 32 weights: 16 blocks of 64, one scale group: nothing to split in two
    with pytest.raises(DistributedError, match="qlora with strategy fsdp2 on 2 processes.*train.strategy=ddp"):
        check_nf4_shardable(model, 2)
    check_nf4_shardable(model, 1)


@pytest.mark.integration
def test_a_two_process_run_killed_and_resumed_ends_as_the_uninterrupted_one(tmp_path, tiny_model_dir):
    settings = {"strategy": "fsdp2", "max_steps": 12}
    uninterrupted = run_two_processes(write_config(tmp_path, tiny_model_dir, "whole", "lora", **settings))
    config = write_config(tmp_path, tiny_model_dir, "killed", "lora", **settings)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    child = launch(config)
    while child.poll() is None and (not metrics.exists() or metrics.read_text().count('"loss"') < 3):
        time.sleep(0.01)
    assert child.poll() is None, "the run finished before it could be killed"
    # kill -9 the launcher, torchrun and both ranks (torchrun starts each rank in a session of its own), mid-run
    subprocess.run(["pkill", "-KILL", "-f", str(config)], check=False)
    child.wait(timeout=60)
    checkpoints = sorted((tmp_path / "killed" / "checkpoints").glob("step-*"))
    assert checkpoints and int(checkpoints[-1].name[5:]) < 12
    # a different world size is refused with the layout it needs, not resumed wrongly
    with pytest.raises(CheckpointError, match="written by 2 process"):
        train(load_config(str(config)), resume="auto")
    run = run_two_processes(config, "--resume", "auto")
    ours, theirs = weights(run), weights(uninterrupted)
    assert all((ours[name] == theirs[name]).all() for name in ours) and ours.keys() == theirs.keys()
    assert step_losses(run) == step_losses(uninterrupted)


def example(length: int, name: str) -> Example:
    return Example(input_ids=[1] * length, labels=[1] * length, source=name)


def test_a_window_is_split_once_across_ranks_with_balanced_tokens():
    lengths = {0: 90, 1: 10, 2: 50, 3: 40, 4: 60, 5: 20}
    shares = split_micro_batch(list(lengths), lengths, 2)
    assert sorted(shares[0] + shares[1]) == list(lengths)  # every example once
    assert [len(s) for s in shares] == [3, 3]
    totals = [sum(lengths[i] for i in s) for s in shares]
    assert abs(totals[0] - totals[1]) <= 30  # longest-first greedy: 140 / 130 here, not 150 / 120 by position
    examples = [example(n, f"row {i}") for i, n in lengths.items()]
    window = [[0, 1, 2, 3], [4]]  # the last micro-batch holds fewer examples than ranks
    ranks = [rank_examples(window, examples, lambda e: len(e.input_ids), Distributed(r, 2, r, "ddp")) for r in (0, 1)]
    real = [e.source for r in ranks for chunk in r for e in chunk if "placeholder" not in e.source]
    assert sorted(real) == sorted(f"row {i}" for i in (0, 1, 2, 3, 4))
    filler = ranks[1][1][0]  # rank 1 has nothing in the last micro-batch: a placeholder that supervises nothing
    assert filler == placeholder(examples[4]) and set(filler.labels) == {-100}
