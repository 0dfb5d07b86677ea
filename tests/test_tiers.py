"""The tier rule (tests/conftest.py) holds for every test file: one outside INTEGRATION_FOLDERS that runs training
end to end or launches the CLI marks those tests integration (or slow), so `pytest -m unit` stays the quick loop."""

from __future__ import annotations

import re

from tests.conftest import INTEGRATION_FOLDERS, REPO

# train(config) / train_dpo(config) / sftune.train({...}), not model.train(); the CLI in a subprocess
RUNS_TRAINING = re.compile(r"\btrain(_dpo)?\((?!\))|sys\.executable, \"-m\", \"sftune\.cli\"")
MARKED = re.compile(r"pytest\.mark\.(integration|slow)\b")


def test_every_file_that_trains_end_to_end_marks_its_tier():
    unmarked = []
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        name = path.relative_to(REPO).as_posix()
        if name.startswith(tuple(INTEGRATION_FOLDERS)) or path.name == "test_tiers.py":  # (its patterns match)
            continue
        text = path.read_text()
        if RUNS_TRAINING.search(text) and not MARKED.search(text):
            unmarked.append(name)
    assert not unmarked, (
        f"{unmarked} train end to end or run the CLI but mark no test @pytest.mark.integration (or slow): "
        "mark those tests (tests/conftest.py gives the rule)"
    )
