"""The one loop under every objective: what it guarantees, it guarantees to SFT and DPO alike (train.log_every, the
free-disk check before step 1, one metrics record per logged step)."""

from __future__ import annotations

import json
from collections import namedtuple

import pytest

from sftune.recipes.dpo import train_dpo
from sftune.recipes.sft import train
from sftune.training import run_folder
from sftune.training.run import RunError
from tests.helpers import dpo_config, tiny_config

pytestmark = pytest.mark.integration  # every test runs train() or train_dpo()

RECIPES = {
    "sft": lambda tmp_path, model_dir, **train_: train(tiny_config(tmp_path, model_dir, checkpoint_every=None,
                                                                   **train_)),
    "dpo": lambda tmp_path, model_dir, **train_: train_dpo(dpo_config(tmp_path, model_dir, **train_)),
}  # fmt: skip


def step_records(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


@pytest.mark.parametrize("objective", sorted(RECIPES))
def test_every_recipe_logs_every_log_every_steps_and_the_last(objective, tmp_path, tiny_model_dir):
    result = RECIPES[objective](tmp_path, tiny_model_dir, max_steps=5, log_every=2)
    assert result.global_step == 5
    assert step_records(result.run_dir) == [2, 4, 5]


@pytest.mark.parametrize("objective", sorted(RECIPES))
def test_every_recipe_refuses_a_full_disk_before_step_1(objective, tmp_path, tiny_model_dir, monkeypatch):
    disk = namedtuple("usage", "total used free")
    monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda path: disk(10**12, 10**12 - 1024, 1024))
    with pytest.raises(RunError, match="KiB free, and this run still needs about"):
        RECIPES[objective](tmp_path, tiny_model_dir, max_steps=2)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before any step
    assert not (tmp_path / "run" / "model").exists()
