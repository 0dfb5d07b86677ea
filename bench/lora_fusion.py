"""Fused LoRA (lora.fuse_shared_inputs) against PEFT's own layers: forward + backward time of a LoRA step.

    python bench/lora_fusion.py [--tokens 512] [--repeats 6] [--dropouts 0 0.05] [--method lora] [--threads 2]

Both variants of the default model (SmolLM2-135M-Instruct, LoRA r=16 on every block linear, fp32) live in this
one process and are timed interleaved (the order alternating between repeats), so they see the same machine
noise; the first step of each is a warm-up and is dropped. A step is the decoder blocks' forward on one
padding-free row of `--tokens` tokens, a scalar of the last hidden state, and the backward into every adapter and
the blocks' input: the part of a training step the fusion changes (the LM head and loss are the same code in
both). A third variant, "base", runs the same step with the adapters switched off: the frozen base alone, the
speed adapters should approach. Reports median wall and CPU seconds per step and the ratio fused / PEFT, with the
CPU model and the load average before and after. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from sftune.config import load_config
from sftune.model.load import load_model
from sftune.model.lora import prepare_model

MODEL = "smollm2-135m-instruct"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return "unknown"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def prepared(method: str, fuse: bool, dropout: float) -> Any:
    config = load_config(
        {
            "data": {"train": "unused.json"},
            "train": {"method": method},
            "lora": {"r": 16, "alpha": 32, "dropout": dropout, "fuse_shared_inputs": fuse},
        }
    )
    torch.manual_seed(0)
    model = prepare_model(load_model(MODEL, torch.float32, "cpu"), config)
    model.train()
    return model


def time_step(model: Any, input_ids: torch.Tensor, adapters: bool = True) -> tuple[float, float]:
    """(wall, CPU) seconds of one forward + backward through the decoder blocks. The backward always reaches the
    blocks' input (as it must in LoRA, for the adapters of the layers below), so `adapters=False` times the frozen
    base alone: the floor that adapters add to."""
    for parameter in model.parameters():
        parameter.grad = None
    decoder = model.base_model.model.model
    embeddings = decoder.embed_tokens(input_ids).detach().requires_grad_(True)  # [1, tokens, hidden]
    switch = contextlib.nullcontext() if adapters else model.disable_adapter()
    wall, cpu = time.perf_counter(), time.process_time()
    with switch:
        hidden = decoder(inputs_embeds=embeddings).last_hidden_state  # [1, tokens, hidden]
        hidden.pow(2).mean().backward()
    return time.perf_counter() - wall, time.process_time() - cpu


def compare(method: str, dropout: float, tokens: int, repeats: int) -> dict[str, float]:
    models = {"peft": prepared(method, False, dropout), "fused": prepared(method, True, dropout)}
    input_ids = torch.randint(
        0, models["peft"].config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0)
    )
    steps = {
        "base": lambda: time_step(models["peft"], input_ids, adapters=False),
        "peft": lambda: time_step(models["peft"], input_ids),
        "fused": lambda: time_step(models["fused"], input_ids),
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for repeat in range(repeats + 1):
        order = list(steps) if repeat % 2 == 0 else list(reversed(steps))
        for name in order:
            measured = steps[name]()
            if repeat > 0:  # the first round is a warm-up
                times[name].append(measured)
    result: dict[str, float] = {}
    for name, samples in times.items():
        result[f"{name}_wall"] = statistics.median(s[0] for s in samples)
        result[f"{name}_wall_min"] = min(s[0] for s in samples)  # least disturbed by other work on the machine
        result[f"{name}_cpu"] = statistics.median(s[1] for s in samples)
    # every fused/PEFT pair taken in the same round: how often fused was faster
    result["fused_faster_rounds"] = sum(f[0] < p[0] for f, p in zip(times["fused"], times["peft"], strict=True))
    return result


def table_row(method: str, dropout: float, r: dict[str, float], repeats: int) -> str:
    def overhead(name: str) -> str:  # adapters' cost above the frozen base, fastest steps
        return f"{100 * (r[f'{name}_wall_min'] / r['base_wall_min'] - 1):+.0f}%"

    cells = [
        method,
        f"{dropout}",
        f"{r['base_wall']:.3f}",
        f"{r['peft_wall']:.3f}",
        f"{r['fused_wall']:.3f}",
        f"**{r['fused_wall'] / r['peft_wall']:.2f}x**",
        f"{r['fused_wall_min'] / r['peft_wall_min']:.2f}x",
        f"{r['fused_cpu'] / r['peft_cpu']:.2f}x",
        f"{int(r['fused_faster_rounds'])}/{repeats}",
        f"{overhead('peft')} / {overhead('fused')}",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512, help="tokens in the one padding-free row")
    parser.add_argument("--repeats", type=int, default=6, help="measured steps per variant (after one warm-up)")
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.05], help="lora.dropout values")
    parser.add_argument("--method", choices=["lora", "qlora"], default="lora")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()}; torch threads {args.threads}; load average before: {load_average()}")
    rows = [
        table_row(args.method, d, compare(args.method, d, args.tokens, args.repeats), args.repeats)
        for d in args.dropouts
    ]
    print(f"load average after: {load_average()}")
    print(
        f"\n{args.tokens} tokens per step, LoRA r=16 all-linear, fp32, {args.repeats} interleaved steps per variant\n"
    )
    print(
        "| method | dropout | base s | PEFT s | fused s | fused / PEFT | same, fastest steps | same, CPU s "
        "| fused faster in | adapters over base, PEFT / fused |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nbase / PEFT / fused s: median wall seconds per step; CPU s: median CPU seconds of the process.")


if __name__ == "__main__":
    main()
