"""The evaluation report: a Markdown file and a self-contained HTML page (plots inlined, opens offline).

Metrics side by side (baseline, model, change), the training loss and validation curves of the run when
there is one (and, for a preference run, its loss, rewards, reward accuracy, margin and log-probs), sample
generations from the run's evaluations, and held-out prompts with both models' outputs.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftune.infer.prompts import PromptRow
from sftune.infer.types import Generation
from sftune.training.metrics import MetricsLog, plot_loss_curve, plot_validation_curve

# metric -> (label, how to show it)
METRIC_ROWS: dict[str, tuple[str, str]] = {
    "exact_match": ("exact match", "percent"),
    "json_valid": ("valid JSON", "percent"),
    "json_fields": ("JSON fields correct", "percent"),
    "rouge_l": ("ROUGE-L F1", "fraction"),
    "stop_rate": ("stopped at end-of-turn", "percent"),
    "mean_length": ("mean output tokens", "number"),
    "loss": ("loss on reference tokens", "loss"),
    "perplexity": ("perplexity", "loss"),
}


@dataclass
class ModelEval:
    """One model's results: aggregate metrics, its generations and per-row scores (same order as the rows)."""

    label: str
    path: str
    metrics: dict[str, Any]
    generations: list[Generation] = field(default_factory=list)
    per_row: list[dict[str, Any]] = field(default_factory=list)
    template: str = ""  # the chat template its prompts were rendered with


def write_report(
    out_dir: Path,
    results: dict[str, Any],
    rows: list[PromptRow],
    evaluated: list[ModelEval],
    num_samples: int,
    run_dir: str | Path | None = None,
) -> list[Path]:
    """report.md and report.html in `out_dir`, plus the PNG plots they show."""
    images = plot_run(Path(run_dir), out_dir) if run_dir else []
    training_samples = read_training_samples(Path(run_dir)) if run_dir else []
    sections = build_sections(results, rows, evaluated, num_samples, training_samples)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(render_markdown(sections, images))
    html_path.write_text(render_report_html(sections, images))
    return [md_path, html_path]


def plot_run(run_dir: Path, out_dir: Path) -> list[Path]:
    records = MetricsLog(run_dir / "metrics.jsonl").read()
    plots = [
        plot_loss_curve(records, out_dir / "loss.png"),
        plot_validation_curve(records, out_dir / "validation.png"),
        plot_preference_curves(records, out_dir / "preference.png"),
    ]
    return [p for p in plots if p is not None]


# panel title -> the metrics.jsonl keys of a preference run (sftune dpo) it plots; val_* at each evaluation
PREFERENCE_PANELS: dict[str, tuple[str, ...]] = {
    "preference loss": ("loss", "val_loss"),
    "reward accuracy": ("reward_accuracy", "val_reward_accuracy"),
    "reward margin (chosen - rejected)": ("reward_margin", "val_reward_margin"),
    "rewards": ("rewards_chosen", "rewards_rejected", "val_rewards_chosen", "val_rewards_rejected"),
    "log-probs of the responses": ("logps_chosen", "logps_rejected", "val_logps_chosen", "val_logps_rejected"),
}


def preference_series(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Each preference metric's (step, value) points, in step order; empty for a run that is not a preference run."""
    if not any("reward_accuracy" in r for r in records):
        return {}
    keys = [key for panel in PREFERENCE_PANELS.values() for key in panel]
    return {key: [(r["step"], r[key]) for r in records if key in r] for key in keys if any(key in r for r in records)}


def plot_preference_curves(records: list[dict[str, Any]], path: Path) -> Path | None:
    """One panel per PREFERENCE_PANELS entry, training lines and validation points; None for a non-preference run."""
    series = preference_series(records)
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (title, keys) in zip(axes.flat, PREFERENCE_PANELS.items(), strict=False):
        for key in (k for k in keys if k in series):
            ax.plot(*zip(*series[key], strict=True), "o--" if key.startswith("val_") else "-", label=key, linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes.flat[-1].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_training_samples(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "samples.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ content


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


def build_sections(
    results: dict[str, Any],
    rows: list[PromptRow],
    evaluated: list[ModelEval],
    num_samples: int,
    training_samples: list[dict[str, Any]],
) -> list[Table]:
    tables = [metrics_table(results, evaluated)]
    if training_samples:
        tables.append(training_samples_table(training_samples))
    tables.append(samples_table(rows, evaluated, num_samples))
    return tables


def metrics_table(results: dict[str, Any], evaluated: list[ModelEval]) -> Table:
    labels = [e.label for e in evaluated]
    header = ["metric", *labels, *(["change"] if len(evaluated) == 2 else [])]
    table_rows = []
    for key, (name, kind) in METRIC_ROWS.items():
        values = [e.metrics.get(key) for e in evaluated]
        if all(v is None for v in values):
            continue
        cells = [format_value(v, kind) for v in values]
        if len(values) == 2:
            cells.append(format_change(values[0], values[1], kind))
        table_rows.append([name, *cells])
    settings = results["settings"]
    decoding = "greedy" if settings["temperature"] == 0 else f"temperature {settings['temperature']}"
    note = (
        f"{results['rows']} rows of {results['data']} ({results['rows_with_reference']} with a reference, "
        f"{len(results['rejected'])} rejected); {decoding}, at most {settings['max_new_tokens']} new tokens; "
        f"exact match on the '{settings['extractor']}' answer. Both models answer the same rows, each rendered "
        "with its saved chat template (a baseline without one gets the tuned model's)."
    )
    return Table("Metrics", header, table_rows, note)


def training_samples_table(samples: list[dict[str, Any]]) -> Table:
    """What the model wrote for fixed validation prompts at each evaluation during training."""
    table_rows = [[str(s["step"]), s["prompt"], s["output"]] for s in samples]
    return Table("Generations during training", ["step", "prompt", "output"], table_rows)


def samples_table(rows: list[PromptRow], evaluated: list[ModelEval], num_samples: int) -> Table:
    header = ["id", "prompt", "reference", *(e.label for e in evaluated)]
    table_rows = []
    for index, row in enumerate(rows[:num_samples]):
        outputs = [mark_output(e, index) for e in evaluated]
        table_rows.append([row.id, row.prompt_text, row.reference or "", *outputs])
    return Table(f"Samples (first {min(num_samples, len(rows))} rows)", header, table_rows)


def mark_output(evaluated: ModelEval, index: int) -> str:
    generation, scores = evaluated.generations[index], evaluated.per_row[index]
    flags = [] if generation.finished else ["[cut at max_new_tokens]"]
    if "exact_match" in scores:
        flags.append("[correct]" if scores["exact_match"] else "[wrong]")
    return " ".join([generation.output, *flags])


def format_value(value: Any, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "percent":
        return f"{100 * value:.1f}%"
    if kind == "fraction":
        return f"{value:.3f}"
    if kind == "loss":
        return f"{value:.4f}" if value < 1e6 else "inf"
    return f"{value:.1f}"


def format_change(before: Any, after: Any, kind: str) -> str:
    if before is None or after is None:
        return ""
    delta = after - before
    if kind == "percent":
        return f"{100 * delta:+.1f} pts"
    return f"{delta:+.3f}" if kind in ("fraction", "loss") else f"{delta:+.1f}"


# ------------------------------------------------------------------------------------------ rendering


def render_markdown(tables: list[Table], images: list[Path]) -> str:
    parts = ["# sftune evaluation report", ""]
    parts += markdown_table(tables[0])
    if images:
        parts += ["## Training curves", ""] + [f"![{p.stem}]({p.name})" for p in images] + [""]
    for table in tables[1:]:
        parts += markdown_table(table)
    return "\n".join(parts)


def markdown_table(table: Table) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = [f"## {table.title}", ""]
    if table.note:
        lines += [table.note, ""]
    lines.append("| " + " | ".join(table.header) + " |")
    lines.append("|" + "---|" * len(table.header))
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table.rows]
    return [*lines, ""]


def render_report_html(tables: list[Table], images: list[Path]) -> str:
    body = [html_table(tables[0])]
    if images:
        body.append("<h2>Training curves</h2>")
        body += [f'<img alt="{p.stem}" src="data:image/png;base64,{encode_png(p)}">' for p in images]
    body += [html_table(t) for t in tables[1:]]
    return HTML_PAGE.format(body="\n".join(body))


def html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    note = f"<p>{html.escape(table.note)}</p>" if table.note else ""
    return f"<h2>{html.escape(table.title)}</h2>{note}<table><tr>{head}</tr>{rows}</table>"


def encode_png(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


HTML_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sftune evaluation report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; width: 100%; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top;
  white-space: pre-wrap; font-size: 0.9em; }}
th {{ background: #f0f0f0; }}
img {{ max-width: 48%; margin: 0 1% 1em 0; border: 1px solid #ddd; }}
</style></head>
<body><h1>sftune evaluation report</h1>
{body}
</body></html>
"""
