"""kill -9 a `sftune dpo` run at random points (between steps, inside steps, inside checkpoint or reference-cache
writes), then --resume auto until it finishes: the final weights are bit-identical to an uninterrupted run, no
step is logged twice, and the precomputed reference log-probs are read back from the cache instead of recomputed."""

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

from sftune.model.load import CACHE_ENV
from sftune.recipes.dpo import train_dpo
from tests.conftest import REPO
from tests.e2e.helpers import metric_lines
from tests.helpers import dpo_config

KILLS = 3
STEPS = 10


@pytest.mark.slow  # a long kill-and-resume test: per method an uninterrupted run and 4 launches of the CLI
@pytest.mark.parametrize(("method", "weights"), [("full", "model.safetensors"), ("lora", "adapter_model.safetensors")])
def test_kill_minus_nine_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir, monkeypatch, method, weights):
    settings = {"method": method, "max_steps": STEPS, "checkpoint_every": 1, "num_threads": 1, "learning_rate": 1e-3}
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache-uninterrupted"))
    reference = dpo_config(tmp_path / "uninterrupted", tiny_model_dir, **settings)
    reference.dpo.reference = "precomputed"  # for LoRA too: the cache must survive the kills
    uninterrupted = train_dpo(reference)
    config = dpo_config(tmp_path / "killed", tiny_model_dir, **settings)
    config.dpo.reference = "precomputed"
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    metrics = tmp_path / "killed" / "run" / "metrics.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", CACHE_ENV: str(tmp_path / "cache-killed")}
    rng, outputs, finished = random.Random(0), [], False
    while not finished:
        log = tmp_path / f"launch-{len(outputs)}.out"
        with log.open("w") as out:
            child = subprocess.Popen(
                [sys.executable, "-m", "sftune.cli", "dpo", str(path), "--resume", "auto"],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            if len(outputs) < KILLS:
                target = metric_lines(metrics) + rng.randint(1, 3)  # a few steps in, then inside the next one
                while child.poll() is None and metric_lines(metrics) < target:
                    time.sleep(0.002)
                time.sleep(rng.random() * 0.02)
                if child.poll() is None:
                    child.send_signal(signal.SIGKILL)
            _, err = child.communicate(timeout=300)
        outputs.append(log.read_text())
        finished = child.returncode == 0
        assert finished or child.returncode == -signal.SIGKILL, err[-2000:]
    assert len(outputs) == KILLS + 1
    assert "reference log-probs (train): computing" in outputs[0]
    assert all("reference log-probs (train): cached" in out for out in outputs[1:])  # written before step 1
    assert "resumed from" in outputs[-1]  # (an earlier launch may have been killed before its first checkpoint)
    ours = load_file(str(tmp_path / "killed" / "run" / "model" / weights))
    theirs = load_file(str(uninterrupted.model_dir / weights))
    assert ours.keys() == theirs.keys()
    assert all((ours[name] == theirs[name]).all() for name in ours)  # bit-identical
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, STEPS + 1))
