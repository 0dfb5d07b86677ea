"""DPO, IPO, SimPO and ORPO: the losses by their formulas, the reference without a second model, one forward for both
branches, a run that learns the preference, cached reference log-probs, and exact resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sftune.config import DPOConfig, LoraConfig, load_config
from sftune.data.batching import collate_packed
from sftune.data.preference import build_pairs, to_pair
from sftune.data.templates import resolve_template
from sftune.eval.report import plot_run, preference_series
from sftune.model.load import CACHE_ENV
from sftune.model.lora import apply_lora
from sftune.recipes.dpo import train_dpo
from sftune.training.loss import TokenLoss
from sftune.training.preference import (
    PreferenceLoss,
    make_pair_batch,
    preference_loss,
    sequence_logps,
)
from sftune.training.reference import precompute_reference
from tests.helpers import QUESTIONS, dpo_config, write_pairs


def tiny_pairs(tokenizer, count=4):
    template = resolve_template("chatml", tokenizer)
    pairs = [
        to_pair({"prompt": q, "chosen": "Yes, done.", "rejected": "No!"}, f"p:{i}")
        for i, q in enumerate(QUESTIONS[:count])
    ]
    built, dropped = build_pairs(pairs, tokenizer, template, 256)
    assert not dropped
    return built


def test_losses_follow_their_formulas():
    policy = torch.tensor([-3.0, -5.0, -6.0, -4.0])  # chosen (2 pairs), then rejected
    reference = torch.tensor([-4.0, -5.0, -5.0, -4.5])
    counts = torch.tensor([2.0, 4.0, 3.0, 5.0])
    sigmoid, metrics = preference_loss(policy, reference, counts, DPOConfig(beta=0.1))
    logits = 0.1 * torch.tensor([(-3 + 4) - (-6 + 5), (-5 + 5) - (-4 + 4.5)])
    torch.testing.assert_close(sigmoid, -torch.nn.functional.logsigmoid(logits))
    torch.testing.assert_close(metrics["rewards_chosen"], torch.tensor([0.1, 0.0]))
    assert metrics["reward_accuracy"].tolist() == [1.0, 0.0]  # pair 2: 0.0 vs 0.05
    ipo, _ = preference_loss(policy, reference, counts, DPOConfig(loss="ipo", beta=0.5))
    ratio = torch.tensor([1 / 2 - (-1) / 3, 0 / 4 - 0.5 / 5])
    torch.testing.assert_close(ipo, (ratio - 1.0) ** 2)
    simpo, _ = preference_loss(policy, None, counts, DPOConfig(loss="simpo", beta=2.0, simpo_gamma=0.5))
    torch.testing.assert_close(
        simpo, -torch.nn.functional.logsigmoid(2.0 * torch.tensor([-1.5 + 2, -1.25 + 0.8]) - 0.5)
    )
    orpo, metrics = preference_loss(policy, None, counts, DPOConfig(loss="orpo", beta=0.5), torch.tensor(1.25))
    average = torch.tensor([-1.5, -1.25, -2.0, -0.8])  # the odds of an answer: p / (1 - p), p = exp(average)
    odds = torch.exp(average) / (1 - torch.exp(average))
    log_odds = torch.log(odds[:2] / odds[2:])
    torch.testing.assert_close(orpo, 1.25 - 0.5 * torch.nn.functional.logsigmoid(log_odds))
    torch.testing.assert_close(metrics["log_odds_chosen"], log_odds)
    torch.testing.assert_close(metrics["rewards_chosen"], 0.5 * average[:2])
    assert metrics["nll_loss"].tolist() == [1.25, 1.25] and metrics["reward_accuracy"].tolist() == [1.0, 0.0]


def test_one_forward_for_both_branches_equals_separate_forwards(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    loss = TokenLoss.for_model(model)
    pairs = tiny_pairs(tokenizer)
    together, _ = sequence_logps(loss, make_pair_batch(pairs).batch)
    alone = [
        sequence_logps(loss, collate_packed([e]))[0][0] for e in [p.chosen for p in pairs] + [p.rejected for p in pairs]
    ]
    torch.testing.assert_close(together, torch.stack(alone), atol=1e-5, rtol=1e-5)


def test_adapter_off_reference_needs_no_copy_and_starts_at_log_two(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), LoraConfig(r=4), [])
    objective = PreferenceLoss(TokenLoss.for_model(model), DPOConfig(), adapter_reference=True)
    pairs = tiny_pairs(tokenizer)
    loss = objective(make_pair_batch(pairs))  # lora_B starts at zero: policy == reference
    assert math.isclose(float(loss) / len(pairs), math.log(2), rel_tol=1e-6)
    # Precomputed reference log-probs give the same loss as the adapter switched off on the fly.
    reference = precompute_reference(objective.loss, pairs, 2, torch.device("cpu"))
    torch.testing.assert_close(objective(make_pair_batch(pairs, reference)), loss)


def test_a_lora_dpo_run_learns_the_preference(tmp_path, tiny_model_dir):
    result = train_dpo(dpo_config(tmp_path, tiny_model_dir))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)  # policy == reference at the start
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"] and steps[-1]["reward_accuracy"] == 1.0
    validation = [r for r in records if "val_reward_accuracy" in r]
    assert validation[-1]["val_reward_accuracy"] == 1.0
    assert (result.model_dir / "adapter_config.json").is_file()
    counts = json.loads((result.run_dir / "data_summary.json").read_text())
    assert counts["pairs_in"] == 16 == counts["pairs_trained"] + counts["pairs_validation"] + counts["pairs_rejected"]
    # The run's preference curves: every per-step metric the loss logs, and the validation points, plotted.
    assert (result.run_dir / "preference.png").is_file()
    series = preference_series(records)
    for name in (
        "loss",
        "reward_accuracy",
        "reward_margin",
        "rewards_chosen",
        "rewards_rejected",
        "logps_chosen",
        "logps_rejected",
        "val_loss",
        "val_reward_accuracy",
        "val_rewards_chosen",
        "val_logps_rejected",
    ):
        assert series[name] == [(r["step"], r[name]) for r in records if name in r], name  # fmt: skip
    assert [p.name for p in plot_run(result.run_dir, tmp_path)] == ["loss.png", "validation.png", "preference.png"]


def test_a_full_orpo_run_needs_no_reference_and_learns_the_preference(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    config = dpo_config(tmp_path, tiny_model_dir, method="full", max_steps=6, learning_rate=1e-3)
    config.dpo.loss = "orpo"
    result = train_dpo(config)
    out = capsys.readouterr().out
    assert "computing for" not in out and "setting dpo.reference" not in out  # nothing precomputed, nothing resolved
    assert not (tmp_path / "cache").exists() and load_config(result.run_dir / "config.yaml").dpo.reference == "auto"
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    for name in ("nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards_chosen", "reward_margin", "val_nll_loss"):
        assert any(name in r for r in records), name
    assert steps[-1]["loss"] < steps[0]["loss"] and steps[-1]["reward_margin"] > steps[0]["reward_margin"]


def test_full_dpo_uses_cached_reference_and_resumes_exactly(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    full = {"method": "full", "max_steps": 4, "checkpoint_every": 2, "learning_rate": 1e-3}
    whole = train_dpo(dpo_config(tmp_path / "a", tiny_model_dir, **full))
    assert "computing for" in capsys.readouterr().out
    # Interrupted after step 2: the same run with only its step-2 checkpoint, resumed.
    interrupted = dpo_config(tmp_path / "b", tiny_model_dir, **full)
    checkpoints = interrupted.output.dir + "/checkpoints"
    shutil.copytree(whole.run_dir / "checkpoints" / "step-00000002", checkpoints + "/step-00000002")
    result = train_dpo(interrupted, resume="auto")
    assert "cached" in capsys.readouterr().out  # same model, pairs and precision: not computed again
    ours = load_file(str(result.model_dir / "model.safetensors"))
    theirs = load_file(str(whole.model_dir / "model.safetensors"))
    assert result.global_step == 4 and all(torch.equal(ours[name], theirs[name]) for name in ours)


@pytest.mark.parametrize("example", ["dpo_lora.yaml", "orpo.yaml"])
def test_the_shipped_dpo_example_runs_from_the_cli(tmp_path, tiny_model_dir, example):
    from sftune.cli import main
    from tests.conftest import REPO

    overrides = [f"model.name_or_path={tiny_model_dir}", f"output.dir={tmp_path / 'run'}", "train.max_steps=2",
                 "template.name=chatml", "train.progress=false", "train.precision=fp32"]  # fmt: skip
    assert main(["dpo", str(REPO / "examples" / example), *overrides]) == 0
    assert (tmp_path / "run" / "model" / "adapter_config.json").is_file()


def nudged_model(model_dir, seed: int):
    """The tiny model in fp32 with every weight moved by N(0, 0.05^2) noise of `seed`: a policy that differs from it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_rewards_and_gradients_match_trl_dpo_trainer(tiny_model_dir, tmp_path, loss_type):
    """Same tiny model, the same tokenized batch (TRL's own), the same beta: TRL's DPOTrainer and sftune agree."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftune.data.preference import PairExample
    from sftune.data.types import Example

    def policy_model():  # the reference model with every weight nudged: rewards are not zero
        return nudged_model(tiny_model_dir, seed=0)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]}
            for q, c, r in [("Say yes.", "Yes, done.", "No!"), ("Agree?", "I agree.", "Never, ever.")]]  # fmt: skip
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=0.1, loss_type=[loss_type], per_device_train_batch_size=2,
                         report_to="none", use_cpu=True, max_length=256)  # fmt: skip
    reference_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = trl.DPOTrainer(model=policy_model(), ref_model=reference_model, args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer)  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}

    # The same token ids and completion masks as sftune examples: labels on the completion only.
    examples = []
    for ids, mask, completion in zip(
        batch["input_ids"], batch["attention_mask"], batch["completion_mask"], strict=True
    ):
        length = int(mask.sum())
        ids, completion = ids[:length].tolist(), completion[:length].tolist()
        examples.append(Example(ids, [t if c else -100 for t, c in zip(ids, completion, strict=True)]))
    pairs = [PairExample(examples[i], examples[i + 2], f"p{i}") for i in range(2)]
    ours = policy_model()
    # TRL's reference log-probs (its own path) serve as sftune's precomputed reference: both sides then differ only in
    # how they compute the policy's log-probs, the loss, the rewards and the gradients.
    with torch.no_grad():
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        policy_logps = trainer.model(**inputs, labels=labels, fused_lm_head=True).log_probs.sum(1)
        reference_logps = trainer.ref_model(**inputs, labels=labels, fused_lm_head=True).log_probs.sum(1)
    reference = list(zip(reference_logps[:2].tolist(), reference_logps[2:].tolist(), strict=True))
    ours_alone = sequence_logps(TokenLoss.for_model(policy_model()), make_pair_batch(pairs).batch)[0]
    torch.testing.assert_close(ours_alone, policy_logps, atol=1e-4, rtol=1e-5)  # the policy's log-probs themselves
    objective = PreferenceLoss(TokenLoss.for_model(ours), DPOConfig(loss=loss_type, beta=0.1), False)
    our_loss = objective(make_pair_batch(pairs, reference)) / len(pairs)
    our_loss.backward()
    torch.testing.assert_close(our_loss, trl_loss.detach(), atol=1e-4, rtol=1e-4)
    metrics = objective.window_metrics()
    trl_rewards = 0.1 * (policy_logps - reference_logps)  # [chosen, chosen, rejected, rejected]
    assert metrics["rewards_chosen"] == pytest.approx(float(trl_rewards[:2].mean()), abs=1e-4)
    assert metrics["rewards_rejected"] == pytest.approx(float(trl_rewards[2:].mean()), abs=1e-4)
    assert abs(metrics["rewards_chosen"]) > 1e-3  # the nudged policy really differs from the reference
    for name, parameter in ours.named_parameters():
        torch.testing.assert_close(parameter.grad, trl_grads[name], atol=1e-4, rtol=1e-3, msg=name)


def test_simpo_loss_rewards_and_gradients_match_trl_cpo_trainer(tiny_model_dir, tmp_path):
    """The reference-free loss: SimPO is TRL's CPOTrainer with loss_type=simpo and cpo_alpha=0 (trl.experimental).
    Same tiny model, TRL's own tokenized batch, beta and gamma: loss, rewards and gradients agree."""
    pytest.importorskip("trl")
    cpo = pytest.importorskip("trl.experimental.cpo")
    from datasets import Dataset
    from transformers import AutoTokenizer

    def policy_model():  # every weight nudged, so the two answers get clearly different log-probs
        return nudged_model(tiny_model_dir, seed=1)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"prompt": q, "chosen": c, "rejected": r}
            for q, c, r in [("Say yes.", " Yes, done.", " No!"), ("Agree?", " I agree.", " Never, ever.")]]  # fmt: skip
    args = cpo.CPOConfig(output_dir=str(tmp_path), loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.5,
                         per_device_train_batch_size=2, report_to="none", use_cpu=True, max_length=256)  # fmt: skip
    trainer = cpo.CPOTrainer(model=policy_model(), args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer)  # fmt: skip
    trl_loss, trl_metrics, trl_grads, pairs = trl_step(trainer)
    ours = policy_model()
    objective = PreferenceLoss(TokenLoss.for_model(ours), DPOConfig(loss="simpo", beta=2.0, simpo_gamma=0.5), False)
    our_loss = objective(make_pair_batch(pairs)) / len(pairs)
    our_loss.backward()
    torch.testing.assert_close(our_loss, trl_loss.detach(), atol=1e-4, rtol=1e-4)
    metrics = objective.window_metrics()
    assert metrics["rewards_chosen"] == pytest.approx(trl_metrics["rewards/chosen"], abs=1e-4)
    assert metrics["rewards_rejected"] == pytest.approx(trl_metrics["rewards/rejected"], abs=1e-4)
    assert abs(metrics["rewards_chosen"] - metrics["rewards_rejected"]) > 1e-3  # the answers really differ
    for name, parameter in ours.named_parameters():
        torch.testing.assert_close(parameter.grad, trl_grads[name], atol=1e-4, rtol=1e-3, msg=name)


def trl_step(trainer):
    """One TRL preference trainer's loss, metrics and gradients on its first batch, and that batch (TRL's ids and
    labels, the prompt masked) as sftune pairs."""
    from sftune.data.preference import PairExample
    from sftune.data.types import Example

    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    trl_loss.backward()
    trl_grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}

    def branch(name: str, row: int) -> Example:
        length = int(batch[f"{name}_attention_mask"][row].sum())
        return Example(
            batch[f"{name}_input_ids"][row, :length].tolist(), batch[f"{name}_labels"][row, :length].tolist()
        )

    rows = len(batch["chosen_input_ids"])
    pairs = [PairExample(branch("chosen", i), branch("rejected", i), f"p{i}") for i in range(rows)]
    return trl_loss, trl_metrics, trl_grads, pairs


def test_orpo_loss_rewards_metrics_and_gradients_match_trl_orpo_trainer(tiny_model_dir, tmp_path):
    """ORPO (reference-free): TRL's ORPOTrainer (trl.experimental) on the same tiny model, its own tokenized batch and
    beta (lambda): the loss, every metric TRL logs and every gradient agree. TRL's odds use the average response
    log-prob; its NLL is the mean over every token of the chosen sequences, prompt included."""
    pytest.importorskip("trl")
    orpo = pytest.importorskip("trl.experimental.orpo")
    from datasets import Dataset
    from transformers import AutoTokenizer

    def policy_model():
        return nudged_model(tiny_model_dir, seed=1)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"prompt": q, "chosen": c, "rejected": r}
            for q, c, r in [("Say yes.", " Yes, done.", " No!"), ("Agree?", " I agree.", " Never, ever.")]]  # fmt: skip
    args = orpo.ORPOConfig(output_dir=str(tmp_path), beta=0.25, per_device_train_batch_size=2, report_to="none",
                           use_cpu=True, max_length=256)  # fmt: skip
    trainer = orpo.ORPOTrainer(model=policy_model(), args=args, train_dataset=Dataset.from_list(rows),
                               processing_class=tokenizer)  # fmt: skip
    trl_loss, trl_metrics, trl_grads, pairs = trl_step(trainer)
    assert len(pairs[0].chosen.input_ids) != len(pairs[1].chosen.input_ids)  # the NLL's averaging is tested
    ours = policy_model()
    cfg = DPOConfig(loss="orpo", beta=0.25, orpo_nll="full_sequence")  # TRL's NLL includes the prompt
    objective = PreferenceLoss(TokenLoss.for_model(ours), cfg, False)
    objective.reference_logps = None  # ORPO must never ask for a reference
    our_loss = objective(make_pair_batch(pairs)) / len(pairs)
    our_loss.backward()
    torch.testing.assert_close(our_loss, trl_loss.detach(), atol=1e-4, rtol=1e-4)
    metrics = objective.window_metrics()
    names = {"rewards_chosen": "rewards/chosen", "rewards_rejected": "rewards/rejected",
             "reward_accuracy": "rewards/accuracies", "reward_margin": "rewards/margins", "nll_loss": "nll_loss",
             "log_odds_ratio": "log_odds_ratio", "log_odds_chosen": "log_odds_chosen"}  # fmt: skip
    for ours_name, trl_name in names.items():
        assert metrics[ours_name] == pytest.approx(trl_metrics[trl_name], abs=1e-4), ours_name
    assert abs(metrics["reward_margin"]) > 1e-3  # the answers really differ
    for name, parameter in ours.named_parameters():
        torch.testing.assert_close(parameter.grad, trl_grads[name], atol=1e-4, rtol=1e-3, msg=name)


def test_orpo_nll_trains_the_chosen_response_only_unless_full_sequence_is_asked_for(tiny_model_dir):
    """By default the prompt is never trained: ORPO's NLL is the token mean of the chosen responses' -log p, the
    quantity an SFT step on the chosen answers minimises; full_sequence (TRL's) adds the prompt tokens."""
    from sftune.data.preference import PairExample
    from sftune.data.types import IGNORE_INDEX, Example
    from sftune.training.preference import orpo_logps, sequence_logps

    def example(prompt: list[int], reply: list[int]) -> Example:
        return Example(prompt + reply, [IGNORE_INDEX] * len(prompt) + reply)

    pairs = [PairExample(example([5, 6, 7, 8], [9, 10]), example([5, 6, 7, 8], [11]), "p0"),
             PairExample(example([12, 13], [14, 15, 16]), example([12, 13], [17, 18]), "p1")]  # fmt: skip
    batch = make_pair_batch(pairs).batch
    loss = TokenLoss.for_model(nudged_model(tiny_model_dir, seed=1))
    with torch.no_grad():
        sums, counts = sequence_logps(loss, batch)
        _, _, response_nll = orpo_logps(loss, batch, None, "response")
        _, _, full_nll = orpo_logps(loss, batch, None, "full_sequence")
    assert response_nll == pytest.approx(float(-(sums[:2].sum()) / counts[:2].sum()), rel=1e-6)
    assert counts[:2].tolist() == [2, 3] and abs(float(full_nll - response_nll)) > 1e-3  # the prompt counts there


def test_a_frozen_reference_copy_gives_the_loss_of_precomputed_log_probs(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    results = {}
    for mode in ("precomputed", "copy"):
        config = dpo_config(tmp_path / mode, tiny_model_dir, method="full", max_steps=4, learning_rate=1e-3)
        config.dpo.reference = mode
        result = train_dpo(config)
        records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        results[mode] = (records, load_file(str(result.model_dir / "model.safetensors")))
    (precomputed, weights), (copied, copy_weights) = results["precomputed"], results["copy"]
    assert [r["step"] for r in copied] == [r["step"] for r in precomputed] and len(copied) == 5  # 4 steps + eval
    for ours, theirs in zip(copied, precomputed, strict=True):
        for key in ("loss", "rewards_chosen", "rewards_rejected", "reward_margin", "val_loss", "val_reward_margin"):
            if key in theirs:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key
    assert copied[-2]["rewards_chosen"] != 0.0  # the policy moved away from the reference: rewards are measured
    assert all(torch.allclose(copy_weights[name], weights[name], atol=1e-6) for name in weights)


def sft_pair_rows(path):
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Yes, done."}]}
            for q in QUESTIONS]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory, tiny_model_dir):
    """A full and a LoRA SFT run folder (template chatml), trained enough to differ from the base."""
    from sftune.recipes.sft import train

    root = tmp_path_factory.mktemp("sft")
    data = sft_pair_rows(root / "sft.jsonl")
    runs = {}
    for method in ("full", "lora"):
        train_settings = {"method": method, "micro_batch_size": 2, "max_steps": 4, "learning_rate": 5e-3,
                          "warmup_steps": 0, "progress": False, "precision": "fp32"}  # fmt: skip
        config = load_config({
            "model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": str(data)},
            "template": {"name": "chatml"}, "train": train_settings, "lora": {"r": 4},
            "output": {"dir": str(root / method)},
        })  # fmt: skip
        runs[method] = train(config).run_dir
    return runs


def mean_logps(model, tokenizer, pairs_file):
    """Mean chosen and rejected log-probs of the pairs in `pairs_file` under `model`."""
    from sftune.data.preference import read_pairs

    pairs, _ = read_pairs(str(pairs_file))
    built, _ = build_pairs(pairs, tokenizer, resolve_template("chatml", tokenizer), 256)
    with torch.no_grad():
        logps, _ = sequence_logps(TokenLoss.for_model(model.eval()), make_pair_batch(built).batch)
    return float(logps[: len(built)].mean()), float(logps[len(built) :].mean())


@pytest.mark.parametrize(("sft_method", "adapter"), [("full", "merge"), ("lora", "merge"), ("lora", "continue")])
def test_dpo_starts_from_an_sft_run_folder(tmp_path, tiny_model_dir, sft_runs, sft_method, adapter, monkeypatch):
    from transformers import AutoModelForCausalLM

    from sftune.infer.generate import load_for_inference

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    validation = write_pairs(tmp_path / "validation.jsonl", 4)
    config = dpo_config(tmp_path, tiny_model_dir, max_steps=2, learning_rate=1e-9)  # the policy stays where it starts
    config.model.name_or_path = str(sft_runs[sft_method])  # the run folder, not its model/
    config.data.validation_fraction, config.data.validation = 0.0, str(validation)
    config.dpo.adapter = adapter
    result = train_dpo(config)

    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)  # the reference is the starting (SFT) model
    sft_model, tokenizer = load_for_inference(str(sft_runs[sft_method]), "cpu", "fp32")
    sft = mean_logps(sft_model, tokenizer, validation)
    base = mean_logps(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), tokenizer, validation)
    assert abs(sft[0] - base[0]) > 0.05  # SFT changed the model
    assert (records[-1]["val_logps_chosen"], records[-1]["val_logps_rejected"]) == pytest.approx(sft, rel=1e-4)
    adapter_config = json.loads((result.model_dir / "adapter_config.json").read_text())
    expected_base = {
        ("full", "merge"): sft_runs["full"] / "model",
        ("lora", "merge"): result.run_dir / "start_model",  # the SFT adapter merged, in the DPO run's folder
        ("lora", "continue"): tiny_model_dir,
    }[(sft_method, adapter)]
    assert Path(adapter_config["base_model_name_or_path"]).resolve() == expected_base.resolve()
    assert adapter_config["r"] == (4 if adapter == "continue" else 8)  # continued: the SFT adapter itself (r=4)


def test_continuing_an_adapter_refuses_settings_that_cannot_work(tmp_path, tiny_model_dir, sft_runs):
    from sftune.model.lora import AdapterError
    from sftune.training.run import RunError

    config = dpo_config(tmp_path, tiny_model_dir, max_steps=1)
    config.model.name_or_path, config.dpo.adapter = str(sft_runs["lora"]), "continue"
    config.dpo.reference = "adapter_off"
    with pytest.raises(RunError, match="adapter_off cannot give the reference.*model before SFT"):
        train_dpo(config)
    config.train.method, config.output.overwrite = "full", True
    with pytest.raises(AdapterError, match="trained with train.method=lora"):
        train_dpo(config)
