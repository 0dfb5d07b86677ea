"""Full fine-tuning under a hard memory limit: does a run fit, and at what speed, with and without the AdamW moments
offloaded to a file (`train.offload_optimizer_state`)?

    python bench/memory_limit.py [--limit-gib 2.38] [--steps 4] [--out bench/results]

A process's peak RSS leaves out the page cache, where the offloaded moments' file lives while RAM is free. A memory
cgroup's limit counts both (the kernel charges the file's cached pages to the cgroup and must write them back and
drop them to stay under it), so a run that completes under the limit fits in that much memory, page cache included.
Each run is `sftune train` (the bench's model, data and settings of bench/compare.py) in a fresh child cgroup with
that limit; the table gives whether it completed or was killed for memory, its tokens/s, and the cgroup's peak usage
(RSS + page cache). Needs a writable memory cgroup (v1 or v2: root in a container, or a delegated cgroup; on v2 the
parent must hand the memory controller to its children, cgroup.subtree_control). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import BUNDLED_DATA, SHARED_DATA, _cpu_name, prepare_data  # noqa: E402

RUNS = {  # 'auto' sees the cgroup's limit (model/memory.available_memory_bytes) and offloads by itself
    "full, train.offload_optimizer_state=false": ["train.offload_optimizer_state=false"],
    "full, defaults (offload auto)": [],
}


class MemoryCgroup:
    """A child of this process's memory cgroup with a hard limit (v1: memory.limit_in_bytes, v2: memory.max)."""

    def __init__(self, limit_bytes: int, name: str) -> None:
        self.folder, self.v1 = own_memory_cgroup()
        self.folder = self.folder / name
        self.folder.mkdir()
        limit_file = "memory.limit_in_bytes" if self.v1 else "memory.max"
        (self.folder / limit_file).write_text(str(limit_bytes))
        swap = self.folder / ("memory.memsw.limit_in_bytes" if self.v1 else "memory.swap.max")
        if swap.exists():  # no swapping around the limit (v1: memory + swap together)
            swap.write_text(str(limit_bytes) if self.v1 else "0")

    def add(self, pid: int) -> None:
        (self.folder / "cgroup.procs").write_text(str(pid))

    def peak_bytes(self) -> int:
        peak = self.folder / ("memory.max_usage_in_bytes" if self.v1 else "memory.peak")
        return int(peak.read_text()) if peak.exists() else -1

    def oom_kills(self) -> int:
        events = self.folder / ("memory.oom_control" if self.v1 else "memory.events")
        for line in events.read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def remove(self) -> None:
        self.folder.rmdir()


def own_memory_cgroup() -> tuple[Path, bool]:
    """This process's memory cgroup folder, and whether it is cgroup v1."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/"), True
        if controllers == "" and (Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max").exists():
            return Path("/sys/fs/cgroup") / path.lstrip("/"), False
    raise SystemExit("no writable memory cgroup for this process: run as root in a container or a delegated cgroup")


def write_config(out: Path, data: Path, model: str, steps: int) -> Path:
    """bench/compare.py's sftune settings for full fine-tuning (micro-batch 4 x accumulation 2, max length 512)."""
    config = {
        "model": {"name_or_path": model},
        "data": {"train": str(data), "max_length": 512, "shuffle": False, "format": "messages",
                 "truncation": "truncate"},
        "train": {"method": "full", "learning_rate": 2e-5, "lr_scheduler": "constant", "warmup_steps": 0,
                  "warmup_ratio": 0.0, "max_steps": steps, "micro_batch_size": 4, "gradient_accumulation_steps": 2,
                  "precision": "fp32", "max_grad_norm": 1.0, "seed": 42, "progress": False, "num_threads": 2},
        "output": {"dir": str(out), "overwrite": True},
    }  # fmt: skip
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def run_limited(config: Path, overrides: list[str], limit_bytes: int, name: str) -> dict[str, Any]:
    cgroup = MemoryCgroup(limit_bytes, name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.time()
    child = subprocess.Popen(
        [sys.executable, "-m", "sftune.cli", "train", str(config), *overrides],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        preexec_fn=lambda: cgroup.add(os.getpid()),
    )
    output, _ = child.communicate()
    result = {
        "completed": child.returncode == 0,
        "returncode": child.returncode,
        "oom_kills": cgroup.oom_kills(),
        "cgroup_peak_gib": cgroup.peak_bytes() / 2**30,
        "wall_seconds": time.time() - started,
    }
    metrics = Path(str(config).removesuffix(".yaml")) / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    steps = [json.loads(line) for line in lines if '"loss"' in line]
    if steps:  # as bench/compare.py: each step's seconds from its tokens and logged rate, the first one as warm-up
        seen = [0] + [r["tokens_seen"] for r in steps]
        timed = [(seen[i + 1] - seen[i], r["tokens_per_s"]) for i, r in enumerate(steps)][1:] or [(1, 0.0)]
        seconds = sum(tokens / rate for tokens, rate in timed if rate)
        result |= {"steps_done": len(steps), "final_loss": steps[-1]["loss"]}
        result |= {"peak_rss_gib": steps[-1].get("peak_rss_gib"), "tokens_per_s": sum(t for t, _ in timed) / seconds}
    if not result["completed"]:
        result["output_tail"] = output[-1500:]
    cgroup.remove()
    return result


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"CPU: {results['cpu']}; hard memory limit {results['limit_gib']:.2f} GiB (a memory cgroup: RSS and page cache "
        f"together); full fine-tuning, bench/compare.py's settings, {results['steps']} steps",
        "",
        "| run | completed | steps | tok/s | peak RSS GiB | cgroup peak GiB (RSS + page cache) | final loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in results["runs"].items():
        done = "yes" if r["completed"] else f"no (exit {r['returncode']}, {r['oom_kills']} OOM kills)"
        lines.append(
            f"| {label} | {done} | {r.get('steps_done', 0)} | {r.get('tokens_per_s', 0):.1f} | "
            f"{r.get('peak_rss_gib') or 0:.2f} | {r['cgroup_peak_gib']:.2f} | {r.get('final_loss', float('nan')):.4f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-gib", type=float, default=2.38, help="default: 0.4x TRL's peak RSS in bench/compare")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    from sftune.model.load import resolve_model_path

    model = resolve_model_path("smollm2-135m-instruct")
    source = SHARED_DATA if SHARED_DATA.exists() else BUNDLED_DATA
    results: dict[str, Any] = {"cpu": _cpu_name(), "limit_gib": args.limit_gib, "steps": args.steps, "runs": {}}
    with tempfile.TemporaryDirectory(dir=Path(args.out).resolve().parent) as tmp:  # on the disk, not a tmpfs
        data = prepare_data(source, args.steps * 8, Path(tmp) / "rows.jsonl")
        for index, (label, overrides) in enumerate(RUNS.items()):
            config = write_config(Path(tmp) / f"run{index}", data, model, args.steps)
            result = run_limited(config, overrides, int(args.limit_gib * 2**30), f"sftune-limit-{os.getpid()}-{index}")
            results["runs"][label] = result
            print(label, json.dumps({k: v for k, v in result.items() if k != "output_tail"}), flush=True)
    out = Path(args.out)
    (out / "memory_limit.json").write_text(json.dumps(results, indent=2))
    (out / "memory_limit.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
