"""kill -9 at random points (between steps, inside steps, inside checkpoint writes), then --resume auto, until the
run finishes: the final weights are bit-identical to an uninterrupted run and no step is logged twice."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

from sftune.recipes.sft import train
from tests.conftest import REPO
from tests.e2e.helpers import metric_lines
from tests.helpers import tiny_config

KILLS = 20


@pytest.mark.slow
def test_kill_minus_nine_anywhere_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir):
    settings = {"max_steps": 150, "checkpoint_every": 1, "keep_checkpoints": 2, "precision": "fp32", "num_threads": 1}
    reference = train(tiny_config(tmp_path / "reference", tiny_model_dir, **settings))
    config = tiny_config(tmp_path / "killed", tiny_model_dir, **settings)
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    metrics = tmp_path / "killed" / "run" / "metrics.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    rng, kills, finished = random.Random(0), 0, False
    while not finished:
        child = subprocess.Popen(
            [sys.executable, "-m", "sftune.cli", "train", str(path), "--resume", "auto"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        if kills < KILLS:
            start = metric_lines(metrics)
            target = start + rng.randint(1, 6)  # a few steps in, then somewhere inside the next step or its write
            while child.poll() is None and metric_lines(metrics) < target:
                time.sleep(0.002)
            time.sleep(rng.random() * 0.02)
            if child.poll() is None:
                child.send_signal(signal.SIGKILL)
                kills += 1
        _, err = child.communicate(timeout=300)
        finished = child.returncode == 0
        assert finished or child.returncode == -signal.SIGKILL, err[-2000:]
    assert kills == KILLS
    ours = load_file(str(tmp_path / "killed" / "run" / "model" / "model.safetensors"))
    theirs = load_file(str(reference.model_dir / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all((ours[name] == theirs[name]).all() for name in ours)  # bit-identical
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, 151))
