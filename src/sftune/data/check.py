"""Prove the data before training: counts, lengths, mask checks, batching waste (and the memory estimate that
the caller computes next to the model, model/memory.py).

The check builds nothing of its own: `build_report` reports on examples made by `data.dataset.build_examples`, the
same call that makes the examples training uses, and keeps them, so the sft recipe trains on the very examples it
checked. The mask checks (`MASK_CHECKS`) work on any (input_ids, labels) pair, not only examples built here, so a
mask made by other code (e.g. a collator that masks by pad id) can be checked too. A template error on one row
(double BOS, a template that is not prefix-consistent) is a rejection of that row and a failed check with a count,
not a crash.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from sftune.data.batching import padding_waste
from sftune.data.dataset import DOUBLE_BOS, TEMPLATE_ERROR, BuiltExamples, build_examples
from sftune.data.formats import read_conversations
from sftune.data.masking import HistoryRewrite, MaskMode, TruncationPolicy, has_double_bos, special_token_ids
from sftune.data.prompt import prompt_for, prompt_ids
from sftune.data.templates import ChatTemplate, TemplateError, render
from sftune.data.types import IGNORE_INDEX, Conversation, Example, Rejection

if TYPE_CHECKING:
    from sftune.config import Config

MASKING_METHOD = "incremental prefix rendering"
# Checks that prove the loss mask is right; training refuses to start when one fails.
MASK_CHECKS = ("end_token_supervised", "single_bos", "inference_parity")
# Checks that warn: what they find trains consistently, but a person should know it.
WARNING_CHECKS = ("role_header_not_supervised", "context_rendered")


@dataclass
class CheckResult:
    """One named pass/fail check: how many examples failed, and the first one to look at."""

    name: str
    passed: bool
    failures: int = 0
    checked: int = 0
    first_source: str = ""
    detail: str = ""
    warning: bool = False  # a failure is worth knowing, not a reason to stop


@dataclass
class DataReport:
    rows_in: int
    formats: dict[str, int]
    rows_kept: int
    rejected_by_reason: dict[str, int]
    tokens: int
    supervised_tokens: int
    lengths: dict[str, dict[str, int]]  # prompt / response / example -> p50, p90, p99, max
    rows_truncated: int
    rows_zero_supervised: int
    checks: list[CheckResult]
    template: dict[str, Any]
    batching: dict[str, Any]
    memory: dict[str, Any] | None
    tokens_to_train: dict[str, float]
    history_rewrite: dict[str, Any] = field(default_factory=dict)  # rows expanded per turn, their cost, causes
    validation: dict[str, Any] | None = None  # the validation rows: counts and failed checks, before training
    rejections: list[Rejection] = field(default_factory=list, repr=False)
    examples: list[Example] = field(default_factory=list, repr=False)  # the rows_kept examples, as built

    @property
    def supervised_fraction(self) -> float:
        return self.supervised_tokens / self.tokens if self.tokens else 0.0

    def failed_checks(self, names: tuple[str, ...] | None = None) -> list[CheckResult]:
        """Failed checks (of `names`, or all); warnings are not failures."""
        return [c for c in self.checks if not c.passed and not c.warning and (names is None or c.name in names)]

    def to_dict(self) -> dict[str, Any]:
        # Per-row detail stays out of the JSON (rejected.jsonl lists the rejections); emptied first, not deep-copied.
        result = asdict(replace(self, rejections=[], examples=[]))
        del result["rejections"], result["examples"]
        result["supervised_fraction"] = round(self.supervised_fraction, 4)
        return result

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        return render_report_text(self)


# ----------------------------------------------------------------------------------------- entry point


def check_data(config: Config, tokenizer: Any, template: ChatTemplate) -> DataReport:
    """Read config.data.train as training would, build every example with `build_examples`, report on all of it."""
    conversations, rejections, formats = read_conversations(config.data.train, config.data)
    built = build_configured(conversations, tokenizer, template, config)
    return build_report(built, rejections, formats, config, tokenizer, template)


def build_configured(
    conversations: list[Conversation], tokenizer: Any, template: ChatTemplate, config: Config, limit: int | None = None
) -> BuiltExamples:
    """`build_examples` with the config's mask, length and history settings (the first `limit` examples)."""
    data, mask = config.data, config.template
    return build_examples(
        conversations,
        tokenizer,
        template,
        mask.mask,
        data.max_length,
        data.truncation,
        limit=limit,
        history_rewrite=mask.history_rewrite,
    )


def summarize_validation(
    built: BuiltExamples, rejections: list[Rejection], checks: list[CheckResult]
) -> dict[str, Any]:
    """Counts and failed checks of the validation rows, for the report (they are checked before training too)."""
    rejected = rejections + built.rejections
    return {
        "rows_in": built.rows_kept + len(rejected),
        "rows_kept": built.rows_kept,
        "rows_rejected": len(rejected),
        "rejected_by_reason": dict(Counter(r.reason for r in rejected)),
        "failed_checks": [c.name for c in checks if not c.passed and not c.warning],
    }


def build_report(
    built: BuiltExamples,
    rejections: list[Rejection],
    formats: dict[str, int],
    config: Config,
    tokenizer: Any,
    template: ChatTemplate,
) -> DataReport:
    """Check and report on the examples `build_examples` made, and on `rejections` (rows dropped on reading).
    The report keeps the built examples: training uses them as they are."""
    data_cfg = config.data
    examples = built.examples
    rejections = rejections + built.rejections
    rows_in = built.rows_kept + len(rejections)
    checks = check_mask(built, tokenizer, template, config.template.mask)
    zero = sum(r.reason == "no_supervised_tokens" for r in rejections)
    checks.append(
        _count_check("rows_have_supervised_tokens", zero, rows_in, _first(rejections, "no_supervised_tokens"))
    )
    train_cfg = config.train
    return DataReport(
        rows_in=rows_in,
        formats=formats,
        rows_kept=built.rows_kept,
        rejected_by_reason=dict(Counter(r.reason for r in rejections)),
        tokens=sum(len(e.input_ids) for e in examples),
        supervised_tokens=sum(e.num_supervised for e in examples),
        lengths=length_percentiles(examples),
        rows_truncated=sum(e.truncated for e in examples),
        rows_zero_supervised=zero,
        checks=checks,
        template={
            "name": template.describe(),
            "mask": config.template.mask,
            "has_generation_markers": template.has_generation_markers,
            "masking": MASKING_METHOD,
        },
        history_rewrite={
            "policy": config.template.history_rewrite,
            "rows_expanded": built.expanded_rows,
            "examples_from_expanded_rows": sum(1 for e in examples if e.expanded_because),
            "extra_tokens": built.expansion_extra_tokens,
            "prefix_failures": built.prefix_failures,
        },
        batching=padding_waste(
            [len(e.input_ids) for e in examples],
            train_cfg.micro_batch_size,
            data_cfg.max_length,
            train_cfg.seed,
            data_cfg.shuffle,
        ),
        memory=None,  # the caller's to fill: model knowledge lives in model/memory.py
        tokens_to_train=tokens_to_train(examples, config),
        rejections=rejections,
        examples=examples,
    )


def check_conversations(
    conversations: list[Conversation],
    tokenizer: Any,
    template: ChatTemplate,
    mask: MaskMode = "assistant",
    max_length: int | None = None,
    truncation: TruncationPolicy = "drop",
    history_rewrite: HistoryRewrite = "expand",
) -> tuple[list[Example], list[Rejection], list[CheckResult]]:
    """Build the conversations with `build_examples` and run every mask check on them."""
    built = build_examples(
        conversations, tokenizer, template, mask, max_length, truncation, history_rewrite=history_rewrite
    )
    return built.examples, built.rejections, check_mask(built, tokenizer, template, mask)


def check_mask(built: BuiltExamples, tokenizer: Any, template: ChatTemplate, mask: str) -> list[CheckResult]:
    """Every mask check over built examples; rows the template could not render count as failures. Then the
    warnings (WARNING_CHECKS)."""
    failures: dict[str, list[str]] = {name: [] for name in (*MASK_CHECKS, *WARNING_CHECKS)}
    for rejection in built.rejections:
        if rejection.reason == DOUBLE_BOS:
            failures["single_bos"].append(rejection.source)
        elif rejection.reason == TEMPLATE_ERROR:
            failures["inference_parity"].append(rejection.source)
    for example, conversation in zip(built.examples, built.conversations, strict=True):
        for name in failed_mask_checks(example, tokenizer):
            failures[name].append(example.source)
        if mask != "all" and not is_inference_consistent(example, conversation, tokenizer, template):
            failures["inference_parity"].append(example.source)
        if example.header_supervised:
            failures["role_header_not_supervised"].append(example.source)
        dropped = dropped_context_turn(example, conversation, tokenizer, template)
        if dropped is not None:
            failures["context_rendered"].append(f"{example.source} ({dropped})")
    checked = len(built.examples) + len(built.rejections)
    return [_named_check(name, failures[name], checked) for name in (*MASK_CHECKS, *WARNING_CHECKS)]


def check_examples(examples: list[Example], tokenizer: Any) -> list[CheckResult]:
    """The end-token and BOS checks on given (input_ids, labels) examples, however their mask was made."""
    failures: dict[str, list[str]] = {name: [] for name in MASK_CHECKS[:2]}
    for example in examples:
        for name in failed_mask_checks(example, tokenizer):
            failures[name].append(example.source)
    return [_named_check(name, sources, len(examples)) for name, sources in failures.items()]


# ---------------------------------------------------------------------------------------- mask checks


def failed_mask_checks(example: Example, tokenizer: Any) -> list[str]:
    """Names of the checks this example fails: every supervised run must end on a special (end) token."""
    failed = []
    specials = special_token_ids(tokenizer)
    runs = supervised_runs(example.labels)
    ends_ok = all(example.input_ids[end - 1] in specials for _, end in runs)
    # A run cut by truncation legitimately loses its end token.
    if example.truncated and runs and runs[-1][1] == len(example.labels):
        ends_ok = all(example.input_ids[end - 1] in specials for _, end in runs[:-1])
    if not ends_ok or example.turns_without_end_token:
        failed.append("end_token_supervised")
    if has_double_bos(example.input_ids, tokenizer):
        failed.append("single_bos")
    return failed


def supervised_runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of supervised positions."""
    runs, start = [], None
    for index, label in enumerate(labels):
        if label != IGNORE_INDEX and start is None:
            start = index
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, index))
            start = None
    if start is not None:
        runs.append((start, len(labels)))
    return runs


def is_inference_consistent(
    example: Example, conversation: Conversation, tokenizer: Any, template: ChatTemplate
) -> bool:
    """The prompt that generation sends for this example's turn (built by the one prompt builder, as `sftune
    generate`, `eval` and `chat` build it) tokenizes to a prefix of the training ids that ends exactly where the
    turn's supervision starts."""
    runs = supervised_runs(example.labels)
    if conversation.text is not None or example.turn is None or not runs:
        return True
    try:
        ids = prompt_ids(tokenizer, template, prompt_for(conversation, example.turn))
    except TemplateError:
        return False
    if example.truncated and len(ids) >= len(example.input_ids):
        return True  # the last turn was cut away: nothing of it is trained
    return example.input_ids[: len(ids)] == ids and runs[-1][0] == len(ids)


def dropped_context_turn(
    example: Example, conversation: Conversation, tokenizer: Any, template: ChatTemplate
) -> str | None:
    """The first turn before the example's last supervised turn whose content (or tool call) the rendered prompt
    does not show, as 'message 2, tool': the template dropped it from the context (None where every turn shows)."""
    if conversation.text is not None or example.turn is None:
        return None
    prompt = prompt_for(conversation, example.turn)
    try:
        text = render(tokenizer, template, prompt.messages, add_generation_prompt=True, tools=prompt.tools)
    except TemplateError:
        return None  # inference_parity reports a prompt that cannot be rendered
    for index, message in enumerate(prompt.messages):
        if not all(is_shown(piece, text) for piece in shown_pieces(message)):
            return f"message {index}, {message['role']}"
    return None


def shown_pieces(message: dict[str, Any]) -> list[str]:
    """What of a message the rendered text must show: its content (of a reasoning reply, the answer after
    '</think>': templates drop earlier turns' thinking on purpose) and the name of each tool it calls."""
    content = message.get("content")
    pieces = [content.rsplit("</think>", 1)[-1].strip()] if isinstance(content, str) else []
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        pieces.append(name if isinstance(name, str) else "")
    return [piece for piece in pieces if piece]


def is_shown(piece: str, text: str) -> bool:
    """Is `piece` in the rendered text: as written, JSON-escaped (templates that `tojson` a tool result), or line by
    line (a template that lays a row's fields out in sections, e.g. Alpaca's instruction and input)."""
    escaped = (json.dumps(piece)[1:-1], json.dumps(piece, ensure_ascii=False)[1:-1])
    if piece in text or any(form in text for form in escaped):
        return True
    return all(line.strip() in text for line in piece.splitlines() if line.strip())


def _named_check(name: str, sources: list[str], checked: int) -> CheckResult:
    return _count_check(name, len(sources), checked, sources[0] if sources else "")


def _count_check(name: str, failures: int, checked: int, first_source: str) -> CheckResult:
    warning = name in WARNING_CHECKS
    return CheckResult(name, failures == 0, failures, checked, first_source, CHECK_DESCRIPTIONS[name], warning)


def _first(rejections: list[Rejection], reason: str) -> str:
    return next((r.source for r in rejections if r.reason == reason), "")


CHECK_DESCRIPTIONS = {
    "end_token_supervised": "every supervised turn ends with its end-of-turn / EOS special token, which is trained",
    "single_bos": "no example starts with two BOS tokens",
    "inference_parity": "the prompt generate/eval/chat send (same messages, system prompt, tools) tokenizes to a "
    "prefix of the training ids, ending where supervision starts",
    "role_header_not_supervised": "the template has a generation prompt, so the assistant role header is prompt, not "
    "trained (where it has none, the model learns to write the header itself, as it must at inference)",
    "rows_have_supervised_tokens": "no row is left with nothing to train (e.g. after truncation)",
    "context_rendered": "every earlier turn's content and tool call shows in the rendered prompt (a turn the template "
    "does not render is missing from the context the model trains on, and from the prompt at inference alike)",
}


# ------------------------------------------------------------------------------------------ lengths


def length_percentiles(examples: list[Example]) -> dict[str, dict[str, int]]:
    prompt = [len(e.input_ids) - e.num_supervised for e in examples]
    response = [e.num_supervised for e in examples]
    whole = [len(e.input_ids) for e in examples]
    return {"prompt": percentiles(prompt), "response": percentiles(response), "example": percentiles(whole)}


def percentiles(values: list[int]) -> dict[str, int]:
    """Nearest-rank p50/p90/p99 and max (all 0 for no values)."""
    ordered = sorted(values)
    if not ordered:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}

    def rank(p: int) -> int:
        return ordered[min(len(ordered) - 1, max(0, -(-len(ordered) * p // 100) - 1))]

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": ordered[-1]}


def tokens_to_train(examples: list[Example], config: Config, world_size: int = 1) -> dict[str, float]:
    """Epochs and tokens the run will train (a step of a distributed run holds micro-batch x world size examples)."""
    train = config.train
    if train.max_steps:
        per_step = train.micro_batch_size * train.gradient_accumulation_steps * world_size
        epochs = train.max_steps * per_step / max(1, len(examples))
    else:
        epochs = train.epochs
    supervised = sum(e.num_supervised for e in examples)
    total = sum(len(e.input_ids) for e in examples)
    return {
        "epochs": round(epochs, 4),
        "supervised_tokens": round(epochs * supervised),
        "tokens": round(epochs * total),
    }


# ------------------------------------------------------------------------------------------ rendering


def render_report_text(report: DataReport) -> str:
    rejected = ", ".join(f"{k}: {v}" for k, v in report.rejected_by_reason.items()) or "none"
    formats = ", ".join(f"{k}: {v}" for k, v in report.formats.items())
    held_out = sum(report.formats.values()) - report.rows_in  # formats count the whole file; training held some out
    if held_out > 0:
        formats += f"; {held_out} of them held out for validation"
    markers = "yes" if report.template["has_generation_markers"] else "no"
    lines = [
        f"rows: {report.rows_in} in ({formats}) = {report.rows_kept} kept + "
        f"{sum(report.rejected_by_reason.values())} rejected ({rejected})",
        f"tokens: {report.tokens} total, {report.supervised_tokens} supervised ({report.supervised_fraction:.1%}); "
        f"{report.rows_truncated} rows truncated, {report.rows_zero_supervised} rows with nothing supervised",
        "lengths (p50 / p90 / p99 / max):",
        *(f"  {name:<9}{' / '.join(str(v) for v in p.values())}" for name, p in report.lengths.items()),
        f"template: {report.template['name']} (mask {report.template['mask']}; masking by "
        f"{report.template['masking']}; generation markers: {markers})",
        "checks:",
        *(render_check_line(c) for c in report.checks),
        f"batching: {report.batching['padding_share']:.1%} padding at micro_batch_size="
        f"{report.batching['micro_batch_size']}; packed into {report.batching['packed_max_length']}-token sequences: "
        f"{report.batching['packed_padding_share']:.1%}",
        f"to train: {report.tokens_to_train['epochs']} epochs = {report.tokens_to_train['supervised_tokens']} "
        f"supervised of {report.tokens_to_train['tokens']} tokens",
    ]
    rewrite = report.history_rewrite
    if rewrite.get("rows_expanded") or rewrite.get("prefix_failures"):
        causes = ", ".join(f"{cause}: {n}" for cause, n in rewrite["prefix_failures"].items())
        lines.append(
            f"history rewritten by the template ({causes}): {rewrite['rows_expanded']} rows expanded into "
            f"{rewrite['examples_from_expanded_rows']} per-turn examples (+{rewrite['extra_tokens']} tokens; "
            f"template.history_rewrite={rewrite['policy']})"
        )
    if report.validation:
        v = report.validation
        failed = ", ".join(v["failed_checks"]) or "none"
        lines.append(
            f"validation: {v['rows_in']} rows = {v['rows_kept']} kept + {v['rows_rejected']} rejected "
            f"({', '.join(f'{k}: {n}' for k, n in v['rejected_by_reason'].items()) or 'none'}); failed checks: {failed}"
        )
    if report.memory:
        m = report.memory
        lines.append(
            f"memory (estimate, {m['parameters'] / 1e6:.1f}M parameters, {m['micro_batch_tokens']} tokens per "
            f"micro-batch): full {m['full_gib']} GiB, LoRA r={m['lora_rank']} {m['lora_gib']} GiB, "
            f"QLoRA {m['qlora_gib']} GiB"
            + (f" per process ({m['strategy']} on {m['world_size']})" if m.get("world_size", 1) > 1 else "")
            + (
                f"; with checkpointing and the optimizer's moments offloaded: full {m['with_offload_gib']['full']} GiB"
                if "with_offload_gib" in m
                else ""
            )
        )
    return "\n".join(lines)


def render_check_line(check: CheckResult) -> str:
    status = "PASS" if check.passed else "WARN" if check.warning else "FAIL"
    where = f" (first: {check.first_source})" if check.first_source else ""
    return f"  {status} {check.name}: {check.failures} of {check.checked} failed{where}; {check.detail}"
