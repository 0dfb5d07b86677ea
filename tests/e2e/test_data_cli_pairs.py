"""`sftune data check` and `sftune data inspect` on preference pairs: both branches, mask checks on each, bad pairs
rejected with their reason."""

from __future__ import annotations

import json

from sftune.cli import main
from tests.e2e.helpers import NO_END_TOKEN, write_config

SUPERVISED = "\x1b[1;42;30m"
USER = {"role": "user", "content": "Say hi"}
ROWS = [
    {"prompt": "Name a prime", "chosen": "Seven is prime.", "rejected": "Eight is."},
    {"prompt": "Say hi", "chosen": "Hello!", "rejected": "Hello!"},  # identical
    {"chosen": [USER, {"role": "assistant", "content": "Hi"}],
     "rejected": [{"role": "user", "content": "Say bye"}, {"role": "assistant", "content": "Bye"}]},  # prompts differ
    {"prompt": [USER], "chosen": {"role": "assistant", "content": "Hi there."}, "rejected": [{"role": "assistant",
     "content": "Go away."}]},
]  # fmt: skip


def write_pairs(tmp_path, tiny_model_dir):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return write_config(tmp_path, tiny_model_dir, data), data


def test_data_check_reports_pairs_checks_each_branch_and_rejects_bad_pairs(tmp_path, tiny_model_dir, capsys):
    config, _ = write_pairs(tmp_path, tiny_model_dir)
    report_path, rejects = tmp_path / "report.json", tmp_path / "rejects.jsonl"
    args = ["data", "check", str(config), "template.name=chatml", "--json", str(report_path), "--rejects", str(rejects)]
    assert main([*args, "--strict"]) == 0
    out = capsys.readouterr().out
    assert "pairs: 4 in = 2 kept + 2 rejected (identical_pair: 1, prompt_differs: 1)" in out
    for branch in ("chosen", "rejected"):
        for check in ("end_token_supervised", "single_bos", "inference_parity"):
            assert f"PASS {branch}.{check}: 0 of 2 failed" in out
    report = json.loads(report_path.read_text())
    assert report["pairs_kept"] == 2 and report["tokens"]["chosen"]["supervised"] > 0
    dropped = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(d["source"], d["reason"]) for d in dropped] == [
        ("pairs.jsonl:2", "identical_pair"),
        ("pairs.jsonl:3", "prompt_differs"),
    ]

    template = tmp_path / "no_end.jinja"  # closes turns with no end-of-turn token: fails on both branches
    template.write_text(NO_END_TOKEN)
    assert main([*args[:3], f"template.name={template}", "--strict"]) == 1
    out = capsys.readouterr().out
    assert "FAIL chosen.end_token_supervised: 2 of 2 failed" in out
    assert "FAIL rejected.end_token_supervised: 2 of 2 failed" in out


def test_data_inspect_shows_both_branches_with_only_the_responses_supervised(tmp_path, tiny_model_dir, capsys):
    config, _ = write_pairs(tmp_path, tiny_model_dir)
    page = tmp_path / "inspect.html"
    assert (
        main(["data", "inspect", str(config), "template.name=chatml", "-n", "2", "--html", str(page), "--color=always"])
        == 0
    )
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("── ")]
    assert [h.split(":")[1].split()[-1] for h in headers] == ["[chosen]", "[rejected]"] * 2
    assert [h.split(":")[0] for h in headers] == ["── pairs.jsonl"] * 4
    examples = out.split("\n", 1)[1]  # after the legend
    supervised = [part.split("\x1b[0m")[0] for part in examples.split(SUPERVISED)[1:]]
    assert supervised == [
        "Seven is prime.<|im_end|>",
        "Eight is.<|im_end|>",
        "Hi there.<|im_end|>",
        "Go away.<|im_end|>",
    ]
    assert page.read_text().count("<h2>") == 4
