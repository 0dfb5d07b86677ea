"""Where one sftune training process's memory goes: resident memory (RSS) per phase, sftune only, bench settings.

    python bench/memory_profile.py [--method lora] [--steps 4] [--repeats 1] [-o train.x=y ...]

Trains with bench/compare.py's settings (the default model, the first rows of ../shared/data/alpaca_en_demo.json,
max length 512, micro-batch 4 x accumulation 2, fp32, LoRA r=16 all-linear dropout 0) in a fresh child process per
run. The child samples VmRSS from /proc/self/status every 20 ms on a thread and marks the phases (imports, data,
model, each step's forward+backward and optimizer update); it prints, per phase, the RSS at its end and the highest
RSS seen during it, then peak RSS (ru_maxrss), CPU seconds and non-padding tokens/s of the steps after the first.
Each `--variant "a=b C=d"` (repeatable; they run interleaved, each --repeats times) holds dotted sftune overrides and
upper-case environment variables for the child (MALLOC_MMAP_THRESHOLD_=N and the like set glibc's own tunables).
Not a test: a profile to read (bench/results/memory_profile.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from compare import BUNDLED_DATA, SHARED_DATA, prepare_data  # noqa: E402

CHILD = r"""
import json, os, resource, sys, threading, time
os.environ["HF_HUB_OFFLINE"] = "1"
spec = json.loads(sys.argv[1])
START = time.time()
samples, marks = [], []  # (seconds, rss bytes, malloc bytes in use), (seconds, phase that ends there)
import ctypes
class MallInfo2(ctypes.Structure):
    names = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    _fields_ = [(name, ctypes.c_size_t) for name in names]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def in_use() -> int:
    info = libc.mallinfo2()  # every arena: bytes handed out from the heaps + mmapped chunks
    return info.uordblks + info.hblkhd

def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0

def sample() -> None:
    while True:
        samples.append((time.time() - START, rss(), in_use()))
        time.sleep(0.02)

def mark(name: str) -> None:
    samples.append((time.time() - START, rss(), in_use()))
    marks.append((time.time() - START, name))

threading.Thread(target=sample, daemon=True).start()
import torch
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
import yaml
import sftune.recipes.sft as sft
import sftune.training.loop as loop
from sftune.cli import main
mark("imports")

def timed(name, function):
    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        mark(name)
        return result
    return wrapper

if os.environ.get("BENCH_TRIM"):  # experiment: glibc's malloc_trim(0) after every micro-batch's backward
    import contextlib
    import sftune.training.step as step_module
    untrimmed_sync = step_module.gradient_sync
    @contextlib.contextmanager
    def trimmed_sync(*args, **kwargs):
        with untrimmed_sync(*args, **kwargs):
            yield
        libc.malloc_trim(0)
    step_module.gradient_sync = trimmed_sync
# Phase marks only: the wrapped functions run unchanged.
sft.setup_data = timed("data", sft.setup_data)
sft.setup_model = timed("model", sft.setup_model)
loop.build_optimizer = timed("optimizer", loop.build_optimizer)
loop.backward_window = timed("forward+backward", loop.backward_window)
loop.optimizer_step = timed("update", loop.optimizer_step)
config = {
    "model": {"name_or_path": spec["model"]},
    "data": {"train": spec["data"], "max_length": 512, "shuffle": False, "format": "messages",
             "truncation": "truncate"},
    "train": {"method": spec["method"], "learning_rate": 2e-4 if spec["method"] == "lora" else 2e-5,
              "lr_scheduler": "constant", "warmup_steps": 0, "warmup_ratio": 0.0, "max_steps": spec["steps"],
              "micro_batch_size": 4, "gradient_accumulation_steps": 2, "precision": "fp32", "max_grad_norm": 1.0,
              "seed": 42, "progress": False},
    "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
    "output": {"dir": spec["out"], "overwrite": True},
}
path = spec["out"] + ".yaml"
open(path, "w").write(yaml.safe_dump(config))
assert main(["train", path, *spec["overrides"]]) == 0
mark("save")
usage = resource.getrusage(resource.RUSAGE_SELF)
records = [json.loads(l) for l in open(os.path.join(spec["out"], "metrics.jsonl")) if '"loss"' in l]
updates = [t for t, name in marks if name == "update"]
tokens = [r["tokens_seen"] for r in records]
phases, previous = [], 0.0
for t, name in marks:
    inside = [(r, u) for s, r, u in samples if previous <= s <= t]
    phases.append({"phase": name, "end_gib": inside[-1][0] / 2**30, "max_gib": max(r for r, _ in inside) / 2**30,
                   "in_use_end_gib": inside[-1][1] / 2**30, "in_use_max_gib": max(u for _, u in inside) / 2**30})
    previous = t
print("PROFILE " + json.dumps({
    "peak_rss_gib": usage.ru_maxrss / 2**20, "cpu_seconds": usage.ru_utime + usage.ru_stime,
    "tokens_per_s": (tokens[-1] - tokens[0]) / (updates[-1] - updates[0]) if len(updates) > 1 else 0.0,
    "final_loss": records[-1]["loss"], "losses": [r["loss"] for r in records], "phases": phases,
}))
"""


def run(method: str, steps: int, variant: list[str], data: Path, out: Path) -> dict:
    """`variant`: dotted sftune overrides, and NAME=value environment variables (upper-case names, e.g. glibc's
    MALLOC_ARENA_MAX=2) for the child."""
    extra_env = dict(v.split("=", 1) for v in variant if v.split("=", 1)[0].isupper())
    overrides = [v for v in variant if not v.split("=", 1)[0].isupper()]
    from sftune.model.load import resolve_model_path

    spec = {"model": resolve_model_path("smollm2-135m-instruct"), "data": str(data), "method": method,
            "steps": steps, "out": str(out), "overrides": overrides}  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra_env}
    # The child runs sftune's command in-process (to mark its phases), so it is started on the host allocator
    # the command would start itself on (host/allocator.py), unless the variant asks for the system's.
    from sftune.host.allocator import mimalloc_library

    library = mimalloc_library()
    if library is not None and "train.host_allocator=system" not in overrides and "LD_PRELOAD" not in extra_env:
        env["LD_PRELOAD"] = str(library)
    load = os.getloadavg()[0]
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, env=env)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("PROFILE ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return {**json.loads(line[8:]), "load_average_before": load}


def show(name: str, result: dict, phases: bool) -> None:
    print(f"{name}: peak {result['peak_rss_gib']:.2f} GiB, {result['tokens_per_s']:.1f} tok/s, "
          f"CPU {result['cpu_seconds']:.0f} s, loss {result['final_loss']:.4f}, "
          f"load {result['load_average_before']:.2f}", flush=True)  # fmt: skip
    if phases:
        for p in result["phases"]:
            print(
                f"    {p['phase']:<18} RSS end {p['end_gib']:.2f} max {p['max_gib']:.2f} GiB; "
                f"malloc in use end {p['in_use_end_gib']:.2f} max {p['in_use_max_gib']:.2f} GiB"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lora", choices=["lora", "full", "qlora"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--variant", action="append", default=[], help='dotted overrides, e.g. "a=b c=d"; repeat')
    parser.add_argument("--quiet", action="store_true", help="no per-phase lines")
    args = parser.parse_args()
    variants = args.variant or [""]
    source = SHARED_DATA if SHARED_DATA.exists() else BUNDLED_DATA
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_data(source, args.steps * 8, Path(tmp) / "rows.jsonl")
        for repeat in range(args.repeats):
            for index, variant in enumerate(variants):  # interleaved: the variants see the same machine noise
                result = run(args.method, args.steps, shlex.split(variant), data, Path(tmp) / f"run-{index}-{repeat}")
                show(f"{args.method} [{variant or 'sftune as is'}] run {repeat + 1}", result, not args.quiet)


if __name__ == "__main__":
    main()
