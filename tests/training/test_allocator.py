"""The training command's host allocator: when it starts itself again on mimalloc, with what environment, and
when it does not (asked for the system's, already on it, already started again, not installed)."""

from __future__ import annotations

import pytest

from sftune.config import TrainConfig, UserError
from sftune.training import allocator
from sftune.training.allocator import RELAUNCHED, relaunch_environment


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
    assert environment[RELAUNCHED] == "mimalloc" and "MIMALLOC_PURGE_DELAY" not in environment
    eager = relaunch_environment(TrainConfig(release_freed_memory=True))
    assert eager is not None and eager["MIMALLOC_PURGE_DELAY"] == "0"


def test_no_restart_where_none_is_wanted_or_needed(installed, monkeypatch):
    assert relaunch_environment(TrainConfig(host_allocator="system")) is None
    monkeypatch.setenv(RELAUNCHED, "mimalloc")  # started again already: never a second time, loaded or not
    assert relaunch_environment(TrainConfig()) is None
    monkeypatch.delenv(RELAUNCHED)
    monkeypatch.setattr(allocator, "active_allocator", lambda: "mimalloc")  # e.g. the user preloaded it
    assert relaunch_environment(TrainConfig(host_allocator="mimalloc")) is None


def test_missing_mimalloc_is_the_system_allocator_under_auto_and_an_error_when_asked_for(installed, monkeypatch):
    monkeypatch.setattr(allocator, "mimalloc_library", lambda: None)
    assert relaunch_environment(TrainConfig()) is None
    with pytest.raises(UserError, match="pip install cmeel-mimalloc"):
        relaunch_environment(TrainConfig(host_allocator="mimalloc"))
