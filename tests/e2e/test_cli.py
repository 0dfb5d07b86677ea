"""The command line end to end on a tiny model built in the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from sftune.cli import main
from sftune.host.allocator import mimalloc_library
from tests.conftest import REPO
from tests.e2e.helpers import write_config


def test_train_on_alpaca_json_then_generate(tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir, REPO / "examples" / "data" / "alpaca_tiny.json")
    assert main(["train", str(config), "train.learning_rate=2e-3"]) == 0
    out = capsys.readouterr().out
    assert "8 rows in = 8 train + 0 validation + 0 rejected" in out
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["config"]["train"]["learning_rate"] == 2e-3
    assert main(["generate", str(tmp_path / "run"), "--prompt", "Name a prime number", "--max-new-tokens", "4"]) == 0


def test_train_on_multi_turn_messages_jsonl(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, REPO / "examples" / "data" / "chat_tiny.jsonl")
    assert main(["train", str(config)]) == 0
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert summary["formats"] == {"messages": 4} and summary["rows_train"] == 4


def test_user_mistakes_are_one_clear_message(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    config = write_config(tmp_path, tiny_model_dir, bad)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 2" in err and "Traceback" not in err

    assert main(["train", str(config), "train.learnin_rate=1"]) == 2
    assert "did you mean 'train.learning_rate'" in capsys.readouterr().err


def test_console_script_runs_in_a_fresh_process(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, REPO / "examples" / "data" / "alpaca_tiny.json", max_steps=1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "sftune.cli", "train", str(config)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    if mimalloc_library() is not None:  # the command started itself again on mimalloc (host/allocator.py)
        assert "setting train.host_allocator: auto -> mimalloc" in done.stdout
    again = subprocess.run(
        [sys.executable, "-m", "sftune.cli", "train", str(config)], env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
