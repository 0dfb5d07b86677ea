"""Trust nothing on disk and stop on bad training: non-finite steps, damaged or malicious checkpoints, torn run
files, signals, values that cannot be right."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sftune.config import ConfigError, load_config
from sftune.recipes.sft import train
from sftune.training.checkpoint import MANIFEST, CheckpointError, list_checkpoints, sha256_file
from sftune.training.run import RunError
from sftune.training.step import NonFiniteError
from tests.conftest import REPO
from tests.helpers import tiny_config

pytestmark = pytest.mark.integration  # train() crashed, signalled, resumed (one config check aside)


def test_a_diverging_run_stops_at_the_first_non_finite_step_and_keeps_a_finite_checkpoint(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, learning_rate=1e6, max_steps=40, checkpoint_every=1, warmup_steps=0)
    with pytest.raises(NonFiniteError, match=r"step \d+: loss .*(is not finite|the model has collapsed)") as raised:
        train(config)
    failed_step = int(str(raised.value).split("step ")[1].split(":")[0])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["step"] < failed_step for r in records if "loss" in r)  # stopped before logging the bad step
    checkpoints = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert checkpoints and int(checkpoints[-1].name.split("-")[1]) == failed_step - 1
    for checkpoint in checkpoints:
        assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint / "trainable.safetensors")).values())
    assert not (tmp_path / "run" / "model").exists()  # no broken model saved


def test_skipping_non_finite_steps_counts_them(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, learning_rate=1e6, max_steps=40, checkpoint_every=None)
    config.train.on_nonfinite = "skip"
    config.train.warmup_steps = 0
    result = train(config)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert result.global_step == 40 and steps[-1]["skipped_steps"] >= 1
    saved = load_file(str(result.model_dir / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())  # skipped updates never reached the weights


@pytest.mark.parametrize(
    "override", ["train.max_grad_norm=-1", "train.adam_betas=[0.9,1.5]", "train.seed=-3", "train.learning_rate=0"]
)
def test_values_that_cannot_be_right_are_refused(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].split(".")[1]):
        load_config({"data": {"train": "x.json"}}, [override])


def interrupted_run(tmp_path, tiny_model_dir):
    """A finished run with checkpoints at steps 2 and 4 of 4, resumable."""
    config = tiny_config(tmp_path, tiny_model_dir, max_steps=4, checkpoint_every=2, keep_checkpoints=3)
    train(config)
    return config, list_checkpoints(tmp_path / "run" / "checkpoints")


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_model_dir, capsys):
    config, (older, newest) = interrupted_run(tmp_path, tiny_model_dir)
    weights = newest / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # flipped bytes in the tensor data: the header still parses
    weights.write_bytes(bytes(data))
    result = train(config, resume="auto")
    out = capsys.readouterr().out
    assert f"skipping {newest}" in out and "sha256" in out and f"resumed from {older}" in out
    assert result.global_step == 4
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps))  # no step twice


def test_a_pickle_payload_in_a_checkpoint_does_not_run(tmp_path, tiny_model_dir):
    config, (_, newest) = interrupted_run(tmp_path, tiny_model_dir)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"optimizer": Payload(), "scheduler": {}}, newest / "optimizer.pt")
    # The attacker rewrites the manifest too, so the checksums match: the unpickler itself must refuse.
    sums = json.loads((newest / MANIFEST).read_text())
    sums["optimizer.pt"] = sha256_file(newest / "optimizer.pt")
    (newest / MANIFEST).write_text(json.dumps(sums))
    with pytest.raises(CheckpointError, match="plain tensors"):
        train(config, resume=str(newest))
    assert not marker.exists()


def test_a_torn_last_metrics_line_and_a_crash_before_any_checkpoint_resume_cleanly(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, max_steps=3, checkpoint_every=None)
    train(config)
    shutil.rmtree(tmp_path / "run" / "model")  # the process died before it saved, with no checkpoint
    metrics = tmp_path / "run" / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 4, "loss": 0.')  # ... and mid-write
    result = train(config, resume="auto")  # no checkpoint: starts over, without the old records
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert result.global_step == 3 and steps == [1, 2, 3]


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_resume_completes(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, max_steps=400, checkpoint_every=None)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "sftune.cli", "train", str(path)], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM: stopped after step" in err and "--resume auto" in err
    checkpoints = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert checkpoints
    stopped_at = int(checkpoints[-1].name.split("-")[1])
    config.train.max_steps = stopped_at + 2
    result = train(config, resume="auto")
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert result.global_step == stopped_at + 2 and steps == list(range(1, stopped_at + 3))


def test_weights_and_checkpoints_get_the_umask_permissions(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, max_steps=2, checkpoint_every=1)
    result = train(config)
    mask = os.umask(0)
    os.umask(mask)
    files = [*result.model_dir.iterdir(), *list_checkpoints(tmp_path / "run" / "checkpoints")[-1].iterdir()]
    assert {f.stat().st_mode & 0o777 for f in files} == {0o666 & ~mask}  # safetensors alone would write 0600


def test_a_pickle_only_model_folder_is_refused_and_its_payload_does_not_run(tmp_path, tiny_model_dir):
    import shutil

    from sftune.model.load import ModelLoadError, load_model

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save(Payload(), folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="allow_pickle"):
        load_model(str(folder), torch.float32, "cpu")
    assert not marker.exists()


def test_relative_paths_in_a_config_start_from_its_folder(tmp_path, tiny_model_dir):
    import shutil

    (tmp_path / "project" / "models").mkdir(parents=True)
    shutil.copytree(tiny_model_dir, tmp_path / "project" / "models" / "tiny")
    (tmp_path / "project" / "data.jsonl").write_text("{}\n")
    (tmp_path / "project" / "run.yaml").write_text(
        yaml.safe_dump(
            {"model": {"name_or_path": "models/tiny"}, "data": {"train": "data.jsonl"}, "output": {"dir": "out"}}
        )
    )
    config = load_config(tmp_path / "project" / "run.yaml", ["train.seed=1"])
    assert config.model.name_or_path == str(tmp_path / "project" / "models" / "tiny")
    assert config.data.train == str(tmp_path / "project" / "data.jsonl")
    assert config.output.dir == str(tmp_path / "project" / "out")
    assert load_config(tmp_path / "project" / "run.yaml", ["output.dir=elsewhere"]).output.dir == "elsewhere"


def test_resume_refuses_a_changed_config_unless_told_and_then_uses_the_new_rate(tmp_path, tiny_model_dir):
    config, _ = interrupted_run(tmp_path, tiny_model_dir)
    changed = config.model_copy(deep=True)
    changed.train.learning_rate = 0.1
    changed.train.max_steps = 6  # training longer is no change to the run itself
    with pytest.raises(RunError, match=r"train.learning_rate: 0.001 -> 0.1.*--resume-changed"):
        train(changed, resume="auto")
    longer = config.model_copy(deep=True)
    longer.train.max_steps = 6
    assert train(longer, resume="auto").global_step == 6  # allowed as it is
    result = train(changed.model_copy(update={"train": changed.train.model_copy(update={"max_steps": 8})}),
                   resume="auto", resume_changed=True)  # fmt: skip
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert rates[8] > 0.001  # above the old peak: the schedule now decays from 0.1


def test_a_run_that_would_not_fit_on_disk_refuses_to_start(tmp_path, tiny_model_dir, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1024))
    with pytest.raises(RunError, match=r"has 1 KiB free, and this run still needs about"):
        train(tiny_config(tmp_path, tiny_model_dir, max_steps=1))
    output = tmp_path / "file-not-folder"
    output.write_text("x")
    config = tiny_config(tmp_path, tiny_model_dir, max_steps=1)
    config.output.dir = str(output)
    monkeypatch.undo()
    with pytest.raises(RunError, match="is a file, not a folder"):
        train(config)
