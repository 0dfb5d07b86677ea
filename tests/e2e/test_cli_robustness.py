"""The CLI as a user types it: overrides before and after every flag, `--version`, one message (exit 2, no
traceback) for a refusal under `--nproc 2`, for a full disk and for a config value out of range; an override typo
named as the override; a double Ctrl-C is exit 130 and one line."""

from __future__ import annotations

import argparse
import errno
import signal
import subprocess
import sys
import time

import pytest

import sftune
from sftune.cli import build_parser, main, parse_arguments
from tests.conftest import REPO
from tests.e2e.helpers import metric_lines, write_config

ALPACA = REPO / "examples" / "data" / "alpaca_tiny.json"
FIRST, LAST = "train.learning_rate=1e-4", "train.max_steps=2"


def commands_with_overrides() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every (sub)command that takes dotted overrides, by the words that name it."""
    found: dict[tuple[str, ...], argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, (*words, name))
            elif action.dest == "overrides":
                found[words] = parser

    walk(build_parser(), ())
    return found


def flag_tokens(action: argparse.Action) -> list[str]:
    """A flag as a user would type it, with a value it accepts."""
    flag = action.option_strings[-1]
    if action.nargs == 0:
        return [flag]
    value = action.choices[0] if action.choices else ("2" if action.type is int else "auto")
    return [flag, str(value)]


def flag_cases() -> list[tuple[tuple[str, ...], list[str]]]:
    cases = []
    for words, parser in commands_with_overrides().items():
        for action in parser._actions:
            if action.option_strings and action.dest not in ("help", "version"):
                cases.append((words, flag_tokens(action)))
    return cases


def test_overrides_are_found_on_train_dpo_demo_and_both_data_commands():
    assert set(commands_with_overrides()) >= {("train",), ("dpo",), ("demo",), ("data", "check"), ("data", "inspect")}


@pytest.mark.parametrize(("words", "flag"), flag_cases(), ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_overrides_go_before_after_and_around_every_flag(words, flag):
    config = {("demo",): [], ("eval",): ["runs/x", "--data", "rows.jsonl"]}.get(words, ["run.yaml"])
    orders = (
        [*config, FIRST, LAST, *flag],
        [*config, *flag, FIRST, LAST],
        [*config, FIRST, *flag, LAST],
    )
    for order in orders:
        args = parse_arguments(build_parser(), [*words, *order])
        assert args.overrides == [FIRST, LAST], order


def test_the_readme_commands_that_failed_parse(capsys):
    args = parse_arguments(
        build_parser(), ["train", "examples/alpaca_full.yaml", "--nproc", "2", "train.strategy=fsdp2"]
    )
    assert args.nproc == 2 and args.overrides == ["train.strategy=fsdp2"]
    args = parse_arguments(build_parser(), ["train", "cfg.yaml", "--resume", "auto", "train.max_steps=2"])
    assert args.resume == "auto" and args.overrides == ["train.max_steps=2"]
    with pytest.raises(SystemExit):  # an unknown flag is still an error
        parse_arguments(build_parser(), ["train", "cfg.yaml", "--no-such-flag", "train.max_steps=2"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"sftune {sftune.__version__}"


def refused(capsys, argv: list[str]) -> str:
    """The one message (after any progress bars) of a command that must stop with exit 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err, err
    return err[err.index("error: ") :]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.max_steps=" + "9" * 400, "a 400-digit integer is out of range"),
        ("train.max_steps=" + "9" * 4300, "a 4300-digit integer is out of range"),
        ("train.max_steps=" + "9" * 5000, "(5,000 digits) is out of range"),
        ("train.epochs=.inf", "inf is not a finite number"),
        ("train.max_grad_norm=.inf", "inf is not a finite number"),
    ],
)
def test_numbers_out_of_range_are_one_short_message_naming_the_override(capsys, override, expected):
    err = refused(capsys, ["data", "check", str(REPO / "examples" / "alpaca_full.yaml"), override])
    assert expected in err and len(err) < 400
    assert "alpaca_full.yaml" not in err  # the file is not where the problem is


def test_an_override_typo_is_blamed_on_the_override_and_a_yaml_typo_on_the_file(tmp_path, capsys):
    err = refused(capsys, ["data", "check", str(REPO / "examples" / "alpaca_full.yaml"), "train.learnin_rate=1"])
    assert err.startswith("error: the command line: invalid config") and "override 'train.learnin_rate=1'" in err
    assert "did you mean 'train.learning_rate'" in err
    config = tmp_path / "typo.yaml"
    config.write_text(f"data:\n  train: {ALPACA}\ntrain:\n  learnin_rate: 1\n")
    err = refused(capsys, ["data", "check", str(config), "train.max_steps=2"])
    assert err.startswith(f"error: {config}: invalid config") and "override '" not in err


def test_a_missing_data_file_names_where_it_was_looked_for(tmp_path, monkeypatch, capsys):
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "run.yaml"
    config.write_text("data:\n  train: nothere.json\n")
    monkeypatch.chdir(tmp_path)
    err = refused(capsys, ["data", "check", str(config)])
    assert f"'{tmp_path / 'configs' / 'nothere.json'}' does not exist" in err  # beside the YAML file
    err = refused(capsys, ["data", "check", str(config), "data.train=typed.json"])
    assert f"looked for at {tmp_path / 'typed.json'} (the working directory)" in err


def test_a_full_disk_during_the_final_save_is_exit_2_and_one_message(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from sftune.training import loop

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loop, "save_outputs", no_space)
    config = write_config(tmp_path, tiny_model_dir, ALPACA, max_steps=2)
    err = refused(capsys, ["train", str(config)])
    assert "could not write the final model" in err and "No space left on device" in err and "--resume auto" in err
    monkeypatch.undo()
    assert main(["train", str(config), "--resume", "auto"]) == 0 and (tmp_path / "run" / "model").is_dir()


def test_demo_starts_itself_on_the_allocator_as_train_does(monkeypatch):
    calls = []
    monkeypatch.setattr("sftune.cli.restart_on_allocator", lambda train, argv: calls.append((train, argv)))
    monkeypatch.setattr("sftune.recipes.demo.demo", lambda out, overrides: {})
    assert main(["demo", "--out", "x", "train.max_steps=1"]) == 0
    ((train, argv),) = calls
    assert train.max_steps == 1 and argv == ["demo", "--out", "x", "train.max_steps=1"]


@pytest.mark.integration
def test_a_refusal_under_nproc_2_is_one_message_and_exit_2(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, ALPACA, max_steps=1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")  # the output folder exists: refused
    done = subprocess.run(
        [sys.executable, "-m", "sftune.cli", "train", str(config), "--nproc", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count("error: ") == 1 and "already exists" in done.stderr
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"


@pytest.mark.integration
def test_a_double_ctrl_c_exits_130_with_one_line(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, ALPACA, max_steps=100000, checkpoint_every=1000)
    child = subprocess.Popen(
        [sys.executable, "-m", "sftune.cli", "train", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and metric_lines(metrics) < 2:
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    # one line: the second signal mid-step ("stopped by a second SIGINT"), or, when the step ended in between,
    # the first one's checkpoint ("SIGINT: stopped after step N")
    said = [line for line in err.splitlines() if line.startswith(("stopped by", "error: SIGINT: stopped after"))]
    assert len(said) == 1 and "--resume auto" in said[0], err[-3000:]
