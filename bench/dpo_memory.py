"""Peak memory of a LoRA DPO step against a LoRA SFT step on the same sequences, each in a fresh process.

    python bench/dpo_memory.py [--pairs 4] [--steps 2] [--max-length 512]

DPO puts a micro-batch of n pairs through the model as 2n sequences (chosen and rejected in one row) and takes the
reference log-probs from the same model with the adapter switched off: no second model. The SFT step trains on the
same 2n conversations (prompt + chosen, prompt + rejected) as one micro-batch. Both use the default model and the
first pairs of ../shared/data/dpo_en_demo.json that fit max length. Prints both peaks and their ratio (target <= 1.15).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "dpo_en_demo.json"

CHILD = """
import json, resource, sys
from sftune.cli import main
code = main(sys.argv[1:])
print("BENCH " + json.dumps({"rc": code, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def conversation(prompt: list[dict[str, str]], reply: dict[str, str]) -> dict[str, object]:
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    turns = [{"role": roles[t["from"]], "content": t["value"]} for t in [*prompt, reply]]
    return {"messages": turns}


def run(command: str, config: Path, overrides: list[str]) -> float:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, command, str(config), *overrides], capture_output=True, text=True
    )
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if line is None or json.loads(line[6:])["rc"] != 0:
        raise RuntimeError(f"{command} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return float(json.loads(line[6:])["peak_gib"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4, help="pairs per micro-batch (the SFT step gets 2x sequences)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()
    rows = [r for r in json.loads(DATA.read_text()) if len(json.dumps(r)) < args.max_length * 3][: args.pairs * 8]
    with tempfile.TemporaryDirectory() as tmp:
        pairs, sft = Path(tmp) / "pairs.json", Path(tmp) / "sft.jsonl"
        pairs.write_text(json.dumps(rows))
        conversations = [conversation(r["conversations"], r[branch]) for r in rows for branch in ("chosen", "rejected")]
        sft.write_text("".join(json.dumps(c) + "\n" for c in conversations))
        common = [f"data.max_length={args.max_length}", "data.truncation=truncate", "data.shuffle=false",
                  "train.method=lora", f"train.max_steps={args.steps}", "train.gradient_accumulation_steps=1",
                  "train.progress=false", "train.precision=fp32", "lora.dropout=0"]  # fmt: skip
        config = Path(tmp) / "run.yaml"
        config.write_text("model: {name_or_path: smollm2-135m-instruct}\ndata: {train: placeholder}\n")
        sft_peak = run("train", config, [f"data.train={sft}", f"train.micro_batch_size={2 * args.pairs}",
                                         f"output.dir={tmp}/sft", *common])  # fmt: skip
        dpo_peak = run("dpo", config, [f"data.train={pairs}", f"train.micro_batch_size={args.pairs}",
                                       f"output.dir={tmp}/dpo", *common])  # fmt: skip
    print(f"peak RSS, {args.pairs} pairs per micro-batch ({2 * args.pairs} sequences), {args.steps} steps, LoRA:")
    print(f"  SFT {sft_peak:.2f} GiB, DPO {dpo_peak:.2f} GiB: DPO / SFT = {dpo_peak / sft_peak:.2f} (target <= 1.15)")


if __name__ == "__main__":
    main()
