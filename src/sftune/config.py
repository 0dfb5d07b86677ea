"""One typed config schema for YAML files, dotted command-line overrides and the Python API.

Every field's description doubles as its command-line help (`sftune train --help` lists them all).
Unknown keys and wrong types are errors that name the key and suggest the closest valid one.
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class UserError(Exception):
    """Base of every error the user can fix (config, data, template, model, run set-up): the command line prints
    its message, which says what happened and how to fix it, instead of a traceback."""


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used; the message says which key and how to fix it."""


# The one list of names for each choice: the schema validates them, the CLI offers them, eval/metrics runs them.
MetricName = Literal["exact_match", "json_valid", "json_fields", "rouge_l", "stop_rate", "mean_length"]
ExtractorName = Literal["full", "last_line", "after_hashes", "regex", "json"]
METRIC_NAMES: tuple[str, ...] = get_args(MetricName)
EXTRACTOR_NAMES: tuple[str, ...] = get_args(ExtractorName)


# No setting needs a number beyond a 64-bit integer: a bigger one is a typo, and would overflow later (epochs x rows).
LARGEST_NUMBER = 2**63 - 1
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")  # what data.train reads as a file


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="after")
    @classmethod
    def _numbers_in_range(cls, value: Any) -> Any:
        """Every number of every section is finite and fits 64 bits (.inf, .nan, a 400-digit integer are refused)."""
        problem = _number_problem(value)
        if problem:
            raise ValueError(problem)
        return value


def _number_problem(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} is not a finite number: give a plain number"
    if isinstance(value, int) and abs(value) > LARGEST_NUMBER:
        return f"a {len(str(abs(value)))}-digit integer is out of range (at most {LARGEST_NUMBER:,})"
    if isinstance(value, (list, tuple, set)):
        return next((p for p in map(_number_problem, value) if p), None)
    if isinstance(value, dict):
        return next((p for p in map(_number_problem, value.values()) if p), None)
    return None


SectionT = TypeVar("SectionT", bound=_Section)


class ModelConfig(_Section):
    name_or_path: str = Field(
        "smollm2-135m-instruct",
        description="Local HF folder, hub id, .gguf file, or the named default 'smollm2-135m-instruct'.",
    )
    dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="Dtype the trained model is saved in (the default of output.save_dtype); auto = bf16 where the "
        "CPU/GPU supports it. Training loads the weights in fp32 (bf16 under bf16-true): see train.precision.",
    )
    trust_remote_code: bool = Field(False, description="Run model code shipped with a hub repo (off by default).")
    allow_pickle: bool = Field(
        False,
        description="Load weights from pickle files (pytorch_model.bin), which can run code; off: safetensors only.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")


class DataConfig(_Section):
    train: str = Field(..., description="Training data: a .json/.jsonl/.csv/.parquet file or a datasets name.")
    validation: str | None = Field(None, description="Separate validation file or datasets name.")
    validation_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Fraction of train rows held out for validation (if no validation file)."
    )
    split: str = Field("train", description="Split to read when `train` is a datasets name.")
    format: Literal["auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text"] = Field(
        "auto", description="Row format; auto detects it from the columns of the first row."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map canonical field -> column in your data, e.g. {instruction: question, output: answer}.",
    )
    system_prompt: str | None = Field(None, description="System message added to rows that have none.")
    max_length: int = Field(1024, gt=8, description="Longest tokenized example, in tokens.")
    truncation: Literal["drop", "truncate"] = Field(
        "drop",
        description="Over-length rows: drop them (counted) or cut them at max_length (dropped if nothing "
        "supervised is left).",
    )
    shuffle: bool = Field(True, description="Shuffle training rows each epoch (seeded by train.seed).")
    max_rows: int | None = Field(None, gt=0, description="Read only the first N rows of each data file.")
    proceed_on_failed_checks: bool = Field(
        False,
        description="Train even when a loss-mask check fails (end token not supervised, double BOS, "
        "training/inference parity); see data_report.txt.",
    )


class TemplateConfig(_Section):
    name: str = Field(
        "auto",
        description="Chat template: auto (the tokenizer's own, else chatml), tokenizer, alpaca, chatml, "
        "llama3, mistral, or a path to a .jinja file.",
    )
    mask: Literal["assistant", "last_assistant", "all"] = Field(
        "assistant",
        description="Supervised tokens: every assistant turn + its end token, only the last one, or all tokens.",
    )
    history_rewrite: Literal["expand", "last_assistant", "reject"] = Field(
        "expand",
        description="Rows whose template rewrites earlier turns (e.g. drops <think> blocks): one example per "
        "assistant turn rendered as inference renders it (expand), only the last turn, or reject the row.",
    )


class LoraConfig(_Section):
    r: int = Field(16, gt=0, description="LoRA rank: inner dimension of the low-rank update B @ A.")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on the input of the LoRA branch (0, as PEFT and TRL: no input copy)."
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Linear layers that get adapters: all-linear (every linear of the transformer blocks, "
        "not the output layer) or a list of module names, e.g. [q_proj, v_proj].",
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r.")
    use_dora: bool = Field(False, description="DoRA: learn a magnitude vector on top of the LoRA direction.")
    fuse_shared_inputs: bool = Field(
        False,
        description="Deprecated and ignored (PEFT's own LoRA layers are used; what the fused adapter products "
        "bought: bench/results/lora_fusion.md). Kept so that older configs load; removed in 0.3.",
    )
    base_dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="Dtype of the frozen base linears under lora (not qlora): bf16 halves their memory and, where "
        "bf16 is native, speeds their products; adapters, norms, embeddings and the loss keep the training "
        "precision. auto = bf16 where the CPU/GPU computes bf16 natively (detected) and the run is not FSDP2-sharded.",
    )


class TrainConfig(_Section):
    method: Literal["full", "lora", "qlora"] = Field(
        "full",
        description="full: train every weight; lora: train adapters on a frozen base; qlora: lora on a 4-bit NF4 base.",
    )
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to norms and biases).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warmup: cosine, linear (to zero) or constant."
    )
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warmup (overrides warmup_ratio).")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Warmup as a fraction of all steps.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored if max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    micro_batch_size: int = Field(4, gt=0, description="Examples per forward/backward pass.")
    padding_free: bool = Field(
        True,
        description="Put a micro-batch's examples back to back in one row: no padding, no attention across "
        "examples (false: pad each example to the longest).",
    )
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this (null: off).")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="A step whose loss or gradient norm is NaN/inf, or whose gradients are all zero under a non-zero "
        "loss (a collapsed model): stop the run (keeping the checkpoints), or skip that step's update and count it.",
    )
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16-true"] = Field(
        "auto",
        description="fp32; bf16-mixed (fp32 weights, bf16 autocast); bf16-true (bf16 weights); "
        "auto = bf16-mixed where supported.",
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Recompute activations in backward to save memory. auto: on a CPU, on for full fine-tuning "
        "and for lora on a bf16 frozen base (lora.base_dtype), where the recompute costs little, and wherever the "
        "memory estimate is above train.memory_budget_gib; off otherwise.",
    )
    lean_activations: bool = Field(
        True,
        description="Selective activation checkpointing of each decoder block: keep only its matrix products' and "
        "attention's outputs for backward and recompute the element-wise work between them there (norms, "
        "activations, LoRA dropout; same gradients bit for bit): less activation memory for a little compute "
        "(measured: bench/results/lean_activations.md). Not used with gradient checkpointing or train.compile.",
    )
    memory_budget_gib: float | None = Field(
        None,
        gt=0,
        description="Peak memory to stay under: where the data check's estimate for this run is above it, activation "
        "checkpointing is switched on (and the run log says so). Null: no budget.",
    )
    offload_optimizer_state: bool | Literal["auto"] = Field(
        "auto",
        description="Keep AdamW's two moments in a file in the run folder, in memory only while a slice of them is "
        "updated: 8 bytes less per trainable weight at the peak, the same updates bit for bit, for reading and "
        "writing that file once per step (measured: bench/results/compare-full-offload.md, "
        "bench/results/memory_limit.md). auto: on for full fine-tuning on "
        "a CPU where the memory estimate (x1.25) is above train.memory_budget_gib or the memory available to the run "
        "(cgroup limits included), with the run folder not on tmpfs; true: CPU parameters only.",
    )
    seed: int = Field(42, ge=0, description="Seed for data order, initialisation and dropout.")
    eval_every: int | None = Field(None, gt=0, description="Validation loss every N steps (null: at the end).")
    log_every: int = Field(1, gt=0, description="Write a metrics line every N steps.")
    checkpoint_every: int | None = Field(None, gt=0, description="Save a resumable checkpoint every N steps.")
    keep_checkpoints: int = Field(2, gt=0, description="How many recent checkpoints to keep.")
    num_threads: int | None = Field(None, gt=0, description="torch CPU threads (null: torch's default).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train; auto = cuda if present.")
    progress: bool = Field(True, description="Show a progress bar.")
    release_freed_memory: bool = Field(
        False,
        description="Deprecated: ignored, mimalloc (train.host_allocator) returns freed memory. Kept so that older "
        "configs load (what it did: bench/results/compare-release-freed-memory.md).",
    )
    host_allocator: Literal["auto", "mimalloc", "system"] = Field(
        "auto",
        description="malloc of the training process: mimalloc (package cmeel-mimalloc, Linux) keeps peak memory "
        "near the live tensors and runs CPU training faster than glibc's (measured: "
        "bench/results/memory_profile.md); `sftune train` starts itself on it. auto = mimalloc where installed; "
        "system = the OS's malloc.",
    )
    compile: bool = Field(
        False,
        description="Compile each decoder block with torch.compile (one compiled block shared by all, shapes "
        "dynamic): fuses the element-wise work around the matrix products. Costs start-up time (the first "
        "micro-batches compile; measured: bench/results/compare-compile.md) and needs a C++ compiler on a CPU; off "
        "by default.",
    )
    strategy: Literal["auto", "ddp", "fsdp2"] = Field(
        "auto",
        description="Under torchrun / srun with several processes: ddp (every rank holds the whole model, gradients "
        "all-reduced) or fsdp2 (weights, gradients and optimizer state sharded across ranks, "
        "torch.distributed.fsdp.fully_shard); auto = ddp. One process: ignored.",
    )

    @model_validator(mode="after")
    def _check_betas(self) -> TrainConfig:
        if not all(0.0 <= beta < 1.0 for beta in self.adam_betas):
            raise ValueError(
                f"train.adam_betas must both be in [0, 1), got {list(self.adam_betas)} (e.g. [0.9, 0.999])"
            )
        return self


class OutputConfig(_Section):
    dir: str = Field("runs/sft", description="Run folder: model, checkpoints, metrics, manifest.")
    overwrite: bool = Field(False, description="Allow writing into an existing, non-empty run folder.")
    save_dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="Dtype of the saved weights; auto = model.dtype."
    )


class SamplingConfig(_Section):
    """How replies are generated: shared by `sftune generate`, `sftune chat` and `sftune eval`."""

    max_new_tokens: int = Field(256, gt=0, description="Longest generated reply, in tokens.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (with temperature > 0).")
    batch_size: int = Field(16, gt=0, description="Prompts generated together.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to run; auto = cuda if present.")
    dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="Weights dtype for generation; auto = bf16 where the CPU/GPU supports it."
    )


# What --template means for every inference command: the names template.name takes in training.
INFERENCE_TEMPLATE_HELP = (
    "Chat template to prompt with instead of the one saved with the model, rendered as training with "
    "template.name=NAME renders it: alpaca, chatml, llama3, mistral, auto, tokenizer, or a .jinja file."
)


class GenerateConfig(SamplingConfig):
    """`sftune generate` and `sftune chat`: their flags are these fields (--max-new-tokens, --system, ...)."""

    system_prompt: str | None = Field(None, description="System message for prompts that have none.")
    template: str | None = Field(None, description=INFERENCE_TEMPLATE_HELP)


class EvalConfig(SamplingConfig):
    metrics: list[MetricName] = Field(
        list(get_args(MetricName)),
        description="Generation metrics of `sftune eval` (json_fields only scores rows whose reference is a JSON "
        "object).",
    )
    extractor: ExtractorName = Field(
        "full",
        description="Answer for exact_match: full text, last line, the text after '####', a regex, or parsed JSON.",
    )
    answer_pattern: str | None = Field(None, description="Regex for extractor=regex (group 1 if it has one).")
    max_rows: int | None = Field(None, gt=0, description="Evaluate only the first N rows.")
    report_samples: int = Field(8, ge=0, description="Prompts shown with both models' outputs in the report.")
    template: str | None = Field(
        None, description=f"{INFERENCE_TEMPLATE_HELP} For both models (sftune eval only; training uses template.name)."
    )
    sample_prompts: int = Field(
        0, ge=0, description="During training: generate for the first N validation prompts at each evaluation."
    )
    sample_max_new_tokens: int = Field(64, gt=0, description="Longest reply of those training-time samples.")

    @model_validator(mode="after")
    def _check_pattern(self) -> EvalConfig:
        if self.extractor == "regex" and not self.answer_pattern:
            raise ValueError("eval.extractor=regex needs eval.answer_pattern (e.g. 'answer is (\\d+)')")
        return self


class DPOConfig(_Section):
    """`sftune dpo`: preference optimisation after SFT."""

    loss: Literal["sigmoid", "ipo", "simpo", "orpo"] = Field(
        "sigmoid",
        description="sigmoid (DPO), ipo, simpo (reference-free, length-normalised), or orpo (reference-free: "
        "odds-ratio loss plus the chosen answer's NLL).",
    )
    beta: float = Field(
        0.1, gt=0, description="Strength of the preference (DPO/IPO temperature; SimPO scale; ORPO's lambda)."
    )
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Conservative DPO: assumed share of flipped labels.")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target reward margin.")
    orpo_nll: Literal["response", "full_sequence"] = Field(
        "response",
        description="ORPO's NLL on the chosen answers: over their response tokens (as the ORPO paper and SFT), or "
        "full_sequence, prompt included, as TRL's ORPOTrainer computes it (for parity with TRL).",
    )
    reference: Literal["auto", "adapter_off", "precomputed", "copy"] = Field(
        "auto",
        description="Reference log-probs: auto = the same model with the adapter off (LoRA/QLoRA) or precomputed once "
        "and cached (full, or continuing an SFT adapter); precomputed works for both; copy = a frozen copy of the "
        "starting model (twice the weights in memory).",
    )
    adapter: Literal["merge", "continue"] = Field(
        "merge",
        description="When model.name_or_path is an SFT adapter (or a run folder holding one): merge it into its base "
        "and train on the merged model (a new adapter with lora/qlora), or continue training the same adapter.",
    )

    @property
    def is_reference_free(self) -> bool:
        """SimPO and ORPO compare the policy's own log-probs: no reference is computed, cached or held."""
        return self.loss in ("simpo", "orpo")


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="Which model to fine-tune.")
    data: DataConfig = Field(..., description="Where the data is and how to read it.")
    template: TemplateConfig = Field(default_factory=TemplateConfig, description="Chat template and mask.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Adapters (used when train.method is lora/qlora).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where results go.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation and sample generations.")
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="`sftune generate` and `chat`.")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="Preference optimisation (`sftune dpo`).")

    @model_validator(mode="after")
    def _check_consistency(self) -> Config:
        if self.data.validation and self.data.validation_fraction:
            raise ValueError("set data.validation or data.validation_fraction, not both")
        if self.train.method == "qlora" and self.lora.use_dora:
            raise ValueError(
                "lora.use_dora=true does not work with train.method=qlora (PEFT's DoRA cannot read the NF4 base "
                "weights): set lora.use_dora=false or use train.method=lora"
            )
        return self


def _field_names(model_cls: type[BaseModel]) -> list[str]:
    return list(model_cls.model_fields)


def _section_class(path: tuple[str | int, ...]) -> type[BaseModel] | None:
    cls: type[BaseModel] = Config
    for part in path:
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            cls = annotation
        else:
            return None
    return cls


def _describe_error(error: Any) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden":
        parent = _section_class(loc[:-1])
        valid = _field_names(parent) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean '{'.'.join(str(p) for p in loc[:-1] + (close[0],))}'?" if close else ""
        return f"unknown key '{key}' {hint} (valid keys here: {', '.join(valid)})".replace("  ", " ")
    if error["type"] == "missing":
        return f"missing required key '{key}'"
    if error["type"] == "value_error":  # a rule across several keys of a section: its message says it all
        message = str(error["msg"]).removeprefix("Value error, ")
        return f"'{key}': {message}" if key else message
    return f"'{key}': {error['msg']} (got {_short_repr(error.get('input'))})"


def _short_repr(value: Any, limit: int = 80) -> str:
    """The offending value as typed, cut short: a 4,300-digit number must not fill the screen."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for str()
        return "a number too long to print"
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text):,} characters)"


def validate_config(raw: dict[str, Any], source: str = "config", overrides: list[str] | None = None) -> Config:
    """Build a Config from a nested dict, turning pydantic errors into one readable ConfigError. An error at a key
    that a command-line override set names that override, not the file (the file is not where the typo is)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (model, data, ...), got {type(raw).__name__}")
    unknown = [k for k in raw if k not in Config.model_fields]
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        errors = [(tuple(e["loc"]), _describe_error(e)) for e in exc.errors()]
        if unknown:
            errors = [(loc, line) for loc, line in errors if not line.startswith("unknown key")] + [
                ((k,), _describe_error({"loc": (k,), "type": "extra_forbidden"})) for k in unknown
            ]
        typed = {tuple(parse_override(text)[0]): text for text in overrides or []}
        lines = [_blame(loc, line, typed) for loc, line in errors]
        from_overrides = all(line.startswith("override '") for line in lines)
        heading = "the command line" if from_overrides and typed else source
        raise ConfigError(f"{heading}: invalid config:\n  " + "\n  ".join(dict.fromkeys(lines))) from None


def _blame(loc: tuple[Any, ...], line: str, overrides: dict[tuple[Any, ...], str]) -> str:
    """`line`, prefixed with the override that set the key at `loc` (or a section above it), if one did."""
    for depth in range(len(loc), 0, -1):
        text = overrides.get(tuple(str(p) for p in loc[:depth]))
        if text is not None:
            shown = text if len(text) <= 80 else f"{text[:60]}..."
            return f"override '{shown}': {line}"
    return line


def validate_section(section: type[SectionT], values: dict[str, Any], source: str) -> SectionT:
    """One config section on its own (e.g. the generate flags): the same checks and messages as a whole config."""
    try:
        return section.model_validate(values)
    except ValidationError as exc:
        lines = [_describe_error(e) for e in exc.errors()]
        raise ConfigError(f"{source}: invalid settings:\n  " + "\n  ".join(dict.fromkeys(lines))) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.learning_rate=1e-4' -> (['train', 'learning_rate'], 1e-4), the value parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value, e.g. train.learning_rate=1e-4")
    key, _, value = text.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if len(path) < 2:
        raise ConfigError(f"override '{text}': name the section too, e.g. train.{key.strip()}={value}")
    try:
        return path, yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"override '{text[:80]}': the value is not valid YAML ({exc}); quote it if it is text"
        ) from None
    except ValueError:  # Python refuses to read an integer of more than 4,300 digits
        raise ConfigError(f"override '{key.strip()}=...': the number ({len(value):,} digits) is out of range") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return raw


def load_config(source: str | Path | dict[str, Any] | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML file (or dict), apply dotted overrides, validate. Relative data paths resolve from the YAML."""
    if source is None:
        raw: dict[str, Any] = {}
        name = "overrides"
    elif isinstance(source, dict):
        raw, name = dict(source), "config"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}): re-save it with UTF-8 encoding") from None
        except RecursionError:
            raise ConfigError(f"{path}: nested too deeply to be a config") from None
        except ValueError:  # an integer of more than 4,300 digits
            raise ConfigError(f"{path}: a number in it is too long to be a setting (over 4,300 digits)") from None
        name = str(path)
        if isinstance(raw, dict):
            _resolve_relative_paths(raw, path.parent)
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of sections (model, data, ...), got {type(raw).__name__}")
    return validate_config(apply_overrides(raw, overrides or []), name, overrides)


def _resolve_relative_paths(raw: dict[str, Any], base: Path) -> None:
    """Relative paths in a YAML file start from its folder, wherever the command runs: data files, a model
    folder or .gguf file that exists there, and output.dir. (Command-line overrides start from the working
    directory, as anything typed in a shell does.)"""
    sections = {name: raw.get(name) for name in ("data", "model", "output")}
    for section, key, must_exist in (
        ("data", "train", True), ("data", "validation", True), ("model", "name_or_path", True), ("output", "dir", False)
    ):  # fmt: skip
        node = sections[section]
        value = node.get(key) if isinstance(node, dict) else None
        relative = isinstance(value, str) and value and not Path(value).is_absolute()
        if relative and (not must_exist or (base / str(value)).exists() or _missing_data_file(section, str(value))):
            node[key] = os.path.normpath(base / str(value))  # type: ignore[index]  # no "examples/../runs"


def _missing_data_file(section: str, value: str) -> bool:
    """A data path named like a file that exists neither beside the YAML nor in the working directory: resolved
    from the YAML's folder anyway, so that the "does not exist" error shows where it was looked for."""
    return section == "data" and Path(value).suffix.lower() in DATA_FILE_SUFFIXES and not Path(value).exists()


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
