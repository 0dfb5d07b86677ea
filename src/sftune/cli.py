"""Command line: parses arguments and calls recipes; no logic of its own."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from sftune.config import ConfigError, load_config

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, FileNotFoundError)


def _user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that are the user's to fix: printed as one clear message, never as a traceback."""
    from sftune.data.formats import DataError
    from sftune.data.templates import TemplateError
    from sftune.model.load import ModelLoadError
    from sftune.recipes.sft import RunError

    return (*USER_ERRORS, DataError, TemplateError, ModelLoadError, RunError)


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
    generate.add_argument("--prompt", required=True, help="user message")
    generate.add_argument("--system", help="system message")
    generate.add_argument("--max-new-tokens", type=int, default=256)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--device", default="auto")

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
    from sftune.infer.generate import generate_batch, load_for_inference

    model, tokenizer = load_for_inference(args.model, args.device)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    print(generate_batch(model, tokenizer, [messages], args.max_new_tokens, args.temperature, args.top_p)[0])


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
    handlers = {"train": run_train, "generate": run_generate, "demo": run_demo}
    try:
        handlers[args.command](args)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
