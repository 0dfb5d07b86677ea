"""DPO on torch.distributed (CPU, gloo), 2 processes launched by `sftune dpo --nproc 2`: the same run as one process
with the same global batch. 2 ranks x micro-batch 2 give the per-step loss and metrics (rewards, accuracy, margin,
log-probs), the validation metrics and the final weights of 1 rank x micro-batch 4, for DDP and FSDP2, LoRA (the
adapter switched off as reference, inside the wrapped forward) and full (reference log-probs precomputed by rank 0),
and a frozen copy under DDP (refused under FSDP2), with pairs of different lengths and a last window of one pair (a
rank runs a placeholder pair that adds zero); an FSDP2 run resumed from its sharded checkpoint ends as the whole run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sftune.config import DPOConfig, load_config
from sftune.data.templates import resolve_template
from sftune.model.load import CACHE_ENV
from sftune.model.start import StartingPoint
from sftune.recipes.dpo import reference_mode, train_dpo
from sftune.training.distributed import Distributed, DistributedError, rank_chunks, rank_examples
from sftune.training.loss import TokenLoss
from sftune.training.preference import (
    PreferenceLoss,
    make_pair_batch,
    pair_length,
    pair_placeholder,
    supervises_tokens,
)
from tests.conftest import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
METRICS = ("loss", "rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin", "logps_chosen",
           "logps_rejected")  # fmt: skip


def pair_rows(count: int, offset: int = 0) -> list[dict[str, str]]:
    """Pairs whose prompts and responses differ in length, so ranks see different token counts."""
    return [
        {
            "prompt": "Say " + " ".join(["word"] * (1 + (i * 7) % 19)),
            "chosen": "Yes " * (1 + i % 4) + "done.",
            "rejected": "No " * (1 + (i * 3) % 6),
        }
        for i in range(offset, offset + count)
    ]


def write_config(
    tmp_path: Path, model_dir: Path, name: str, method: str, reference: str = "auto", **train: object
) -> Path:
    """17 training pairs = windows of 8, 8 and 1 (micro-batch 2 x 2 ranks x accumulation 2): the last window has
    fewer pairs than ranks; 5 validation pairs: 3 micro-batches of 2 over 2 ranks (rank 1 runs a placeholder)."""
    for split, rows in (("train", pair_rows(17)), ("validation", pair_rows(5, offset=17))):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {
        "method": method,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 6,  # 2 epochs of 3 windows
        "learning_rate": 5e-3 if method == "lora" else 1e-3,
        "warmup_steps": 0,
        "progress": False,
        "precision": "fp32",
        "num_threads": 1,
        "eval_every": 3,
        "checkpoint_every": 3,
        "keep_checkpoints": 2,
        **train,
    }
    config = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "validation.jsonl")},
        "template": {"name": "chatml"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "base_dtype": "fp32"},  # exact equality
        "dpo": {"beta": 0.5, "reference": reference},
        "train": settings,
        "output": {"dir": str(tmp_path / name), "save_dtype": "fp32"},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_two_processes(config: Path, cache: Path, *args: str) -> Path:
    """`sftune dpo CONFIG --nproc 2` (torchrun), its output to CONFIG.log; `cache`: the reference log-probs' cache."""
    command = [sys.executable, "-m", "sftune.cli", "dpo", str(config), *args, "--nproc", "2"]
    with config.with_suffix(".log").open("a") as log:
        child = subprocess.run(command, cwd=config.parent, env={**ENV, CACHE_ENV: str(cache)}, stdout=log,
                               stderr=subprocess.STDOUT, timeout=600, check=False)  # fmt: skip
    assert child.returncode == 0, config.with_suffix(".log").read_text()[-4000:]
    return config.parent / config.stem


def records(run: Path, key: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


def weights(run: Path) -> dict:
    folder = run / "model"
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(folder / name))


def relative_difference(ours: list[dict], theirs: list[dict], names: list[str]) -> float:
    """The largest difference over steps and metrics, relative to the metric's size over the run (a reward that
    crosses zero is compared at the scale of the run's rewards, not at its own tiny value)."""
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    worst = 0.0
    for name in names:
        scale = max(abs(r[name]) for r in theirs) or 1.0
        worst = max(worst, *(abs(a[name] - b[name]) / scale for a, b in zip(ours, theirs, strict=True)))
    return worst


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """The references: one process, micro-batch 4 (= 2 ranks x 2); their own reference cache."""
    root = tmp_path_factory.mktemp("single")
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(root / "cache"))
        for method in ("full", "lora"):
            runs[method] = train_dpo(load_config(str(write_config(root, tiny_model_dir, method, method,
                                                                  micro_batch_size=4)))).run_dir  # fmt: skip
    return runs


@pytest.mark.parametrize(
    ("strategy", "method", "reference"),
    [
        ("ddp", "full", "auto"),  # precomputed by rank 0
        ("fsdp2", "full", "auto"),
        ("ddp", "lora", "auto"),  # the adapter switched off, inside the wrapped forward
        ("fsdp2", "lora", "auto"),
        ("ddp", "lora", "copy"),  # a frozen copy on each rank (DDP: every rank holds the whole model anyway)
    ],
)
def test_two_ranks_equal_one_rank_with_the_same_global_batch(
    tmp_path, tiny_model_dir, single_runs, strategy, method, reference
):
    config = write_config(tmp_path, tiny_model_dir, "run", method, reference, strategy=strategy)
    run = run_two_processes(config, tmp_path / "c")
    if method == "full":  # rank 0 computed the reference log-probs, once, into this run's own cache
        assert len(list((tmp_path / "c").rglob("train-*.json"))) == 1
    assert_same_run(run, single_runs[method], f"{strategy} {method} ({reference} reference)")
    if (strategy, method) == ("fsdp2", "full"):  # resumed from its step-3 sharded checkpoint: the same run
        resumed = tmp_path / "resumed"
        shutil.copytree(run, resumed)
        for later in ("checkpoints/step-00000006", "model", "manifest.json"):
            shutil.rmtree(resumed / later) if (resumed / later).is_dir() else (resumed / later).unlink()
        config = write_config(tmp_path, tiny_model_dir, "resumed", method, reference, strategy=strategy)
        assert_same_run(run_two_processes(config, tmp_path / "c", "--resume", "auto"), run, "resumed")


def assert_same_run(run: Path, reference: Path, what: str) -> None:
    """Per-step loss and metrics, validation metrics and final weights of `run` equal those of `reference`."""
    ours, theirs = records(run, "loss"), records(reference, "loss")
    assert len(ours) == len(theirs) == 6
    steps = relative_difference(ours, theirs, list(METRICS))
    val_names = ["val_loss", *(f"val_{name}" for name in METRICS[1:])]
    validation = relative_difference(records(run, "val_loss"), records(reference, "val_loss"), val_names)
    ours_w, theirs_w = weights(run), weights(reference)
    assert ours_w.keys() == theirs_w.keys()
    difference = max(float((ours_w[name] - theirs_w[name]).abs().max()) for name in ours_w)
    print(f"{what}: steps {steps:.2e}, validation {validation:.2e}, weights {difference:.2e}")
    assert steps <= 1e-5 and validation <= 1e-5 and difference <= 1e-5
    assert [r["reward_accuracy"] for r in ours] == [r["reward_accuracy"] for r in theirs]
    assert json.loads((run / "manifest.json").read_text())["global_step"] == 6
    assert sorted((run / "checkpoints").glob("step-*"))  # sharded checkpoints written by both ranks
    assert (run / "preference.png").is_file() and (run / "data_summary.json").is_file()


@pytest.mark.parametrize("loss_type", ["sigmoid", "orpo"])
def test_a_placeholder_pair_adds_exactly_zero(tiny_model_dir, loss_type):
    """Loss, gradients, pair count and metrics of pairs + a placeholder pair are those of the pairs alone (ORPO: its
    NLL's mean leaves the placeholder's tokens out)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftune.data.preference import build_pairs, to_pair

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    template = resolve_template("chatml", tokenizer)
    pairs, _ = build_pairs([to_pair(row, f"p:{i}") for i, row in enumerate(pair_rows(3))], tokenizer, template, 256)
    filler = pair_placeholder(pairs[0])
    assert not supervises_tokens(filler) and all(map(supervises_tokens, pairs))
    reference = [(-20.0, -25.0), (-30.0, -22.0)]
    results = []
    for batch in (make_pair_batch(pairs[1:], reference), make_pair_batch([*pairs[1:], filler], [*reference, (0, 0)])):
        model.zero_grad()
        config = DPOConfig(loss=loss_type, beta=0.5)
        objective = PreferenceLoss(TokenLoss.for_model(model), config, adapter_reference=False)
        loss = objective(batch)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((batch.num_pairs, loss.item(), grads, objective.window_metrics()))
    (count, loss, grads, metrics), (count_f, loss_f, grads_f, metrics_f) = results
    assert count == count_f == 2 and metrics.keys() == metrics_f.keys()
    assert abs(loss - loss_f) <= 1e-6 * abs(loss)
    assert all(abs(metrics[k] - metrics_f[k]) <= 1e-5 * max(1.0, abs(metrics[k])) for k in metrics)
    assert max(float((a - b).abs().max()) for a, b in zip(grads, grads_f, strict=True)) <= 1e-6
    # a window of one pair on two ranks: rank 1 gets the placeholder of that pair
    shares = [rank_examples([[0]], pairs, pair_length, Distributed(r, 2, r, "ddp"), pair_placeholder) for r in (0, 1)]
    assert shares[0] == [[pairs[0]]] and shares[1] == [[filler]]


def test_evaluation_chunks_are_dealt_once_over_the_ranks():
    ranks = [rank_chunks(5, 2, Distributed(r, 2, r, "ddp")) for r in (0, 1)]
    assert ranks == [[slice(0, 2), slice(4, 6)], [slice(2, 4), None]]  # rank 1 runs a placeholder in round 2
    assert rank_chunks(5, 2, Distributed()) == [slice(0, 2), slice(2, 4), slice(4, 6)]


def test_a_frozen_reference_copy_is_refused_under_fsdp2(tmp_path, tiny_model_dir):
    config = load_config(str(write_config(tmp_path, tiny_model_dir, "copy", "lora")), ["dpo.reference=copy"])
    start = StartingPoint(str(tiny_model_dir))
    with pytest.raises(DistributedError, match="dpo.reference=copy with train.strategy=fsdp2.*dpo.reference=precomp"):
        reference_mode(config, start, Distributed(0, 2, 0, "fsdp2"))
    assert reference_mode(config, start, Distributed(0, 2, 0, "ddp")) == "copy"
