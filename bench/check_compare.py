"""CI's bench smoke (`make bench-smoke`, run by .ci/run): after `bench/compare.py --quick --out DIR`, check that
DIR holds what compare.py promises: both tools trained and were measured for every method, with the ratios, the
machine's matmul ceiling and CPU, and the markdown table. Speed is never asserted (numbers from a smoke run mean
nothing); a missing or empty field is what this catches.

    python bench/check_compare.py DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TOOLS = ("sftune", "trl")
RATIOS = {"tokens_per_s", "peak_rss_gib", "cpu_seconds", "final_loss"}


def problems_in(out: Path) -> list[str]:
    """What is missing or empty in compare.py's compare.json and compare.md under `out` (nothing: an empty list)."""
    results = json.loads((out / "compare.json").read_text())
    table = (out / "compare.md").read_text()
    problems = []
    if not results.get("methods"):
        problems.append("compare.json names no method")
    for method, measured in results.get("methods", {}).items():
        for tool in TOOLS:
            run = measured.get(tool, {})
            for key in ("tokens_per_s", "peak_rss_gib", "final_loss"):
                if not run.get(key, 0) > 0:
                    problems.append(f"{method} {tool}: {key} is {run.get(key)!r}, expected > 0")
            runs = run.get("runs", [])
            if len(runs) != 1 or "load_average_before" not in runs[0]:
                problems.append(f"{method} {tool}: expected one run (--quick) with its load_average_before")
        missing = RATIOS - set(measured.get("ratios", {}))
        if missing:
            problems.append(f"{method}: ratios lack {sorted(missing)}")
        if f"| {method} | sftune / TRL |" not in table:
            problems.append(f"compare.md has no '| {method} | sftune / TRL |' row")
    if not results.get("ceiling", {}).get("fp32", 0) > 0:
        problems.append("compare.json: ceiling.fp32 missing or not > 0")
    if not results.get("cpu"):
        problems.append("compare.json: cpu missing")
    return problems


def main() -> int:
    out = Path(sys.argv[1])
    problems = problems_in(out)
    for problem in problems:
        print(f"bench smoke: {problem}", file=sys.stderr)
    if not problems:
        print(f"bench smoke: compare.json and compare.md in {out} are complete")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
