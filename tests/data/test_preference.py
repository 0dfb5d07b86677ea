"""Preference rows in every supported shape become (prompt + chosen, prompt + rejected); bad pairs are rejected."""

from __future__ import annotations

import json

from sftune.data.preference import build_pairs, prompt_length, read_pairs, to_pair
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


def supervised_ids(example):
    return [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]


def test_a_long_pair_loses_its_oldest_prompt_tokens_and_keeps_both_responses(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = resolve_template("chatml", tokenizer)
    long_text = " ".join(f"fox {i} jumps" for i in range(40))
    rows = [
        {"prompt": long_text, "chosen": "Yes, done.", "rejected": "No, the lazy dog!"},  # fits once its prompt is cut
        {"prompt": "Fine?", "chosen": "Yes.", "rejected": "No."},  # fits as it is
        {"prompt": "Q", "chosen": long_text, "rejected": "No."},  # the response alone does not fit
    ]
    pairs = [to_pair(row, f"p:{i}") for i, row in enumerate(rows)]
    whole, _ = build_pairs(pairs, tokenizer, template, None)
    max_length = 40
    assert len(whole[0].chosen.input_ids) > 2 * max_length and len(supervised_ids(whole[2].chosen)) > max_length

    kept, rejected = build_pairs(pairs, tokenizer, template, max_length, "truncate")
    assert [p.source for p in kept] == ["p:0", "p:1"]
    assert [(r.source, r.reason) for r in rejected] == [("p:2", "response_too_long")]
    cut, untouched = kept
    for branch in ("chosen", "rejected"):
        before, after = getattr(whole[0], branch), getattr(cut, branch)
        assert supervised_ids(after) == supervised_ids(before)  # the response and its end token, whole
        prompt, before_prompt = prompt_length(after), prompt_length(before)
        assert after.input_ids[:prompt] == before.input_ids[before_prompt - prompt : before_prompt]  # newest kept
        assert after.truncated and after.labels[:prompt] == [IGNORE_INDEX] * prompt
    assert max(len(cut.chosen.input_ids), len(cut.rejected.input_ids)) == max_length  # cut no more than needed
    assert cut.chosen.input_ids[: prompt_length(cut.chosen)] == cut.rejected.input_ids[: prompt_length(cut.rejected)]
    assert untouched.chosen == whole[1].chosen and not untouched.chosen.truncated

    kept, rejected = build_pairs(pairs, tokenizer, template, max_length, "drop")
    assert [p.source for p in kept] == ["p:1"]
    assert [(r.source, r.reason) for r in rejected] == [("p:0", "too_long"), ("p:2", "too_long")]
