"""The training command's host allocator: when it starts itself again on mimalloc, with what environment, and
when it does not (asked for the system's, already on it, already started again, not installed)."""

from __future__ import annotations

import os
import sys

import pytest

from sftune.config import TrainConfig, UserError
from sftune.host import allocator
from sftune.host.allocator import RELAUNCHED, is_own_command_line, relaunch_environment


@pytest.fixture
def installed(monkeypatch, tmp_path):
    library = tmp_path / "libmimalloc.so"
    library.write_bytes(b"")
    monkeypatch.setattr(allocator, "mimalloc_library", lambda: library)
    monkeypatch.setattr(allocator, "active_allocator", lambda: "system")
    monkeypatch.delenv(RELAUNCHED, raising=False)
    monkeypatch.setenv("LD_PRELOAD", "libother.so")
    return library


def test_auto_preloads_mimalloc_before_what_was_preloaded(installed):
    environment = relaunch_environment(TrainConfig())
    assert environment is not None
    assert environment["LD_PRELOAD"] == f"{installed} libother.so"
    assert environment[RELAUNCHED] == str(os.getpid()) and "MIMALLOC_PURGE_DELAY" not in environment


def test_no_restart_where_none_is_wanted_or_needed(installed, monkeypatch):
    assert relaunch_environment(TrainConfig(host_allocator="system")) is None
    monkeypatch.setenv(RELAUNCHED, str(os.getpid()))  # started again already: never a second time, loaded or not
    assert relaunch_environment(TrainConfig()) is None
    monkeypatch.setenv(RELAUNCHED, str(os.getpid() + 1))  # inherited from a parent: this process may restart
    assert relaunch_environment(TrainConfig()) is not None
    monkeypatch.delenv(RELAUNCHED)
    monkeypatch.setattr(allocator, "active_allocator", lambda: "mimalloc")  # e.g. the user preloaded it
    assert relaunch_environment(TrainConfig(host_allocator="mimalloc")) is None


def test_missing_mimalloc_is_the_system_allocator_under_auto_and_an_error_when_asked_for(installed, monkeypatch):
    monkeypatch.setattr(allocator, "mimalloc_library", lambda: None)
    assert relaunch_environment(TrainConfig()) is None
    with pytest.raises(UserError, match="pip install cmeel-mimalloc"):
        relaunch_environment(TrainConfig(host_allocator="mimalloc"))


@pytest.mark.parametrize(
    ("command", "own"),
    [
        (["/venv/bin/python", "/venv/bin/sftune", "train", "run.yaml"], True),
        (["python", "-u", "-m", "sftune.cli", "train", "run.yaml"], True),  # torchrun's ranks
        (["python", "-m", "ipykernel_launcher", "-f", "k.json"], False),  # a notebook calling main()
        (["python", "wrapper.py", "train", "run.yaml"], False),  # a script of the user's: never replaced
        (["/venv/bin/sftune", "train", "other.yaml"], False),
    ],
)
def test_only_the_sftune_command_itself_starts_again(monkeypatch, command, own):
    monkeypatch.setattr(sys, "orig_argv", command)
    assert is_own_command_line(["train", "run.yaml"]) is own
