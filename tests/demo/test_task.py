"""The README demo task: generator, shipped data and scoring. No model needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftune.demo import task
from sftune.demo.task import INSTRUCTION, SCHEMA_KEYS, make_rows
from sftune.eval.metrics import is_exact_match

DATA_DIR = Path(task.__file__).parent / "data"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_make_rows_is_deterministic_and_seed_dependent() -> None:
    assert make_rows(50, seed=7) == make_rows(50, seed=7)
    assert make_rows(50, seed=7) != make_rows(50, seed=8)
    assert make_rows(20, seed=7) == make_rows(50, seed=7)[:20]  # a longer run extends a shorter one


def test_make_rows_gives_distinct_inputs() -> None:
    rows = make_rows(500, seed=3)
    assert len(rows) == 500
    assert len({row["input"] for row in rows}) == 500


def test_every_output_follows_the_schema() -> None:
    item_names = {singular for singular, _ in task.ITEMS}
    for row in make_rows(500, seed=11):
        assert set(row) == {"instruction", "input", "output"}
        assert row["instruction"] == INSTRUCTION
        answer = json.loads(row["output"])
        assert tuple(answer) == SCHEMA_KEYS  # fixed key order
        assert row["output"] == json.dumps(answer)  # one canonical spelling of the answer
        assert answer["item"] in item_names and answer["item"] == answer["item"].lower()
        assert type(answer["qty"]) is int and answer["qty"] >= 1
        assert answer["city"] in task.CITIES and answer["city"] in row["input"]
        assert is_exact_match(row["output"], row["output"], extractor="json")


def test_inputs_vary_in_phrasing_and_number_spelling() -> None:
    rows = make_rows(400, seed=5)
    inputs = [row["input"] for row in rows]
    assert any("dozen" in text for text in inputs)
    assert any(f" {word} " in text for text in inputs for word in task.NUMBER_WORDS[2:])
    assert any(any(char.isdigit() for char in text) for text in inputs)
    # the quantity is not always stated as digits, so copying digits is not enough
    assert sum(str(json.loads(row["output"])["qty"]) not in row["input"] for row in rows) > 50


@pytest.mark.parametrize("name", ["train.jsonl", "heldout.jsonl"])
def test_shipped_files_equal_a_regeneration(tmp_path: Path, name: str) -> None:
    task.write_splits(tmp_path)
    assert (DATA_DIR / name).read_bytes() == (tmp_path / name).read_bytes()


def test_shipped_splits_are_disjoint_and_sized() -> None:
    train = read_jsonl(DATA_DIR / "train.jsonl")
    heldout = read_jsonl(DATA_DIR / "heldout.jsonl")
    assert (len(train), len(heldout)) == (task.TRAIN_SIZE, task.HELDOUT_SIZE)
    assert not {row["input"] for row in train} & {row["input"] for row in heldout}


def test_main_writes_both_files(tmp_path: Path) -> None:
    task.main(["--out", str(tmp_path / "out")])
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["heldout.jsonl", "train.jsonl"]
