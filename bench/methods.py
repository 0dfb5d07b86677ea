"""Full vs LoRA vs QLoRA on the default model: peak RSS and training tokens/s, each in a fresh process.

    python bench/methods.py [--steps 4] [--max-length 256] [--micro-batch-size 8]

Each method runs `sftune train` on the demo task (src/sftune/demo/demo.yaml) for a few steps in its own
subprocess (so peak RSS is that method's alone) and
the numbers (peak RSS, median tokens/s after the first step) are reported as ratios against full fine-tuning
measured in the same invocation. It also prints `sftune data check`'s pre-flight memory estimate for each method
(read from the run's data_report.json) beside the measured peak. Run it on an otherwise idle machine. Not a test.
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
import sftune.recipes.sft  # torch, transformers, peft: the runtime every run pays before loading a model
baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from sftune.cli import main
code = main(sys.argv[1:])
peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("BENCH " + json.dumps({"rc": code, "max_rss_kib": peak_kib, "baseline_kib": baseline_kib}))
"""


def run_method(method: str, steps: int, max_length: int, micro_batch_size: int, out_root: Path) -> dict[str, float]:
    run = out_root / method
    args = [
        "train",
        str(REPO / "src" / "sftune" / "demo" / "demo.yaml"),
        f"output.dir={run}",
        f"train.method={method}",
        f"train.max_steps={steps}",
        f"data.max_length={max_length}",
        f"train.micro_batch_size={micro_batch_size}",
        "train.gradient_accumulation_steps=1",
        "eval.sample_prompts=0",
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
    child = json.loads(line[6:])
    estimate = json.loads((run / "data_report.json").read_text())["memory"]
    return {
        "peak_rss_gib": child["max_rss_kib"] / 2**20,
        "baseline_gib": child["baseline_kib"] / 2**20,
        "estimate_gib": estimate[f"{method}_gib"],
        "tokens_per_s": statistics.median(rates),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {m: run_method(m, args.steps, args.max_length, args.micro_batch_size, Path(tmp)) for m in METHODS}
    full = results["full"]
    print(f"{'method':<8}{'peak RSS GiB':>14}{'tokens/s':>10}{'RSS / full':>12}{'speed / full':>14}")
    for method, r in results.items():
        rss_ratio, speed_ratio = r["peak_rss_gib"] / full["peak_rss_gib"], r["tokens_per_s"] / full["tokens_per_s"]
        print(f"{method:<8}{r['peak_rss_gib']:>14.2f}{r['tokens_per_s']:>10.0f}{rss_ratio:>12.2f}{speed_ratio:>14.2f}")
    print(f"\n{'method':<8}{'estimate GiB':>14}{'measured GiB':>14}{'error':>8}   (`sftune data check` estimate)")
    for method, r in results.items():
        error = r["estimate_gib"] / r["peak_rss_gib"] - 1
        print(f"{method:<8}{r['estimate_gib']:>14.2f}{r['peak_rss_gib']:>14.2f}{error:>8.0%}")
    print(f"runtime baseline after imports: {results['full']['baseline_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
