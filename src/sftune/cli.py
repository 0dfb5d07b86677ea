"""Command line: parses arguments and calls recipes; no logic of its own."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from sftune.config import ConfigError, load_config
from sftune.eval.metrics import EXTRACTORS, METRICS

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, FileNotFoundError)


def _user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that are the user's to fix: printed as one clear message, never as a traceback."""
    from sftune.data.formats import DataError
    from sftune.data.templates import TemplateError
    from sftune.model.load import ModelLoadError
    from sftune.model.lora import AdapterError
    from sftune.recipes.sft import RunError

    return (*USER_ERRORS, DataError, TemplateError, ModelLoadError, AdapterError, RunError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sftune", description="Supervised fine-tuning of causal language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune a model from a YAML config")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.learning_rate=1e-4")
    train.add_argument("--resume", help="'auto' (newest checkpoint of the run) or a checkpoint folder")
    train.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    train.epilog = "config keys (section.key: description):\n" + describe_config()
    train.formatter_class = argparse.RawDescriptionHelpFormatter

    generate = commands.add_parser("generate", help="generate a reply with the template saved at training")
    generate.add_argument("model", help="run folder, model folder, .gguf file or named model")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one user message; the reply is printed")
    source.add_argument("--input", help="JSONL/JSON/CSV of prompts (messages, prompt, question or instruction rows)")
    generate.add_argument("--output", help="with --input: JSONL of {id, prompt, output, finished, num_tokens}")
    generate.add_argument("--system", help="system message")
    generate.add_argument("--max-new-tokens", type=int, default=256)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--batch-size", type=int, default=16, help="prompts generated together (with --input)")
    generate.add_argument("--device", default="auto")

    evaluate = commands.add_parser("eval", help="metrics on held-out rows, optionally beside a baseline; a report")
    evaluate.add_argument("model", help="run folder, model or adapter folder, .gguf file or named model")
    evaluate.add_argument(
        "--data", required=True, help="rows with references (any training format, or question/answer)"
    )
    evaluate.add_argument("--baseline", help="a second model scored on the same rows, e.g. the base model")
    evaluate.add_argument("--out", help="folder for results and report (default: RUN/eval for a run folder)")
    evaluate.add_argument("--config", help="YAML whose eval: section sets the metrics (default: the run's config)")
    evaluate.add_argument("--metrics", help="comma-separated: " + ", ".join(METRICS))
    evaluate.add_argument("--extractor", choices=EXTRACTORS, help="answer extractor for exact_match")
    evaluate.add_argument("--pattern", help="regex for --extractor regex (group 1 if it has one)")
    evaluate.add_argument("--max-new-tokens", type=int)
    evaluate.add_argument("--max-rows", type=int)
    evaluate.add_argument("overrides", nargs="*", help="dotted eval overrides, e.g. eval.temperature=0.7")

    chat = commands.add_parser("chat", help="talk to a model in the terminal, multi-turn, with its saved template")
    chat.add_argument("model", help="run folder, model or adapter folder, .gguf file or named model")
    chat.add_argument("--system", help="system message at the start of the conversation")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--device", default="auto")

    merge = commands.add_parser("merge", help="fold a LoRA/QLoRA adapter into its fp32 base: a plain HF folder")
    merge.add_argument("adapter", help="adapter folder (or a run folder whose model/ holds one)")
    merge.add_argument("--out", required=True, help="folder for the merged model")

    data = commands.add_parser("data", help="prove the data before training: check it, or inspect the loss mask")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    check = data_commands.add_parser("check", help="counts, lengths, mask checks, padding waste, memory estimate")
    check.add_argument("config", help="YAML config file (the one you would train with)")
    check.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.max_length=512")
    check.add_argument("--strict", action="store_true", help="exit 1 when any check fails")
    check.add_argument("--rejects", help="write every dropped row with its reason to this JSONL file")
    check.add_argument("--json", help="write the report as JSON to this file")
    inspect = data_commands.add_parser("inspect", help="print examples with the supervised tokens highlighted")
    inspect.add_argument("config", help="YAML config file (the one you would train with)")
    inspect.add_argument("overrides", nargs="*", help="dotted overrides, e.g. template.mask=last_assistant")
    inspect.add_argument("-n", type=int, default=3, help="how many examples to show (from the first row)")
    inspect.add_argument("--ids", action="store_true", help="show token ids")
    inspect.add_argument("--boundaries", action="store_true", help="mark where each token starts with |")
    inspect.add_argument("--html", help="also write the examples as a self-contained HTML page to this file")

    demo = commands.add_parser("demo", help="fine-tune the default model on the shipped task; before/after table")
    demo.add_argument("--out", default="runs/demo", help="run folder (replaced if it exists)")
    demo.add_argument("overrides", nargs="*", help="dotted overrides of the demo config")
    return parser


def describe_config() -> str:
    """Every config key with its one-line description: the schema is the CLI help."""
    from sftune.config import Config

    lines = []
    for section, field in Config.model_fields.items():
        annotation = field.annotation
        for key, sub in getattr(annotation, "model_fields", {}).items():
            lines.append(f"  {section}.{key}: {sub.description}")
    return "\n".join(lines)


def run_train(args: argparse.Namespace) -> None:
    from sftune.recipes.sft import train

    overrides = list(args.overrides) + (["output.overwrite=true"] if args.overwrite else [])
    result = train(load_config(args.config, overrides), resume=args.resume)
    print(f"done: {result.global_step} steps, final loss {result.final_loss}, model in {result.model_dir}")


def run_generate(args: argparse.Namespace) -> None:
    from sftune.infer.generate import generate_file, generate_replies, load_for_inference

    if args.input and not args.output:
        raise ConfigError("--input needs --output: the JSONL file to write the generations to")
    model, tokenizer = load_for_inference(args.model, args.device)
    if args.input:
        counts = generate_file(
            model, tokenizer, args.input, args.output, args.system, args.batch_size,
            args.max_new_tokens, args.temperature, args.top_p,
        )  # fmt: skip
        print(f"wrote {counts['written']} generations to {args.output} ({counts['rejected']} rows rejected)")
        return
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    print(generate_replies(model, tokenizer, [messages], args.max_new_tokens, args.temperature, args.top_p)[0].text)


def run_eval(args: argparse.Namespace) -> None:
    from sftune.recipes.evaluate import evaluate, resolve_eval_settings

    settings, out_dir, run_dir = resolve_eval_settings(args.model, args.config, eval_overrides(args), args.out)
    results = evaluate(args.model, args.data, settings, out_dir, args.baseline, run_dir)
    print_eval_table(results)
    print("report: " + ", ".join(results["report"]))


def eval_overrides(args: argparse.Namespace) -> list[str]:
    """The convenience flags are dotted overrides of the eval section, after those given as overrides."""
    flags = {
        "metrics": f"[{args.metrics}]" if args.metrics else None,
        "extractor": args.extractor,
        "answer_pattern": args.pattern,
        "max_new_tokens": args.max_new_tokens,
        "max_rows": args.max_rows,
    }
    return [*args.overrides, *(f"eval.{key}={value}" for key, value in flags.items() if value is not None)]


def print_eval_table(results: dict) -> None:  # type: ignore[type-arg]
    labels = list(results["models"])
    print(f"\n{results['rows']} rows of {results['data']}")
    print(f"{'metric':<14}" + "".join(f"{label:>12}" for label in labels))
    keys = [k for k, v in results["models"][labels[-1]].items() if k != "rows" and isinstance(v, float | int | None)]
    for key in keys:
        values = [results["models"][label].get(key) for label in labels]
        print(f"{key:<14}" + "".join(f"{v:>12.4f}" if isinstance(v, float | int) else f"{'n/a':>12}" for v in values))


def run_chat(args: argparse.Namespace) -> int:
    from sftune.infer.chat import ChatSettings, chat

    settings = ChatSettings(args.max_new_tokens, args.temperature, args.top_p)
    return chat(args.model, args.system, settings, args.device)


def run_merge(args: argparse.Namespace) -> None:
    from sftune.infer.generate import resolve_model_dir
    from sftune.model.lora import merge_adapter

    out = merge_adapter(resolve_model_dir(args.adapter), args.out)
    print(f"merged model in {out}")


def run_data(args: argparse.Namespace) -> int:
    from sftune.data.inspect import render_ansi, render_html, render_legend_ansi
    from sftune.recipes.data_check import first_examples, run_check

    config = load_config(args.config, list(args.overrides))
    if args.data_command == "check":
        report = run_check(config, args.rejects, args.json)
        print(report.to_text())
        return 1 if args.strict and report.failed_checks() else 0
    examples, tokenizer = first_examples(config, args.n)
    print(render_legend_ansi())
    for example in examples:
        print(render_ansi(example, tokenizer, args.ids, args.boundaries))
    if args.html:
        Path(args.html).write_text(render_html(examples, tokenizer, args.ids, args.boundaries))
        print(f"wrote {args.html}")
    return 0


def run_demo(args: argparse.Namespace) -> None:
    from sftune.recipes.demo import run_demo as demo

    demo(args.out, list(args.overrides))


def quiet_library_import_noise() -> None:
    """torchao (imported by transformers) warns about CUDA-only kernels it cannot load on CPU: noise for users."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    quiet_library_import_noise()
    args = build_parser().parse_args(argv)
    handlers = {
        "train": run_train,
        "generate": run_generate,
        "chat": run_chat,
        "eval": run_eval,
        "merge": run_merge,
        "demo": run_demo,
        "data": run_data,
    }
    try:
        code = handlers[args.command](args)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
