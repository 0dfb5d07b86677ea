"""metrics.jsonl, the progress bar and the loss-curve PNG."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sftune.host.files import write_text_atomic
from sftune.host.memory import peak_memory


class MetricsLog:
    """Appends one JSON object per line; reading it back gives the whole run, resumed parts included."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled  # False on the ranks above 0 of a distributed run: rank 0 writes the log

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint, which the resumed run will redo. The file is
        replaced whole (written beside it, then renamed), never rewritten in place: a crash at any moment leaves
        the old records or the new ones, never fewer."""
        if self.path.exists():
            kept = [r for r in self.read() if r.get("step", 0) <= step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def read(self) -> list[dict[str, Any]]:
        """Every record; a last line torn by a crash mid-write is dropped (it is the step a resume redoes)."""
        if not self.path.exists():
            return []
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        records = []
        for index, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if index != len(lines) - 1:
                    raise
        return records


class Throughput:
    """Tokens per second over the steps since the last call."""

    def __init__(self) -> None:
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        self.start, self.tokens = time.perf_counter(), 0
        return rate


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def log_step(log: MetricsLog, bar: Any, step: int, epoch: int, tokens_seen: int, values: dict[str, float]) -> None:
    """One metrics.jsonl line for an optimizer step (loss, lr, grad_norm, tokens_per_s, ..., the peak memory so
    far) and the bar's postfix."""
    log.write({"step": step, "epoch": epoch, **values, "tokens_seen": tokens_seen, **peak_memory()})
    shown = {"loss": "{:.4f}", "lr": "{:.2e}", "tokens_per_s": "{:.0f}"}
    bar.set_postfix({key: fmt.format(values[key]) for key, fmt in shown.items() if key in values})


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def plot_loss_curve(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Training loss per step and validation loss where measured; None when there is nothing to plot."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (supervised tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_validation_curve(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Validation loss and perplexity at each evaluation; None when the run measured no validation loss."""
    val = [(r["step"], r["val_loss"], r.get("val_ppl", perplexity(r["val_loss"]))) for r in records if "val_loss" in r]
    if not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses, ppls = zip(*val, strict=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, "o-", color="tab:orange", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (response tokens)")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(steps, ppls, "s--", color="tab:green", label="perplexity")
    twin.set_ylabel("perplexity")
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [str(line.get_label()) for line in lines])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
