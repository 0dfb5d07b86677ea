"""The README demo: fine-tune the default model, evaluate base and tuned model on held-out rows, report both.

Honest by construction: the held-out rows are never trained on, decoding is greedy, and the base and the
tuned model answer the very same prompts rendered with the very same template. The evaluation is
`sftune eval RUN --data heldout.jsonl --baseline BASE`; its report lands in RUN/eval. The demo is a user of the
public API (`sftune.train`, `sftune.evaluate`), like any script a user would write: it borrows from no recipe.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

import sftune
from sftune.config import Config, load_config

SHOWN_METRICS = {
    "exact_match": "exact match",
    "json_fields": "JSON fields",
    "json_valid": "valid JSON",
    "stop_rate": "stopped at end-of-turn",
}


def demo_config(overrides: list[str] | None = None) -> Config:
    """The shipped demo config (sftune/demo/demo.yaml), its data paths resolved inside the installed package."""
    config_path = Path(str(resources.files("sftune.demo").joinpath("demo.yaml")))
    return load_config(config_path, overrides)


def demo(out_dir: str, overrides: list[str]) -> dict[str, Any]:
    """`sftune demo`: train on the shipped task, then evaluate base and tuned model on its held-out rows."""
    started = time.perf_counter()
    config = demo_config([f"output.dir={out_dir}", "output.overwrite=true", *overrides])
    heldout = config.data.validation or config.data.train

    # Training runs first: on CPU, generating beforehand leaves the allocator in a state that makes the
    # training steps about twice as slow. The order changes nothing in the scores.
    print(f"[1/2] fine-tuning {config.model.name_or_path} ({config.train.method}) on {config.data.train}")
    result = sftune.train(config)
    print(f"[2/2] evaluating the base and the fine-tuned model on the held-out rows of {heldout} (greedy)")
    results = sftune.evaluate(
        str(result.run_dir),
        heldout,
        config.eval,
        result.run_dir / "eval",
        baseline=config.model.name_or_path,
        run_dir=result.run_dir,
        progress=config.train.progress,
    )
    summary = {"method": config.train.method, **results, "seconds": time.perf_counter() - started}
    (result.run_dir / "demo_results.json").write_text(json.dumps(summary, indent=2))
    print_table(summary, result.run_dir / "eval")
    print_method_choice(config.train.method, json.loads((result.run_dir / "data_report.json").read_text())["memory"])
    return summary


def print_table(summary: dict[str, Any], eval_dir: Path) -> None:
    before, after = summary["models"]["baseline"], summary["models"]["model"]
    print(f"\nHeld-out rows: {summary['rows']} (never trained on), greedy decoding, same prompts before and after")
    print(f"{'metric':<24}{'before SFT':>12}{'after SFT':>12}")
    for key, name in SHOWN_METRICS.items():
        print(f"{name:<24}{before[key]:>12.1%}{after[key]:>12.1%}")
    print(f"{'loss on answers':<24}{before['loss']:>12.3f}{after['loss']:>12.3f}")
    print("\nSamples:")
    lines = [json.loads(line) for line in (eval_dir / "generations.jsonl").read_text().splitlines()[:3]]
    for line in lines:
        print(f"  input : {line['prompt'].splitlines()[-1]}")
        print(f"  before: {line['baseline']['output'][:100]!r}")
        print(f"  after : {line['model']['output'][:100]!r}")
    print(f"\nReport: {eval_dir / 'report.html'} (and report.md)")
    print(f"Total time {summary['seconds']:.0f}s")


def print_method_choice(method: str, memory: dict[str, Any] | None) -> None:
    """The same demo with the other methods, and the peak memory the data check estimated for each."""
    if not memory:
        return
    print("\nMethods (estimated peak memory for this data, from the data check; see README 'which to choose'):")
    for other, command in METHOD_COMMANDS.items():
        mark = "  <- this run" if other == method else ""
        print(f"  {other:<6}{memory[f'{other}_gib']:>6.2f} GiB  sftune demo {command}{mark}")


METHOD_COMMANDS = {
    "full": "train.method=full",
    "lora": "train.method=lora train.learning_rate=1e-3",
    "qlora": "train.method=qlora train.learning_rate=1e-3",
}
