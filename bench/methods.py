"""Full vs LoRA vs QLoRA on the default model: peak RSS and training tokens/s, each in a fresh process.

    python bench/methods.py [--steps 4] [--max-length 256]

Each method runs `sftune train` for a few steps in its own subprocess (so peak RSS is that method's alone) and
the numbers (peak RSS, median tokens/s after the first step) are reported as ratios against full fine-tuning
measured in the same invocation. Run it on an otherwise idle machine. Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("full", "lora", "qlora")

CHILD = """
import json, resource, sys
from sftune.cli import main
code = main(sys.argv[1:])
print("BENCH " + json.dumps({"rc": code, "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def run_method(method: str, steps: int, max_length: int, out_root: Path) -> dict[str, float]:
    run = out_root / method
    args = [
        "train",
        str(REPO / "examples" / "alpaca_full.yaml"),
        f"output.dir={run}",
        f"train.method={method}",
        f"train.max_steps={steps}",
        f"data.max_length={max_length}",
        "train.micro_batch_size=2",
        "train.gradient_accumulation_steps=1",
        "train.progress=false",
        "train.checkpoint_every=null",
        "train.eval_every=null",
        "train.precision=fp32",
        "train.seed=0",
    ]
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if line is None or json.loads(line[6:])["rc"] != 0:
        raise RuntimeError(f"{method} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:] or [0.0]  # drop the warm-up step
    return {"peak_rss_gib": json.loads(line[6:])["max_rss_kib"] / 2**20, "tokens_per_s": statistics.median(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {m: run_method(m, args.steps, args.max_length, Path(tmp)) for m in METHODS}
    full = results["full"]
    print(f"{'method':<8}{'peak RSS GiB':>14}{'tokens/s':>10}{'RSS / full':>12}{'speed / full':>14}")
    for method, r in results.items():
        rss_ratio, speed_ratio = r["peak_rss_gib"] / full["peak_rss_gib"], r["tokens_per_s"] / full["tokens_per_s"]
        print(f"{method:<8}{r['peak_rss_gib']:>14.2f}{r['tokens_per_s']:>10.0f}{rss_ratio:>12.2f}{speed_ratio:>14.2f}")


if __name__ == "__main__":
    main()
