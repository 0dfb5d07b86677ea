"""The docs cannot go stale: README.md stays a manual, every relative link in the docs resolves, and every
documented command parses with the real CLI parser (and, where its config is in the repository, loads it, so that
a renamed key fails here). Fast: no model is loaded, nothing is run."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from sftune.cli import build_parser
from sftune.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
BENCH_INDEX = REPO / "bench" / "results" / "README.md"
DEMO_CONFIG = REPO / "src" / "sftune" / "demo" / "demo.yaml"
MAX_README_LINES = 220

# A documented command starts with one of these, or runs the module anywhere in its line (`python -m sftune.cli`,
# `torchrun ... -m sftune.cli`).
LAUNCHERS = (("sftune",), (".venv/bin/sftune",))
MODULE = ("-m", "sftune.cli")
# Commands whose first positional is a YAML config, loaded with the command's overrides.
CONFIG_COMMANDS = {("train",), ("dpo",), ("data", "check"), ("data", "inspect")}
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`]*`")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


@dataclass(frozen=True)
class Command:
    source: str  # FILE:LINE, for the test id and the failure message
    text: str
    argv: tuple[str, ...]


def relative(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def fenced_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line inside a fenced code block."""
    inside, lines = False, []
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            inside = not inside
        elif inside:
            lines.append((number, line))
    return lines


def logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Lines joined where one ends with a `\\` continuation, numbered by their first line."""
    joined: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in lines:
        start, text = pending if pending else (number, "")
        text += line
        if text.rstrip().endswith("\\"):
            pending = (start, text.rstrip()[:-1] + " ")
        else:
            joined.append((start, text))
            pending = None
    if pending:
        joined.append(pending)
    return joined


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code: where a markdown link is a link."""
    fenced = {number for number, _ in fenced_lines(text)}
    return "\n".join(
        INLINE_CODE.sub("", line)
        for number, line in enumerate(text.splitlines(), start=1)
        if number not in fenced and not FENCE.match(line)
    )


def sftune_argv(tokens: list[str]) -> list[str] | None:
    """The arguments after the launcher, if these shell words run sftune; a quoted script (`bash -c '...'`) is
    searched too."""
    for launcher in LAUNCHERS:
        if tuple(tokens[: len(launcher)]) == launcher:
            return tokens[len(launcher) :]
    for index in range(len(tokens) - 1):
        if tuple(tokens[index : index + 2]) == MODULE:
            return tokens[index + 2 :]
    for token in tokens:
        if " " in token and "sftune" in token:
            inner = sftune_argv(shlex.split(token, comments=True))
            if inner is not None:
                return inner
    return None


def documented_commands(path: Path) -> list[Command]:
    commands = []
    for number, text in logical_lines(fenced_lines(path.read_text(encoding="utf-8"))):
        try:
            tokens = shlex.split(text, comments=True)  # comments=True drops a trailing `# comment`
        except ValueError:
            continue  # not shell (a Python or YAML line with an odd quote)
        argv = sftune_argv(tokens)
        if argv is not None:
            commands.append(Command(f"{relative(path)}:{number}", text.strip(), tuple(argv)))
    return commands


def subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    # argparse has no public accessor for a parser's subcommands; its action list is where they are.
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def parse(argv: tuple[str, ...]) -> tuple[tuple[str, ...], argparse.Namespace]:
    """The (sub)command path and its parsed arguments, as the CLI parses them (overrides and flags intermixed).
    argparse's parse_intermixed_args refuses a parser with subcommands, so it runs on the command's own parser."""
    parser, rest, path = build_parser(), list(argv), []
    while (sub := subcommands(parser)) is not None:
        if not rest or rest[0] not in sub.choices:
            raise AssertionError(f"expected one of {sorted(sub.choices)} after {' '.join(['sftune', *path])}")
        path.append(rest[0])
        parser = sub.choices[rest.pop(0)]
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = parser.parse_intermixed_args(rest)
    except SystemExit:
        raise AssertionError(errors.getvalue().strip()) from None
    return tuple(path), args


COMMANDS = [command for path in [README, *DOCS] for command in documented_commands(path)]


def test_readme_is_a_manual_not_a_notebook():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines (at most {MAX_README_LINES}): move detail into docs/ and numbers into "
        "bench/results/, and link to them"
    )


@pytest.mark.parametrize("path", [README, *DOCS, BENCH_INDEX], ids=relative)
def test_every_relative_link_resolves(path):
    missing = []
    for target in LINK.findall(prose(path.read_text(encoding="utf-8"))):
        if EXTERNAL.match(target) or target.startswith("#"):
            continue  # a web address, or an anchor in this file
        file_part = target.split("#", 1)[0].split("?", 1)[0]
        if not (path.parent / file_part).exists():
            missing.append(target)
    assert not missing, f"{relative(path)} links to files that do not exist: {missing}"


def test_the_readme_documents_every_command():
    documented = {command.argv[0] for command in COMMANDS if command.source.startswith("README.md") and command.argv}
    sub = subcommands(build_parser())
    assert sub is not None
    assert set(sub.choices) <= documented, f"README.md shows no example of: {sorted(set(sub.choices) - documented)}"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: command.source)
def test_documented_command_parses_and_its_config_loads(command):
    try:
        path, args = parse(command.argv)
    except AssertionError as error:
        pytest.fail(f"{command.source}: `{command.text}` does not parse: {error}")
    config = getattr(args, "config", None)
    if path in CONFIG_COMMANDS and config and (REPO / config).is_file():
        config_path: Path | None = REPO / config
    else:
        config_path = DEMO_CONFIG if path == ("demo",) else None
    if config_path is not None:
        try:
            load_config(config_path, list(args.overrides))
        except ConfigError as error:  # a renamed or removed key, a value no longer allowed
            pytest.fail(f"{command.source}: `{command.text}`: {error}")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: command.source)
def test_documented_commands_run_sftune_from_the_venv(command):
    assert not command.text.startswith("sftune "), (
        f"{command.source}: write `.venv/bin/sftune ...`, as every other command in README.md and docs/ does"
    )
