"""The report from hand-made results: tables, escaped text, inlined plots; rendered by headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from sftune.data.types import Prompt
from sftune.eval.report import ModelEval, write_report
from sftune.infer.prompts import PromptRow
from sftune.infer.types import Generation

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TAB_BLUE, TAB_ORANGE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's train and validation line colours


def make_report(tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": s, "loss": 2.0 / s} for s in range(1, 11)] + [
        {"step": s, "val_loss": 1.5 / s, "val_ppl": 2.0} for s in (5, 10)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "samples.jsonl").write_text(json.dumps({"step": 5, "index": 0, "prompt": "2+2?", "output": "4"}) + "\n")
    rows = [
        PromptRow("r1", Prompt([{"role": "user", "content": "2+2?"}]), "4"),
        PromptRow("r2", Prompt([{"role": "user", "content": "a|b <b>x</b>"}]), "y"),
    ]
    baseline = ModelEval(
        "baseline", "base", {"exact_match": 0.0, "stop_rate": 0.5, "loss": 2.0, "perplexity": 7.39},
        [Generation("r1", "2+2?", "4", "five", True, 1), Generation("r2", "a|b", "y", "zzz", False, 8)],
        [{"id": "r1", "exact_match": False}, {"id": "r2", "exact_match": False}],
    )  # fmt: skip
    tuned = ModelEval(
        "model", "run", {"exact_match": 1.0, "stop_rate": 1.0, "loss": 0.1, "perplexity": 1.11},
        [Generation("r1", "2+2?", "4", "4", True, 1), Generation("r2", "a|b", "y", "y", True, 1)],
        [{"id": "r1", "exact_match": True}, {"id": "r2", "exact_match": True}],
    )  # fmt: skip
    results = {
        "data": "held.jsonl", "rows": 2, "rows_with_reference": 2, "rejected": [],
        "settings": {"temperature": 0.0, "max_new_tokens": 8, "extractor": "full"},
    }  # fmt: skip
    md, page = write_report(tmp_path / "eval", results, rows, [baseline, tuned], 2, run)
    return md, page


def test_report_puts_models_side_by_side_with_changes_and_escapes_text(tmp_path):
    (tmp_path / "eval").mkdir()
    md_path, html_path = make_report(tmp_path)
    md, page = md_path.read_text(), html_path.read_text()
    assert "| exact match | 0.0% | 100.0% | +100.0 pts |" in md
    assert "| stopped at end-of-turn | 50.0% | 100.0% | +50.0 pts |" in md
    assert "| loss on reference tokens | 2.0000 | 0.1000 | -1.900 |" in md
    assert "a\\|b <b>x</b>" in md  # a pipe cannot break the Markdown table
    assert "a|b &lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page  # model text is never HTML
    assert "zzz [cut at max_new_tokens] [wrong]" in md and "five [wrong]" in md
    assert page.count("data:image/png;base64,") == 2  # loss and validation curves, inlined: opens offline
    assert "Generations during training" in md


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium_with_its_plots(tmp_path):
    from PIL import Image

    (tmp_path / "eval").mkdir()
    _, html_path = make_report(tmp_path)
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    command = [CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,1400", html_path.as_uri()]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    image = Image.open(shot).convert("RGB")
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 20) or []}

    def near(target: tuple[int, int, int]) -> bool:
        return any(all(abs(c - t) <= 12 for c, t in zip(colour, target, strict=True)) for colour in colours)

    assert image.size == (1200, 1400) and len(colours) > 50  # a rendered page, not a blank one
    assert near(TAB_BLUE) and near(TAB_ORANGE)  # the inlined PNG plots were decoded and drawn


def test_a_preference_run_gets_its_curves_in_the_report(tmp_path):
    from sftune.eval.report import PREFERENCE_PANELS

    run, out = tmp_path / "run", tmp_path / "eval"
    run.mkdir(), out.mkdir()
    steps = [{"step": s, "loss": 0.69 / s, "reward_accuracy": 0.5 + s / 20, "reward_margin": 0.1 * s,
              "rewards_chosen": 0.05 * s, "rewards_rejected": -0.05 * s, "logps_chosen": -10.0 + s,
              "logps_rejected": -10.0 - s} for s in range(1, 9)]  # fmt: skip
    validation = [{"step": 8, "val_loss": 0.2, "val_reward_accuracy": 1.0, "val_reward_margin": 0.9}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps + validation))
    results = {"data": "held.jsonl", "rows": 0, "rows_with_reference": 0, "rejected": [],
               "settings": {"temperature": 0.0, "max_new_tokens": 8, "extractor": "full"}}  # fmt: skip
    md_path, html_path = write_report(out, results, [], [ModelEval("model", "run", {})], 0, run)
    md, page = md_path.read_text(), html_path.read_text()
    assert "![preference](preference.png)" in md and (out / "preference.png").is_file()
    assert page.count("data:image/png;base64,") == 3  # loss, validation and the preference panels
    plotted = {key for keys in PREFERENCE_PANELS.values() for key in keys}
    assert set(steps[0]) - {"step"} <= plotted and set(validation[0]) - {"step"} <= plotted
