"""sftune against TRL's SFTTrainer, side by side: non-padding tokens/s, supervised tokens/s, CPU seconds, peak RSS,
final loss and model FLOPs utilisation, for LoRA and full fine-tuning.

    python bench/compare.py [--steps 8] [--repeats 2] [--methods lora,full] [--quick] [--out bench/results]
                            [--variant LABEL:METHOD:OVERRIDE[,OVERRIDE...]]

Both tools train the default model (SmolLM2-135M-Instruct) on the same rows (../shared/data/alpaca_en_demo.json
when present, else the bundled demo data), rendered with the model's own chat template, loss on the response only,
in the same order (no shuffling), with the same effective batch (micro-batch x accumulation), max length,
precision (fp32), optimizer (AdamW, constant learning rate, no warmup, clipping 1.0) and LoRA settings (r=16,
alpha=32, dropout 0, all linear layers). Each run is a fresh process (peak RSS is its own), and runs are
interleaved (sftune, TRL, sftune, TRL, ...) so both see the same machine noise; the load average before each run,
the CPU model and a measured matmul ceiling (fp32 and bf16) are recorded. Each tool keeps its own defaults for
everything else (TRL: gradient checkpointing on, padded batches; sftune: padding-free rows); they are listed in
the output. A variant is one more sftune run of a method, with overrides, after each TRL run of that method and
compared with the same TRL runs (default: full fine-tuning with the AdamW moments offloaded to a file,
`train.offload_optimizer_state=true`). Writes compare.json and compare.md to --out. Not a test; `--quick` is a smoke
run used by the suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "alpaca_en_demo.json"
BUNDLED_DATA = REPO / "src" / "sftune" / "demo" / "data" / "train.jsonl"

# One child process per run: it trains, then prints a BENCH line with what it measured.
CHILD_PRELUDE = """
import json, os, resource, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
spec = json.loads(sys.argv[1])
def finish(steps, final_loss, supervised, who=resource.RUSAGE_SELF, gpu_peak=None, losses=()):
    usage = resource.getrusage(who)
    # steps: [(end time, non-padding tokens of the step)], first step dropped as warm-up
    timed = steps[1:] if len(steps) > 1 else steps
    seconds = timed[-1][0] - (steps[0][0] if len(steps) > 1 else START)
    tokens = sum(t for _, t in timed)
    print("BENCH " + json.dumps({
        "tokens_per_s": tokens / seconds, "supervised_tokens_per_s": supervised * tokens / max(1, sum(t for _, t in steps)) / seconds,
        "peak_rss_gib": usage.ru_maxrss / 2**20, "cpu_seconds": usage.ru_utime + usage.ru_stime,
        **({"peak_gpu_gib": gpu_peak or torch.cuda.max_memory_allocated() / 2**30} if torch.cuda.is_available() else {}),
        "wall_seconds": time.time() - START, "final_loss": final_loss, "losses": list(losses), "steps": len(steps),
        "tokens": sum(t for _, t in steps), "supervised_tokens": supervised}))
START = time.time()
"""

SFTUNE_CHILD = (
    CHILD_PRELUDE
    + """
import yaml
config = {
    "model": {"name_or_path": spec["model"]},
    "data": {"train": spec["data"], "max_length": spec["max_length"], "shuffle": False, "format": "messages", "truncation": "truncate"},
    "train": {"method": spec["method"], "learning_rate": spec["lr"], "lr_scheduler": "constant", "warmup_steps": 0,
              "warmup_ratio": 0.0, "max_steps": spec["steps"], "micro_batch_size": spec["micro_batch_size"],
              "gradient_accumulation_steps": spec["accumulation"], "precision": "fp32", "max_grad_norm": 1.0,
              "seed": 42, "progress": False, "padding_free": spec.get("padding_free", True),
              "num_threads": int(os.environ.get("BENCH_THREADS", "2"))},
    "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
    "output": {"dir": spec["out"], "overwrite": True},
}
path = os.path.join(spec["out"] + ".yaml")
open(path, "w").write(yaml.safe_dump(config))
# The command a user runs, in its own process (it may start itself again on its host allocator): its peak RSS and
# CPU seconds are this child's children's.
import subprocess
done = subprocess.run([sys.executable, "-m", "sftune.cli", "train", path, *spec.get("overrides", [])],
                      capture_output=True, text=True)
if done.returncode != 0:
    sys.exit(done.stdout[-3000:] + done.stderr[-3000:])
allocator = next((l.split(" -> ", 1)[1] for l in done.stdout.splitlines() if l.startswith("setting train.host_allocator: ")), "?")
resolved = yaml.safe_load(open(os.path.join(spec["out"], "config.yaml")))  # the run's 'auto' settings, as resolved
print("RESOLVED " + json.dumps({"lora.base_dtype": resolved["lora"]["base_dtype"],
                                "train.gradient_checkpointing": resolved["train"]["gradient_checkpointing"],
                                "train.offload_optimizer_state": resolved["train"]["offload_optimizer_state"],
                                "host allocator": allocator}))
records = [json.loads(l) for l in open(os.path.join(spec["out"], "metrics.jsonl")) if '"loss"' in l]
summary = json.load(open(os.path.join(spec["out"], "data_summary.json")))
# per step: tokens / rate = seconds; rebuild step end times from the logged rates
elapsed, steps, previous = 0.0, [], 0
for r in records:
    step_tokens = r["tokens_seen"] - previous
    previous = r["tokens_seen"]
    elapsed += step_tokens / r["tokens_per_s"] if r["tokens_per_s"] else 0.0
    steps.append((START + elapsed, step_tokens))
per_token = summary["supervised_tokens"] / max(1, summary["tokens"])
finish(steps, records[-1]["loss"], per_token * sum(t for _, t in steps), resource.RUSAGE_CHILDREN,
       records[-1].get("peak_gpu_gib"), losses=[r["loss"] for r in records])
"""
)

TRL_CHILD = (
    CHILD_PRELUDE
    + """
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer
rows = [json.loads(l) for l in open(spec["data"])]
dataset = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
tokenizer = AutoTokenizer.from_pretrained(spec["model"])
model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa")
steps = []
class Timer(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        steps.append(time.time())
args = SFTConfig(output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["micro_batch_size"],
                 gradient_accumulation_steps=spec["accumulation"], learning_rate=spec["lr"], lr_scheduler_type="constant",
                 warmup_steps=0, max_grad_norm=1.0, max_length=spec["max_length"], logging_steps=1, report_to="none",
                 save_strategy="no", use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False, seed=42,
                 dataloader_num_workers=0, train_sampling_strategy="sequential", dataset_num_proc=None,
                 use_liger_kernel=spec.get("liger", False))
peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM") if spec["method"] == "lora" else None
trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft, callbacks=[Timer()])
trainer.train()
logs = [h for h in trainer.state.log_history if "num_tokens" in h and "loss" in h]
cumulative = [int(h["num_tokens"]) for h in logs]
per_step = [b - a for a, b in zip([0] + cumulative[:-1], cumulative)]
# supervised tokens: the completion tokens of the rows the steps used (sequential order)
used = spec["steps"] * spec["micro_batch_size"] * spec["accumulation"]
supervised = sum(len(tokenizer(r["messages"][-1]["content"])["input_ids"]) + 1 for r in rows[:used])
finish(list(zip(steps, per_step)), logs[-1]["loss"], supervised, losses=[h["loss"] for h in logs])
"""
)


def cpu_model() -> str:
    """The CPU (and the GPU, where one is used) the bench ran on."""
    import torch

    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return _cpu_name() + gpu


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            flags = Path("/proc/cpuinfo").read_text()
            bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores, {'native bf16' if bf16 else 'no native bf16'})"
    return platform.processor() or "unknown"


def matmul_ceiling(threads: int = 2) -> dict[str, float]:
    """GFLOP/s of the model's largest matmul shape ([tokens, hidden] x [hidden, intermediate]), fp32 and bf16, on
    the GPU where there is one (fp32 as torch runs it by default: no TF32), else on `threads` CPU threads."""
    code = f"""
import time, torch, json
torch.set_num_threads({threads})
device = "cuda" if torch.cuda.is_available() else "cpu"
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
out = {{}}
for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    a, b = torch.randn(2048, 576, dtype=dtype, device=device), torch.randn(576, 1536, dtype=dtype, device=device)
    for _ in range(3): a @ b
    sync()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 1.5:
        for _ in range(10): a @ b
        sync(); n += 10
    out[name] = 2 * 2048 * 576 * 1536 * n / (time.perf_counter() - start) / 1e9
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare_data(path: Path, rows_needed: int, out: Path) -> Path:
    """The rows as chat messages (alpaca instruction + input -> user, output -> assistant), both tools read them."""
    if path.suffix == ".json":
        raw = json.loads(path.read_text())
    else:
        raw = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for row in raw[:rows_needed]:
        user = "\n\n".join(p for p in (row.get("instruction", ""), row.get("input", "")) if p and p.strip())
        rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def run_child(tool: str, spec: dict[str, Any]) -> dict[str, Any]:
    code = SFTUNE_CHILD if tool == "sftune" else TRL_CHILD
    load = os.getloadavg()[0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"{tool} {spec['method']} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    resolved = next((json.loads(ln[9:]) for ln in done.stdout.splitlines() if ln.startswith("RESOLVED ")), None)
    return {**json.loads(line[6:]), "load_average_before": load, **({"resolved": resolved} if resolved else {})}


def model_flops_per_token(method: str, model: str) -> float:
    """Matmul FLOPs per trained token of the model: forward 2N, backward 2N (inputs) + 2N (weights, full only)."""
    from transformers import AutoConfig

    from sftune.model.memory import count_model_parameters

    params = count_model_parameters(AutoConfig.from_pretrained(model))
    return (6 if method == "full" else 4) * params["total"]


def summarize(runs: list[dict[str, Any]], ceiling: dict[str, float], method: str, model: str) -> dict[str, Any]:
    keys = ("tokens_per_s", "supervised_tokens_per_s", "peak_rss_gib", "cpu_seconds", "wall_seconds", "final_loss")
    keys += ("peak_gpu_gib",) if all("peak_gpu_gib" in r for r in runs) else ()
    summary = {key: statistics.median(r[key] for r in runs) for key in keys}
    summary["mfu_fp32"] = summary["tokens_per_s"] * model_flops_per_token(method, model) / (ceiling["fp32"] * 1e9)
    summary["runs"] = runs
    return summary


def ratios_to(sftune: dict[str, Any], trl: dict[str, Any]) -> dict[str, float]:
    """sftune / TRL for speed, CPU time and memory; the final loss as a relative difference."""
    keys = ("tokens_per_s", "supervised_tokens_per_s", "cpu_seconds", "peak_rss_gib")
    keys += ("peak_gpu_gib",) if "peak_gpu_gib" in sftune else ()
    ratios = {k: sftune[k] / trl[k] for k in keys}
    ratios["final_loss"] = sftune["final_loss"] / trl["final_loss"] - 1
    return ratios


def loss_curve_line(method: str, label: str, run: dict[str, Any], curves: dict[str, dict[str, Any]]) -> str:
    """How far one run's per-step losses (its first repeat) are from TRL's and from sftune's default run's."""
    losses = run["runs"][0].get("losses") or []
    parts = []
    for other in ("trl", "sftune"):
        reference = curves[other]["runs"][0].get("losses") or []
        if other != label and losses and len(reference) == len(losses):
            gaps = [abs(a / b - 1) for a, b in zip(losses, reference, strict=True)]
            parts.append(f"against {'TRL' if other == 'trl' else 'sftune ' + method}: at most {max(gaps):.2%} per step")
    name = label if label != "sftune" else f"sftune {method}"
    return f"Loss curve of {name} ({len(losses)} steps): " + ("; ".join(parts) or "no per-step losses") + "."


def markdown(results: dict[str, Any]) -> str:
    gpu = all("peak_gpu_gib" in tools["sftune"] for tools in results["methods"].values())
    lines = [
        f"CPU: {results['cpu']}; matmul ceiling fp32 {results['ceiling']['fp32']:.0f} GFLOP/s, bf16 "
        f"{results['ceiling']['bf16']:.0f} GFLOP/s ({results['threads']} threads); {results['settings']}",
        "",
        "| method | tool | non-padding tok/s | supervised tok/s | CPU s | peak RSS GiB | final loss | MFU (fp32) |"
        + (" peak GPU GiB |" if gpu else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    for method, tools in results["methods"].items():
        rows = [(method, tool, tools[tool]) for tool in ("sftune", "trl")]
        rows += [(label, "sftune", variant) for label, variant in tools.get("variants", {}).items()]
        for label, tool, r in rows:
            lines.append(
                f"| {label} | {tool} | {r['tokens_per_s']:.1f} | {r['supervised_tokens_per_s']:.1f} | "
                f"{r['cpu_seconds']:.0f} | {r['peak_rss_gib']:.2f} | {r['final_loss']:.4f} | {r['mfu_fp32']:.1%} |"
                + (f" {r['peak_gpu_gib']:.2f} |" if gpu else "")
            )
        ratios = [(method, tools["ratios"])] + [(k, v["ratios"]) for k, v in tools.get("variants", {}).items()]
        for label, ratio in ratios:
            lines.append(
                f"| {label} | sftune / TRL | {ratio['tokens_per_s']:.2f}x | {ratio['supervised_tokens_per_s']:.2f}x | "
                f"{ratio['cpu_seconds']:.2f}x | {ratio['peak_rss_gib']:.2f}x | {ratio['final_loss']:+.1%} | |"
                + (f" {ratio['peak_gpu_gib']:.2f}x |" if gpu else "")
            )
    loads = [
        r["load_average_before"] for m in results["methods"].values() for t in ("sftune", "trl") for r in m[t]["runs"]
    ]
    lines += ["", f"Load average before the runs: {min(loads):.2f} to {max(loads):.2f}."]
    for method, tools in results["methods"].items():
        for label, variant in tools.get("variants", {}).items():
            lines.append(f"{label}: sftune {method} with {' '.join(variant['overrides'])}, against the same TRL runs.")
        curves = {label: tools[label] for label in ("sftune", "trl")} | tools.get("variants", {})
        lines += [loss_curve_line(method, label, curves[label], curves) for label in curves if label != "trl"]
    for method, tools in results["methods"].items():
        resolved = tools["sftune"]["runs"][0].get("resolved")
        if resolved and method == "lora":  # base_dtype only applies to lora
            lines.append(
                f"sftune {method}, its 'auto' settings on this machine: lora.base_dtype={resolved['lora.base_dtype']}, "
                f"train.gradient_checkpointing={resolved['train.gradient_checkpointing']}, host allocator "
                f"{resolved.get('host allocator', '?')} (MFU counts model FLOPs against the fp32 ceiling, whatever dtype "
                "the frozen base's products ran in)."
            )
        elif resolved:
            lines.append(
                f"sftune {method}: train.gradient_checkpointing={resolved['train.gradient_checkpointing']}, "
                f"train.offload_optimizer_state={resolved.get('train.offload_optimizer_state', '?')}, "
                f"host allocator {resolved.get('host allocator', '?')}."
            )
    return "\n".join(lines) + "\n"


DEFAULT_VARIANT = "full-offload:full:train.offload_optimizer_state=true"


def parse_variants(values: list[str]) -> dict[str, tuple[str, list[str]]]:
    """{label: (method, overrides)} from LABEL:METHOD:OVERRIDE[,OVERRIDE] arguments ('none' for no variant)."""
    variants = {}
    for value in values:
        if value == "none":
            continue
        label, method, overrides = value.split(":", 2)
        variants[label] = (method, overrides.split(","))
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument(
        "--quick", action="store_true", help="2 steps of micro-batch 2 at max length 128, once: a smoke run"
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--model", default=None, help="an HF model folder (default: the default model, converted)")
    parser.add_argument("--data", default=None, help="alpaca-style .json/.jsonl (default: alpaca_en_demo.json)")
    parser.add_argument("--trl-liger", action="store_true", help="TRL with use_liger_kernel=True (GPU)")
    parser.add_argument(
        "--sftune-override", action="append", default=[], help="dotted override for the sftune runs only, repeatable"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=None,
        help="LABEL:METHOD:OVERRIDE[,OVERRIDE]: one more sftune run of METHOD per repeat, compared with the same TRL "
        f"runs; repeatable ('none': no variant; default on a CPU: {DEFAULT_VARIANT})",
    )
    args = parser.parse_args()
    import torch

    default_variants = [] if torch.cuda.is_available() else [DEFAULT_VARIANT]  # the offload is for host memory
    variants = parse_variants(args.variant if args.variant is not None else default_variants)
    if args.quick:
        args.steps, args.repeats, args.max_length, args.micro_batch_size, args.accumulation = 2, 1, 128, 2, 1
    from sftune.model.load import resolve_model_path

    model = args.model or resolve_model_path("smollm2-135m-instruct")  # the HF folder both tools load
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    results: dict[str, Any] = {
        "cpu": cpu_model(),
        "ceiling": matmul_ceiling(threads),
        "threads": threads,
        "methods": {},
    }
    source = Path(args.data) if args.data else SHARED_DATA if SHARED_DATA.exists() else BUNDLED_DATA
    results["settings"] = (
        f"data {source.name}, {args.steps} steps of micro-batch {args.micro_batch_size} x accumulation "
        f"{args.accumulation}, max length {args.max_length}, fp32, LoRA r=16 all-linear dropout 0; "
        "TRL defaults: padded batches, gradient checkpointing; sftune defaults: padding-free rows, chunked loss, "
        "lora.base_dtype and train.gradient_checkpointing auto (resolved values below the table)"
        + (f"; sftune overrides: {' '.join(args.sftune_override)}" if args.sftune_override else "")
        + ("; TRL with use_liger_kernel=True" if args.trl_liger else "")
        + (f"; model {args.model}" if args.model else "")
    )
    with tempfile.TemporaryDirectory() as tmp:
        rows = args.steps * args.micro_batch_size * args.accumulation
        data = prepare_data(source, rows, Path(tmp) / "rows.jsonl")
        for method in args.methods.split(","):
            own = {label: overrides for label, (m, overrides) in variants.items() if m == method}
            # interleaved: sftune, TRL, then this method's variants, each repeat, so all see the same machine noise
            order = [("sftune", "sftune", []), ("trl", "trl", [])] + [(k, "sftune", v) for k, v in own.items()]
            runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in order}
            for repeat in range(args.repeats):
                for label, tool, overrides in order:
                    spec = {
                        "model": model, "data": str(data), "method": method, "steps": args.steps,
                        "micro_batch_size": args.micro_batch_size, "accumulation": args.accumulation,
                        "max_length": args.max_length, "lr": 2e-4 if method == "lora" else 2e-5,
                        "out": str(Path(tmp) / f"{label}-{method}-{repeat}"),
                        "overrides": args.sftune_override + overrides, "liger": args.trl_liger,
                    }  # fmt: skip
                    started = time.time()
                    runs[label].append(run_child(tool, spec))
                    print(f"{method} {label} run {repeat + 1}: {runs[label][-1]['tokens_per_s']:.1f} tok/s, "
                          f"{runs[label][-1]['peak_rss_gib']:.2f} GiB, {time.time() - started:.0f}s", flush=True)  # fmt: skip
            tools = {label: summarize(r, results["ceiling"], method, model) for label, r in runs.items()}
            trl = tools.pop("trl")
            measured = {
                label: {**summary, "ratios": ratios_to(summary, trl)}
                | ({"overrides": own[label]} if label in own else {})
                for label, summary in tools.items()
            }
            sftune = measured.pop("sftune")
            results["methods"][method] = {"sftune": sftune, "trl": trl, "ratios": sftune.pop("ratios")}
            results["methods"][method] |= {"variants": measured} if measured else {}
    (out / "compare.json").write_text(json.dumps(results, indent=2))
    (out / "compare.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
