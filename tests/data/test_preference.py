"""Preference rows in every supported shape become (prompt + chosen, prompt + rejected); bad pairs are rejected."""

from __future__ import annotations

import json

from sftune.data.preference import build_pairs, read_pairs, to_pair
from sftune.data.templates import resolve_template
from sftune.data.types import IGNORE_INDEX, Rejection
from tests.conftest import shared_path

USER = {"role": "user", "content": "Name a colour."}


def roles_and_text(conversation):
    return [(m.role, m.content) for m in conversation.messages]


def test_every_shape_gives_the_same_pair():
    blue, no = {"role": "assistant", "content": "Blue."}, {"role": "assistant", "content": "No."}
    rows = [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."},
        {"prompt": [USER], "chosen": blue, "rejected": [no]},
        {"conversations": [{"from": "human", "value": "Name a colour."}], "chosen": {"from": "gpt", "value": "Blue."},
         "rejected": {"from": "gpt", "value": "No."}},
        {"chosen": [USER, blue], "rejected": [USER, no]},
        {"chosen": "\n\nHuman: Name a colour.\n\nAssistant: Blue.",
         "rejected": "\n\nHuman: Name a colour.\n\nAssistant: No."},
    ]  # fmt: skip
    pairs = [to_pair(row, f"p:{i}") for i, row in enumerate(rows)]
    for pair in pairs:
        assert roles_and_text(pair.chosen) == [("user", "Name a colour."), ("assistant", "Blue.")]
        assert roles_and_text(pair.rejected) == [("user", "Name a colour."), ("assistant", "No.")]


def test_bad_pairs_are_rejected_with_a_reason():
    same = {"prompt": "Q", "chosen": "A", "rejected": "A"}
    differ = {"chosen": [USER, {"role": "assistant", "content": "x"}],
              "rejected": [{"role": "user", "content": "Other"}, {"role": "assistant", "content": "y"}]}  # fmt: skip
    missing = {"prompt": "Q", "chosen": "A"}
    reasons = [to_pair(row, "r").reason for row in (same, differ, missing)]  # type: ignore[union-attr]
    assert reasons == ["identical_pair", "prompt_differs", "missing_field"]


def test_shared_dpo_demo_pairs_build_with_only_responses_supervised(smollm2_tokenizer, tmp_path):
    rows = json.loads(shared_path("data", "dpo_en_demo.json").read_text())[:12]
    path = tmp_path / "dpo.json"
    path.write_text(json.dumps(rows))
    pairs, rejected = read_pairs(str(path))
    assert len(pairs) + len(rejected) == 12 and len(pairs) >= 10
    built, dropped = build_pairs(pairs, smollm2_tokenizer, resolve_template("auto", smollm2_tokenizer), 4096)
    assert len(built) + len(dropped) == len(pairs)
    for pair in built:
        for example, branch in ((pair.chosen, "chosen"), (pair.rejected, "rejected")):
            supervised = smollm2_tokenizer.decode(
                [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab != IGNORE_INDEX]
            )
            assert supervised.endswith("<|im_end|>"), branch
        # The prompt tokens are the same in both branches; only the responses differ.
        c_start = next(i for i, label in enumerate(pair.chosen.labels) if label != IGNORE_INDEX)
        r_start = next(i for i, label in enumerate(pair.rejected.labels) if label != IGNORE_INDEX)
        assert pair.chosen.input_ids[:c_start] == pair.rejected.input_ids[:r_start]
    assert not isinstance(pairs[0], Rejection)
