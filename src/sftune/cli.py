"""Command line: parses arguments and calls recipes; no logic of its own.

The flags of `generate`, `chat` and `eval` are the fields of their config sections (GenerateConfig, EvalConfig):
one schema for the command line, YAML and the Python API, with the same names, defaults and checks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, get_args, get_origin

from pydantic import BaseModel

from sftune import __version__
from sftune.config import (
    Config,
    ConfigError,
    EvalConfig,
    GenerateConfig,
    UserError,
    load_config,
    validate_section,
)
from sftune.host.allocator import restart_on_allocator
from sftune.host.launch import launch_processes
from sftune.infer.types import GENERATION_FIELDS

# Errors that are the user's to fix: printed as one clear message, never as a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (UserError, FileNotFoundError)

# Flags whose name is not the config field's.
FLAG_NAMES = {"system_prompt": "--system", "answer_pattern": "--pattern"}
FLAG_METAVARS = {"template": "NAME_OR_FILE"}
# Fields of the eval section that only matter during training (generations at each evaluation).
TRAINING_ONLY_EVAL_FIELDS = ("sample_prompts", "sample_max_new_tokens")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sftune", description="Supervised fine-tuning of causal language models.")
    parser.add_argument("--version", action="version", version=f"sftune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune a model from a YAML config")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.learning_rate=1e-4")
    train.add_argument("--resume", help="'auto' (newest checkpoint of the run) or a checkpoint folder")
    train.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    train.add_argument(
        "--resume-changed",
        action="store_true",
        help="resume even though the config differs from the checkpoint's in settings that break exactness",
    )
    add_nproc(train, "train")
    train.epilog = "config keys (section.key: description):\n" + describe_config()
    train.formatter_class = argparse.RawDescriptionHelpFormatter

    dpo = commands.add_parser("dpo", help="preference optimisation (DPO, IPO, SimPO) from a YAML config")
    dpo.add_argument("config", help="YAML config file (data.train: preference pairs; the dpo: section)")
    dpo.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dpo.beta=0.2")
    dpo.add_argument("--resume", help="'auto' (newest checkpoint of the run) or a checkpoint folder")
    dpo.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    dpo.add_argument("--resume-changed", action="store_true", help="resume even though the config changed")
    add_nproc(dpo, "dpo")

    generate = commands.add_parser(
        "generate", help="generate a reply with the template saved at training (or --template for a base model)"
    )
    generate.add_argument("model", help="run folder, model folder, .gguf file or named model")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one user message; the reply is printed")
    source.add_argument("--input", help="JSONL/JSON/CSV of prompts (messages, prompt, question or instruction rows)")
    generate.add_argument(
        "--output",
        help=f"with --input: JSONL, a line per row: {{{', '.join(GENERATION_FIELDS)}}} (prompt: the last user "
        "message; messages: the whole prompt; reference: where the row has one)",
    )
    add_section_flags(generate, GenerateConfig)

    evaluate = commands.add_parser("eval", help="metrics on held-out rows, optionally beside a baseline; a report")
    evaluate.add_argument("model", help="run folder, model or adapter folder, .gguf file or named model")
    evaluate.add_argument(
        "--data", required=True, help="rows with references (any training format, or question/answer)"
    )
    evaluate.add_argument("--baseline", help="a second model scored on the same rows, e.g. the base model")
    evaluate.add_argument("--out", help="folder for results and report (default: RUN/eval for a run folder)")
    evaluate.add_argument("--config", help="YAML whose eval: section sets the metrics (default: the run's config)")
    add_section_flags(evaluate, EvalConfig, exclude=TRAINING_ONLY_EVAL_FIELDS)
    evaluate.add_argument("overrides", nargs="*", help="dotted eval overrides, e.g. eval.temperature=0.7")

    chat = commands.add_parser("chat", help="talk to a model in the terminal, multi-turn, with its saved template")
    chat.add_argument("model", help="run folder, model or adapter folder, .gguf file or named model")
    add_section_flags(chat, GenerateConfig, exclude=("batch_size",))

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
    check.add_argument(
        "--world-size", type=int, default=None, help="estimate memory per process of a run on N processes (ddp/fsdp2)"
    )
    inspect = data_commands.add_parser("inspect", help="print examples with the supervised tokens highlighted")
    inspect.add_argument("config", help="YAML config file (the one you would train with)")
    inspect.add_argument("overrides", nargs="*", help="dotted overrides, e.g. template.mask=last_assistant")
    inspect.add_argument("-n", type=int, default=3, help="how many examples to show (from the first row)")
    inspect.add_argument("--ids", action="store_true", help="show token ids")
    inspect.add_argument("--boundaries", action="store_true", help="mark where each token starts with |")
    inspect.add_argument("--html", help="also write the examples as a self-contained HTML page to this file")
    inspect.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="colour the trained tokens: auto = on a terminal only, not with NO_COLOR set; without colour they are "
        "bracketed « »",
    )

    demo = commands.add_parser("demo", help="fine-tune the default model on the shipped task; before/after table")
    demo.add_argument("--out", default="runs/demo", help="run folder (replaced if it exists)")
    demo.add_argument("overrides", nargs="*", help="dotted overrides of the demo config")
    return parser


def add_section_flags(parser: argparse.ArgumentParser, section: type[BaseModel], exclude: Sequence[str] = ()) -> None:
    """One flag per field of a config section (--max-new-tokens for max_new_tokens), its description as help and
    its choices from the schema. Flags default to unset: the schema's default (or the config file's) applies."""
    for name, field in section.model_fields.items():
        if name in exclude:
            continue
        is_list = get_origin(field.annotation) is list
        shown = ",".join(field.default) if is_list else field.default
        help_text = f"{field.description}{' Comma-separated.' if is_list else ''} (default: {shown})"
        parser.add_argument(
            FLAG_NAMES.get(name, "--" + name.replace("_", "-")),
            dest=name,
            default=None,
            metavar=FLAG_METAVARS.get(name),
            choices=None if is_list else literal_choices(field.annotation),
            help=help_text.replace("%", "%%"),
        )


def literal_choices(annotation: Any) -> list[str] | None:
    """The allowed values of a Literal field, else None (the schema still checks every value)."""
    args = get_args(annotation)
    return [str(a) for a in args] if args and all(isinstance(a, str) for a in args) else None


def section_flags(args: argparse.Namespace, section: type[BaseModel]) -> dict[str, Any]:
    """The section's fields given as flags (comma lists split); the schema validates and converts them."""
    values = {}
    for name, field in section.model_fields.items():
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value.split(",") if get_origin(field.annotation) is list else value
    return values


def describe_config() -> str:
    """Every config key with its one-line description: the schema is the CLI help."""
    lines = []
    for section, field in Config.model_fields.items():
        annotation = field.annotation
        for key, sub in getattr(annotation, "model_fields", {}).items():
            lines.append(f"  {section}.{key}: {sub.description}")
    return "\n".join(lines)


def add_nproc(command: argparse.ArgumentParser, name: str) -> None:
    command.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="run on N processes of this machine (as torchrun --standalone would; train.strategy picks ddp or "
        f"fsdp2). Several machines: start `torchrun --nnodes ... --rdzv-endpoint ... -m sftune.cli {name} CONFIG` "
        "on each",
    )


def run_training(args: argparse.Namespace) -> int | None:
    """`sftune train` and `sftune dpo`: the config loaded once; on N local processes under torchrun, or in this
    process (started again on mimalloc first, where it can be)."""
    overrides = list(args.overrides) + (["output.overwrite=true"] if args.overwrite else [])
    config = load_config(args.config, overrides)  # a config error is reported once, before any launch
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch_processes(args.nproc, args.argv)
    restart_on_allocator(config.train, args.argv)  # the command itself only: never a caller's process
    if args.command == "train":
        from sftune.recipes.sft import train as recipe
    else:
        from sftune.recipes.dpo import train_dpo as recipe
    result = recipe(config, resume=args.resume, resume_changed=args.resume_changed)
    print(f"done: {result.global_step} steps, final loss {result.final_loss}, model in {result.model_dir}")
    return None


def run_generate(args: argparse.Namespace) -> None:
    from sftune.recipes.generate import generate, generate_to_file

    settings = validate_section(GenerateConfig, section_flags(args, GenerateConfig), "sftune generate")
    if args.input:
        if not args.output:
            raise ConfigError("--input needs --output: the JSONL file to write the generations to")
        counts = generate_to_file(args.model, args.input, args.output, settings)
        print(f"wrote {counts['written']} generations to {args.output} ({counts['rejected']} rows rejected)")
        return
    print(generate(args.model, settings, args.prompt))


def run_eval(args: argparse.Namespace) -> None:
    from sftune.recipes.evaluate import evaluate, resolve_eval_settings

    flags = section_flags(args, EvalConfig)
    settings, out_dir, run_dir = resolve_eval_settings(args.model, args.config, list(args.overrides), args.out, flags)
    results = evaluate(args.model, args.data, settings, out_dir, args.baseline, run_dir)
    print_eval_table(results)
    print("report: " + ", ".join(results["report"]))


def print_eval_table(results: dict) -> None:  # type: ignore[type-arg]
    labels = list(results["models"])
    print(f"\n{results['rows']} rows of {results['data']}")
    print(f"{'metric':<14}" + "".join(f"{label:>12}" for label in labels))
    keys = [k for k, v in results["models"][labels[-1]].items() if k != "rows" and isinstance(v, float | int | None)]
    for key in keys:
        values = [results["models"][label].get(key) for label in labels]
        print(f"{key:<14}" + "".join(f"{v:>12.4f}" if isinstance(v, float | int) else f"{'n/a':>12}" for v in values))


def run_chat(args: argparse.Namespace) -> int:
    from sftune.recipes.chat import chat

    return chat(args.model, validate_section(GenerateConfig, section_flags(args, GenerateConfig), "sftune chat"))


def run_merge(args: argparse.Namespace) -> None:
    from sftune.recipes.merge import merge

    print(f"merged model in {merge(args.adapter, args.out)}")


def run_data(args: argparse.Namespace) -> int:
    from sftune.recipes.data_check import inspect, run_check

    config = load_config(args.config, list(args.overrides))
    if args.data_command == "check":
        report = run_check(config, args.rejects, args.json, args.world_size)
        print(report.to_text())
        return 1 if args.strict and report.failed_checks() else 0
    inspect(config, args.n, args.ids, args.boundaries, args.html, args.color)
    return 0


def run_demo(args: argparse.Namespace) -> None:
    from sftune.recipes.demo import demo, demo_config

    restart_on_allocator(demo_config(list(args.overrides)).train, args.argv)  # as `sftune train` does
    demo(args.out, list(args.overrides))


def parse_arguments(parser: argparse.ArgumentParser, arguments: list[str]) -> argparse.Namespace:
    """The command's arguments, dotted overrides and flags in any order (`sftune train CFG --nproc 2 a.b=1`):
    argparse stops a positional list at the first flag, so what it leaves over that is an override joins them."""
    args, extra = parser.parse_known_args(arguments)
    if extra and hasattr(args, "overrides") and not any(token.startswith("-") for token in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def quiet_library_import_noise() -> None:
    """torchao (imported by transformers) warns about CUDA-only kernels it cannot load on CPU: noise for users."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def other_rank() -> bool:
    """A rank other than 0 of a distributed run: its messages would repeat rank 0's."""
    return os.environ.get("RANK", "0") not in ("", "0")


def main(argv: Sequence[str] | None = None) -> int:
    quiet_library_import_noise()
    for stream in (sys.stdout, sys.stderr):  # text from the data (a lone surrogate) must never stop a message
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parse_arguments(build_parser(), arguments)
    handlers = {
        "train": run_training,
        "dpo": run_training,
        "generate": run_generate,
        "chat": run_chat,
        "eval": run_eval,
        "merge": run_merge,
        "demo": run_demo,
        "data": run_data,
    }
    args.argv = arguments  # what a launch under torchrun or a restart on another malloc runs again
    try:
        code = handlers[args.command](args)
    except USER_ERRORS as exc:
        if not other_rank():  # under --nproc, rank 0 says it once; the others exit with the same code, quietly
            print(f"error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt as exc:  # a Ctrl-C outside training, or a second one inside (the first checkpoints)
        if not other_rank():
            how = (
                f"a second {exc}, mid-step: the newest checkpoint is where --resume auto goes on"
                if str(exc)
                else "Ctrl-C"
            )
            print(f"\nstopped by {how}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 130))
    except OSError as exc:  # I/O the user can fix: permissions, a full or read-only disk, a path that is a file
        if os.environ.get("SFTUNE_DEBUG"):
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(
            f"error: {exc.strerror or exc}{where}: check the path, its permissions and the free space", file=sys.stderr
        )
        return 2
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
