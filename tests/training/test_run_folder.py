"""A run folder nothing can clobber: `--resume auto` never retrains over a finished model, one writer at a time (a
stale lock taken over), a full disk during a checkpoint or the final save is one message and loses no finished
step, unknown names in checkpoints/ are ignored, the free-space check counts what is already on disk, and the
manifest says what a run actually trained."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from collections import namedtuple

import pytest

from sftune.recipes.sft import train
from sftune.training.checkpoint import list_checkpoints
from sftune.training.run import RunError
from sftune.training.run_folder import RunLock
from tests.helpers import tiny_config

pytestmark = pytest.mark.integration  # train() runs, interrupted and resumed


def trained_steps(run_dir) -> list[int]:
    """The step of every training record in metrics.jsonl, in file order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if '"loss"' in line]


def checkpoint_steps(run_dir) -> list[int]:
    return [int(c.name.split("-")[1]) for c in list_checkpoints(run_dir / "checkpoints")]


def model_bytes(run_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "model").iterdir())}


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_resume_auto_on_a_finished_run_without_checkpoints_is_refused_and_leaves_the_model(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, max_steps=2, checkpoint_every=None)
    result = train(config)
    before = model_bytes(result.run_dir)
    assert not list_checkpoints(result.run_dir / "checkpoints")  # none kept: the run asked for none
    config.train.max_steps = 4  # more steps asked for, nothing to resume them from
    with pytest.raises(RunError, match="--overwrite") as refused:
        train(config, resume="auto")
    assert "output.overwrite" in str(refused.value)  # the Python spelling too
    assert model_bytes(result.run_dir) == before and trained_steps(result.run_dir) == [1, 2]
    config.output.overwrite = True  # asked for: trained again from step 0
    assert train(config, resume="auto").global_step == 4


def test_resume_auto_on_a_finished_run_with_its_checkpoint_does_nothing_even_on_a_full_disk(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    config = tiny_config(tmp_path, tiny_model_dir, max_steps=3, checkpoint_every=3)
    result = train(config)
    before = model_bytes(result.run_dir)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10**9, 10**9, 1024))  # what it needs is on disk
    again = train(config, resume="auto")
    assert (
        again.global_step == 3 and model_bytes(result.run_dir) == before and trained_steps(result.run_dir) == [1, 2, 3]
    )


HOLD_LOCK = """
import sys, time
from pathlib import Path
from sftune.training.run_folder import RunLock
RunLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(
    tmp_path, tiny_model_dir, capsys
):
    config = tiny_config(tmp_path, tiny_model_dir, max_steps=2, checkpoint_every=None)
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=rf"in use by another sftune run \(pid {holder.pid} "):
            train(config, resume="auto")
        assert not (run_dir / "model").exists() and not (run_dir / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    capsys.readouterr()
    assert train(config, resume="auto").global_step == 2  # the dead holder's lock: taken over, with a note
    assert f"taking over the lock of pid {holder.pid}" in capsys.readouterr().out
    lock = RunLock(run_dir)  # released at the end of the run: the next one takes it without a note
    lock.acquire()
    lock.release()


def test_enospc_writing_a_checkpoint_is_one_error_and_resume_auto_goes_on_from_the_previous_one(
    tmp_path, tiny_model_dir, monkeypatch
):
    from sftune.training import loop

    config = tiny_config(tmp_path, tiny_model_dir, max_steps=6, checkpoint_every=2)
    real_save, calls = loop.save_checkpoint, []

    def full_at_the_second(*args, **kwargs):
        calls.append(1)
        return no_space() if len(calls) == 2 else real_save(*args, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", full_at_the_second)
    with pytest.raises(RunError, match="checkpoint of step 4") as failed:
        train(config)
    message = str(failed.value)
    assert "No space left on device" in message and "--resume auto" in message
    assert str(list_checkpoints(tmp_path / "run" / "checkpoints")[-1]) in message  # where it will go on from
    run_dir = tmp_path / "run"
    assert checkpoint_steps(run_dir) == [2]  # whole, none half-written
    assert not list((run_dir / "checkpoints").glob(".*"))  # no temporary folder left to fill the disk
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    assert train(config, resume="auto").global_step == 6
    assert trained_steps(run_dir) == [1, 2, 3, 4, 5, 6]  # steps 3-4 redone once, their records replaced


def test_enospc_during_the_final_save_keeps_the_training_and_resume_auto_only_saves(
    tmp_path, tiny_model_dir, monkeypatch
):
    from sftune.training import loop

    config = tiny_config(tmp_path, tiny_model_dir, max_steps=4, checkpoint_every=None)
    real_outputs = loop.save_outputs
    monkeypatch.setattr(loop, "save_outputs", no_space)
    with pytest.raises(RunError, match="final model") as failed:
        train(config)
    assert "--resume auto" in str(failed.value) and "No space left on device" in str(failed.value)
    run_dir = tmp_path / "run"
    assert not (run_dir / "model").exists()
    assert checkpoint_steps(run_dir) == [4]  # written before the save
    monkeypatch.setattr(loop, "save_outputs", real_outputs)
    started = time.perf_counter()
    result = train(config, resume="auto")
    assert result.global_step == 4 and (run_dir / "model" / "config.json").is_file()
    assert trained_steps(run_dir) == [1, 2, 3, 4]  # nothing trained again
    assert time.perf_counter() - started < 120


def test_an_unknown_name_in_checkpoints_is_ignored_with_a_warning(tmp_path, tiny_model_dir, capsys):
    config = tiny_config(tmp_path, tiny_model_dir, max_steps=2, checkpoint_every=1)
    train(config)
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "step-latest").mkdir()
    (checkpoints / "notes.txt").write_text("mine")
    assert checkpoint_steps(tmp_path / "run") == [1, 2]
    capsys.readouterr()
    config.train.max_steps = 3
    assert train(config, resume="auto").global_step == 3
    captured = capsys.readouterr()
    assert f"resume: ignoring {checkpoints / 'step-latest'}: not a checkpoint" in captured.out
    assert (checkpoints / "step-latest").is_dir() and (checkpoints / "notes.txt").read_text() == "mine"  # not ours


def test_the_manifest_counts_what_a_max_steps_run_trained_of_what_it_had(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, max_steps=2)  # 2 steps x micro-batch 2 x accumulation 2
    result = train(config)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    trained = manifest["counts"]["trained"]  # beside the data counts (rows_train: what the split held)
    available = trained["items_available"]
    assert available == result.counts["trained"]["items_available"] > 8
    assert trained["steps"] == 2 and trained["items"] == trained["items_with_repeats"] == 8 < available
    assert 0 < trained["tokens"] < trained["tokens_available"]
    assert trained["epochs"] == round(8 / available, 4)
