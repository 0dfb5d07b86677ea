"""Prove the data before training: counts, lengths, mask checks, batching waste and a memory estimate.

`check_data` reads the training rows exactly as training does; `build_report` builds every example and checks the
mask on each one. The report keeps the examples, so the sft recipe trains on the very examples it checked instead
of building them twice. The mask checks (`MASK_CHECKS`) work on any (input_ids, labels) pair, not only examples
built here, so a mask made by other code (e.g. a collator that masks by pad id) can be checked too. A template error on
one row (double BOS, a template that is not prefix-consistent) becomes a failed check with a count, not a crash.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from sftune.data.batching import epoch_order, micro_batch_indices
from sftune.data.formats import read_conversations
from sftune.data.masking import build_example, has_double_bos, special_token_ids, tokenize_rendered
from sftune.data.templates import ChatTemplate, TemplateError, render
from sftune.data.types import IGNORE_INDEX, Conversation, Example, Rejection

if TYPE_CHECKING:
    from sftune.config import Config

MASKING_METHOD = "incremental prefix rendering"
# Checks that prove the loss mask is right; training refuses to start when one fails.
MASK_CHECKS = ("end_token_supervised", "single_bos", "inference_parity")


@dataclass
class CheckResult:
    """One named pass/fail check: how many examples failed, and the first one to look at."""

    name: str
    passed: bool
    failures: int = 0
    checked: int = 0
    first_source: str = ""
    detail: str = ""


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
    rejections: list[Rejection] = field(default_factory=list, repr=False)
    examples: list[Example] = field(default_factory=list, repr=False)  # the rows_kept examples, as built

    @property
    def supervised_fraction(self) -> float:
        return self.supervised_tokens / self.tokens if self.tokens else 0.0

    def failed_checks(self, names: tuple[str, ...] | None = None) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed and (names is None or c.name in names)]

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


def check_data(config: Config, tokenizer: Any, template: ChatTemplate, model_config: Any | None = None) -> DataReport:
    """Read config.data.train as training would, build every example, and report on all of it."""
    conversations, rejections, formats = read_conversations(config.data.train, config.data)
    return build_report(conversations, rejections, formats, config, tokenizer, template, model_config)


def build_report(
    conversations: list[Conversation],
    rejections: list[Rejection],
    formats: dict[str, int],
    config: Config,
    tokenizer: Any,
    template: ChatTemplate,
    model_config: Any | None = None,
) -> DataReport:
    """Build and check every conversation exactly as training builds it, and report on them and on `rejections`
    (rows dropped on reading). The report keeps the built examples: training uses them as they are."""
    data_cfg = config.data
    rows_in = len(conversations) + len(rejections)
    examples, built_rejections, checks = check_conversations(
        conversations, tokenizer, template, config.template.mask, data_cfg.max_length, data_cfg.truncation
    )
    rejections = rejections + built_rejections
    zero = sum(r.reason == "no_supervised_tokens" for r in rejections)
    checks.append(
        _count_check("rows_have_supervised_tokens", zero, rows_in, _first(rejections, "no_supervised_tokens"))
    )
    lengths = length_percentiles(examples)
    train_cfg = config.train
    return DataReport(
        rows_in=rows_in,
        formats=formats,
        rows_kept=len(examples),
        rejected_by_reason=dict(Counter(r.reason for r in rejections)),
        tokens=sum(len(e.input_ids) for e in examples),
        supervised_tokens=sum(e.num_supervised for e in examples),
        lengths=lengths,
        rows_truncated=sum(e.truncated for e in examples),
        rows_zero_supervised=zero,
        checks=checks,
        template={
            "name": template.name,
            "mask": config.template.mask,
            "has_generation_markers": template.has_generation_markers,
            "masking": MASKING_METHOD,
        },
        batching=padding_waste(
            [len(e.input_ids) for e in examples],
            train_cfg.micro_batch_size,
            data_cfg.max_length,
            train_cfg.seed,
            data_cfg.shuffle,
        ),
        memory=estimate_memory(model_config, config, *_longest_micro_batch(examples, config)) if model_config else None,
        tokens_to_train=tokens_to_train(examples, config),
        rejections=rejections,
        examples=examples,
    )


def check_conversations(
    conversations: list[Conversation],
    tokenizer: Any,
    template: ChatTemplate,
    mask: str = "assistant",
    max_length: int | None = None,
    truncation: str = "drop",
) -> tuple[list[Example], list[Rejection], list[CheckResult]]:
    """Build each example and run every mask check; template errors count as failed checks and rejections."""
    examples: list[Example] = []
    rejections: list[Rejection] = []
    failures: dict[str, list[str]] = {name: [] for name in MASK_CHECKS}
    for conversation in conversations:
        try:
            result = build_example(tokenizer, template, conversation, mask, max_length, truncation)  # type: ignore[arg-type]
        except TemplateError as error:
            name, reason = (
                ("single_bos", "double_bos") if "two BOS" in str(error) else ("inference_parity", "template_error")
            )
            failures[name].append(conversation.source)
            rejections.append(Rejection(conversation.source, reason, str(error)))
            continue
        if isinstance(result, Rejection):
            rejections.append(result)
            continue
        examples.append(result)
        for name in failed_mask_checks(result, tokenizer):
            failures[name].append(result.source)
        if mask != "all" and not is_inference_consistent(result, conversation, tokenizer, template):
            failures["inference_parity"].append(result.source)
    checked = len(conversations)
    return examples, rejections, [_named_check(name, failures[name], checked) for name in MASK_CHECKS]


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
    """The inference prompt (messages before the last assistant turn, with the generation prompt) tokenizes to a
    prefix of the training ids that ends exactly where the last supervised span starts."""
    if conversation.text is not None:
        return True
    assistant = [i for i, m in enumerate(conversation.messages) if m.role == "assistant"]
    runs = supervised_runs(example.labels)
    if not assistant or not runs:
        return True
    messages = [m.as_dict() for m in conversation.messages[: assistant[-1]]]
    prompt = render(tokenizer, template, messages, add_generation_prompt=True, tools=conversation.tools)
    try:
        prompt_ids, _ = tokenize_rendered(tokenizer, prompt)
    except TemplateError:
        return False
    if example.truncated and len(prompt_ids) >= len(example.input_ids):
        return True  # the last turn was cut away: nothing of it is trained
    return example.input_ids[: len(prompt_ids)] == prompt_ids and runs[-1][0] == len(prompt_ids)


def _named_check(name: str, sources: list[str], checked: int) -> CheckResult:
    return _count_check(name, len(sources), checked, sources[0] if sources else "")


def _count_check(name: str, failures: int, checked: int, first_source: str) -> CheckResult:
    return CheckResult(name, failures == 0, failures, checked, first_source, CHECK_DESCRIPTIONS[name])


def _first(rejections: list[Rejection], reason: str) -> str:
    return next((r.source for r in rejections if r.reason == reason), "")


CHECK_DESCRIPTIONS = {
    "end_token_supervised": "every supervised turn ends with its end-of-turn / EOS special token, which is trained",
    "single_bos": "no example starts with two BOS tokens",
    "inference_parity": "the inference prompt tokenizes to a prefix of the training ids, "
    "ending where supervision starts",
    "rows_have_supervised_tokens": "no row is left with nothing to train (e.g. after truncation)",
}


# ------------------------------------------------------------------------------------ lengths, batching


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


def padding_waste(
    lengths: list[int], micro_batch_size: int, max_length: int, seed: int, shuffle: bool
) -> dict[str, Any]:
    """Padding share of the first epoch's micro-batches (the recipe's order), and with packing into max_length bins."""
    order = epoch_order(len(lengths), seed, 0, shuffle)
    batches = micro_batch_indices(order, micro_batch_size)
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    tokens = sum(lengths)
    bins = count_packed_bins([lengths[i] for i in order], max_length)
    packed_padded = -(-bins // micro_batch_size) * micro_batch_size * max_length if bins else 0
    return {
        "micro_batch_size": micro_batch_size,
        "micro_batches": len(batches),
        "padding_share": round(1 - tokens / padded, 4) if padded else 0.0,
        "packed_max_length": max_length,
        "packed_sequences": bins,
        "packed_padding_share": round(1 - tokens / packed_padded, 4) if packed_padded else 0.0,
    }


def count_packed_bins(lengths: list[int], max_length: int) -> int:
    """Sequences concatenated in order into bins of max_length tokens; a new bin when the next does not fit."""
    bins, used = 0, max_length
    for length in lengths:
        if used + length > max_length:
            bins, used = bins + 1, 0
        used += length
    return bins


def tokens_to_train(examples: list[Example], config: Config) -> dict[str, float]:
    train = config.train
    if train.max_steps:
        epochs = train.max_steps * train.micro_batch_size * train.gradient_accumulation_steps / max(1, len(examples))
    else:
        epochs = train.epochs
    supervised = sum(e.num_supervised for e in examples)
    total = sum(len(e.input_ids) for e in examples)
    return {
        "epochs": round(epochs, 4),
        "supervised_tokens": round(epochs * supervised),
        "tokens": round(epochs * total),
    }


def _longest_micro_batch(examples: list[Example], config: Config) -> tuple[int, int]:
    """Tokens (padded) in the largest micro-batch, micro_batch_size x the longest example; and that length."""
    longest = max((len(e.input_ids) for e in examples), default=0)
    return config.train.micro_batch_size * longest, longest


# -------------------------------------------------------------------------------------------- memory


def count_parameters(model_config: Any) -> dict[str, int]:
    """Parameters of a Llama/Qwen-style decoder from its config: embeddings, attention, gated MLP, norms."""
    hidden = model_config.hidden_size
    layers = model_config.num_hidden_layers
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    kv_dim = (getattr(model_config, "num_key_value_heads", None) or heads) * head_dim
    inter = model_config.intermediate_size
    vocab = model_config.vocab_size
    attention = hidden * heads * head_dim * 2 + hidden * kv_dim * 2  # q, o and k, v
    mlp = 3 * hidden * inter  # gate, up, down
    embeddings = vocab * hidden * (1 if getattr(model_config, "tie_word_embeddings", False) else 2)
    linear = layers * (attention + mlp)
    norms = layers * 2 * hidden + hidden
    return {"total": embeddings + linear + norms, "linear": linear, "embeddings": embeddings, "norms": norms}


def count_lora_parameters(model_config: Any, rank: int) -> int:
    """Adapter parameters for rank-r LoRA on every attention and MLP projection: r x (in + out) each."""
    hidden, inter = model_config.hidden_size, model_config.intermediate_size
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    kv_dim = (getattr(model_config, "num_key_value_heads", None) or heads) * head_dim
    per_layer = (hidden + heads * head_dim) * 2 + (hidden + kv_dim) * 2 + (hidden + inter) * 3
    return int(model_config.num_hidden_layers * rank * per_layer)


def estimate_activation_bytes(
    model_config: Any, tokens: int, gradient_checkpointing: bool, sequence_length: int
) -> int:
    """fp32 tensors kept for backward, per token: ~(10 hidden + 4 intermediate) per layer, the attention scores
    and probabilities (heads x sequence length, eager/math attention on CPU), plus logits and their gradient."""
    hidden, inter, layers = model_config.hidden_size, model_config.intermediate_size, model_config.num_hidden_layers
    per_layer = (10 * hidden + 4 * inter + 2 * model_config.num_attention_heads * sequence_length) * 4
    kept_layers = 1 if gradient_checkpointing else layers
    checkpoints = layers * hidden * 4 if gradient_checkpointing else 0
    logits = 2 * model_config.vocab_size * 4
    return int(tokens * (kept_layers * per_layer + checkpoints + logits))


def estimate_dropout_bytes(model_config: Any, tokens: int, config: Config) -> int:
    """LoRA dropout keeps its own copy of each adapted linear's input, and its mask: (6 hidden + intermediate)
    values per layer and token (q, k, v, o, gate, up, down), 4 bytes each plus a 1-byte mask."""
    if not config.lora.dropout:
        return 0
    layers = 1 if config.train.gradient_checkpointing else model_config.num_hidden_layers
    return int(tokens * layers * (6 * model_config.hidden_size + model_config.intermediate_size) * 5)


# Python + torch + transformers + peft after import, before any model (CPU, measured by bench/methods.py).
RUNTIME_BYTES = int(0.35 * 1024**3)


def estimate_memory(
    model_config: Any, config: Config, micro_batch_tokens: int, sequence_length: int | None = None
) -> dict[str, Any]:
    """Pre-flight peak memory (GiB) for full, LoRA and QLoRA fine-tuning, from the model config alone.

    Peak = runtime + the larger of loading (on CPU the checkpoint's mapped pages and the materialised weights
    are resident together) and training: weights, AdamW state, the larger of the activations of the longest
    micro-batch and the gradients (gradients are freed between steps and fill in as backward frees the
    activations), and for LoRA/QLoRA the dropout copies. QLoRA loads the base in full precision first.
    """
    length = sequence_length or micro_batch_tokens // config.train.micro_batch_size
    params = count_parameters(model_config)
    adapter = count_lora_parameters(model_config, config.lora.r)
    gc_on = config.train.gradient_checkpointing
    activations = estimate_activation_bytes(model_config, micro_batch_tokens, gc_on, length)
    adapter_activations = activations + estimate_dropout_bytes(model_config, micro_batch_tokens, config)
    base_bytes = 4 if config.model.dtype in ("fp32", "auto") else 2
    loading = params["total"] * (checkpoint_bytes_per_parameter(model_config) + base_bytes)
    adapter_state = adapter * 16  # fp32 weights + grads + 2 AdamW states
    nf4 = params["linear"] * (0.5 + 1 / 64 + 4 / (64 * 256))  # 4-bit + double-quantized blockwise scales
    training = {
        # fp32 weights + 2 AdamW states, then activations (forward) or gradients (end of backward), whichever is larger
        "full": params["total"] * 12 + max(activations, params["total"] * 4),
        "lora": params["total"] * base_bytes + adapter_state + adapter_activations,
        "qlora": nf4 + (params["embeddings"] + params["norms"]) * base_bytes + adapter_state + adapter_activations,
    }
    gib = 1024**3
    return {
        "parameters": params["total"],
        "lora_rank": config.lora.r,
        "lora_parameters": adapter,
        "micro_batch_tokens": micro_batch_tokens,
        "runtime_gib": round(RUNTIME_BYTES / gib, 3),
        "loading_gib": round(loading / gib, 3),
        "activations_gib": round(activations / gib, 3),
        **{f"{method}_gib": round((RUNTIME_BYTES + max(loading, t)) / gib, 3) for method, t in training.items()},
        "assumptions": "peak = runtime + max(loading, training); full: fp32 weights + 2 AdamW states + "
        "activations; LoRA: frozen base at model.dtype (auto=fp32) + adapter state + activations + dropout "
        "copies; QLoRA: NF4 block linears, other weights at model.dtype, loaded in full precision first",
    }


def checkpoint_bytes_per_parameter(model_config: Any) -> int:
    """Bytes per weight in the checkpoint file (its config's dtype; bf16 when it does not say)."""
    dtype = str(getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None) or "bfloat16")
    return 4 if "float32" in dtype else 2


def load_model_config(path: str) -> Any | None:
    """The model's config.json as a transformers config, or None where it cannot be read (e.g. a .gguf file)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None


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
        *(_check_line(c) for c in report.checks),
        f"batching: {report.batching['padding_share']:.1%} padding at micro_batch_size="
        f"{report.batching['micro_batch_size']}; packed into {report.batching['packed_max_length']}-token sequences: "
        f"{report.batching['packed_padding_share']:.1%}",
        f"to train: {report.tokens_to_train['epochs']} epochs = {report.tokens_to_train['supervised_tokens']} "
        f"supervised of {report.tokens_to_train['tokens']} tokens",
    ]
    if report.memory:
        m = report.memory
        lines.append(
            f"memory (estimate, {m['parameters'] / 1e6:.1f}M parameters, {m['micro_batch_tokens']} tokens per "
            f"micro-batch): full {m['full_gib']} GiB, LoRA r={m['lora_rank']} {m['lora_gib']} GiB, "
            f"QLoRA {m['qlora_gib']} GiB"
        )
    return "\n".join(lines)


def _check_line(check: CheckResult) -> str:
    status = "PASS" if check.passed else "FAIL"
    where = f" (first: {check.first_source})" if check.first_source else ""
    return f"  {status} {check.name}: {check.failures} of {check.checked} failed{where}; {check.detail}"
